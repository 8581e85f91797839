"""A loaded verifier + drafter + tokenizer pair: the one API the CLI, bench and presets call."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import mlx.core as mx
from jinja2 import TemplateError
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.server import convert_chat

from .drafter import DFlashDrafter, load_drafter
from .drafter_config import check_compatible
from .errors import UserError
from .policy import (
    Acceptance,
    AdaptiveWidth,
    FixedWidth,
    RoundCosts,
    WidthPolicy,
    WidthScript,
    calibration_widths,
)
from .prompt_cache import PromptCache
from .proposer import DFlashDraftSource, DraftHead, load_draft_vocab
from .response import GenerationResponse, TextStream
from .sampling import SamplingParams, make_sampler
from .sources import DEFAULT, DEFAULT_QUANTIZED, dir_sha256, resolve_drafter, resolve_model
from .speculative import DecodeStats, GraphMode, ar_stream, fused_stream
from .stopping import StopStrings
from .verifier import Verifier

WARMUP_PROMPT = list(range(3, 35))
GREEDY_PARAMS = SamplingParams()
CALIBRATION_CYCLES = 3  # timed rounds per drafting width and pass
CALIBRATION_SECONDS = 2.0  # passes pool until this long
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
CLEAR_CACHE_EVERY = 256  # tokens between frees of MLX's buffer cache (mlx-lm's cadence)
Mode = Literal["fused", "ar"]
Prompt = str | list[dict[str, str]] | list[int]  # text, a conversation, or token ids


def default_dtype() -> str:
    """fp32 on CPU (MLX's CPU half-precision matmuls are naive), bf16 on a GPU."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


@dataclass
class ModelInfo:
    id: str
    path: Path
    sha256: str
    dtype: str


@dataclass
class RunOptions:
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    ignore_eos: bool = False
    # None: adaptive (AdaptiveWidth, up to the drafter's block); N: every block N rows; or a
    # policy object of your own
    block_size: int | WidthPolicy | None = None
    graph: GraphMode = "two-phase"
    profile: bool = False
    stop: tuple[str, ...] = ()  # stop strings (the text up to the first ends the run)


@dataclass
class RunResult:
    tokens: list[int]
    stats: DecodeStats


def _laps(stream: Iterator[list[int]]) -> list[float]:
    """Seconds between a loop's consecutive yields after the first (the prefill's)."""
    next(stream)
    laps, last = [], time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        laps.append(now - last)
        last = now
    return laps


def _load_verifier(spec: str, dtype: str | None) -> tuple[Verifier, object, ModelInfo]:
    from mlx_lm import load

    chosen = dtype or ("float32" if spec == DEFAULT_QUANTIZED else default_dtype())
    path = resolve_model(spec, chosen)
    try:
        model, tokenizer = load(str(path))
    except Exception as exc:  # mlx-lm raises many types for a broken dir
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot load model dir {path}: {reason}") from None
    if dtype is not None or spec == DEFAULT:
        model.set_dtype(DTYPES[chosen])
    verifier = Verifier(model)
    info = ModelInfo(spec, path, dir_sha256(path), _float_dtype(verifier))
    return verifier, tokenizer, info


def _float_dtype(verifier: Verifier) -> str:
    """The floating dtype the model computes in (a quantized embedding's scales tell it)."""
    emb = verifier.inner.embed_tokens
    dtype = emb.scales.dtype if hasattr(emb, "scales") else emb.weight.dtype
    return next(name for name, d in DTYPES.items() if d == dtype)


class Engine:
    def __init__(self, verifier: Verifier, tokenizer, model_info: ModelInfo,
                 drafter: DFlashDrafter | None = None, drafter_info: ModelInfo | None = None,
                 draft_vocab: mx.array | None = None):
        self.verifier, self.tokenizer, self.model_info = verifier, tokenizer, model_info
        self.drafter, self.drafter_info = drafter, drafter_info
        # what the adaptive policy learned: round costs measured by `calibrate` (warm-up),
        # by sampling kind (a sampled row costs its noise and filters) and graph mode (which
        # moves where the host waits), and the acceptance earlier sequences of a sampling
        # kind saw (a sampled round accepts less; the graph mode drafts the same)
        self.round_costs: dict[tuple[str, GraphMode], RoundCosts] = {}
        self.acceptance: dict[str, Acceptance] = {}
        self.draft_head = None
        if drafter is not None:
            cfg = drafter.config
            check_compatible(cfg, verifier.hidden_size, verifier.vocab_size, verifier.num_layers)
            verifier.set_taps(cfg.target_layer_ids)
            self.draft_head = DraftHead(verifier, draft_vocab)
        verifier.check_adapter()

    @classmethod
    def load(cls, model: str = DEFAULT, draft: str | None = DEFAULT,
             dtype: str | None = None) -> Engine:
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        verifier, tokenizer, info = _load_verifier(model, dtype)
        drafter = drafter_info = vocab = None
        if draft is not None:
            path = resolve_drafter(draft)
            drafter = load_drafter(path)
            drafter.set_dtype(DTYPES[info.dtype])
            drafter_info = ModelInfo(draft, path, dir_sha256(path), info.dtype)
            vocab = load_draft_vocab(path, verifier.vocab_size)
        return cls(verifier, tokenizer, info, drafter, drafter_info, vocab)

    # --- text ----------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def encode(self, prompt: str | list[dict[str, str]],
               chat_template: bool | None = None) -> list[int]:
        """Tokens for a text prompt (wrapped as a user turn when the tokenizer has a chat
        template, unless told otherwise) or for a conversation: templated, or with no
        template (a base model) in the plain `USER: ... ASSISTANT:` form mlx-lm's server
        uses for such models."""
        if isinstance(prompt, list):
            if not self.has_chat_template:
                return list(self.tokenizer.encode(convert_chat(prompt)))
            try:
                return list(self.tokenizer.apply_chat_template(prompt,
                                                               add_generation_prompt=True))
            except TemplateError as exc:  # e.g. roles that do not alternate
                raise UserError(f"the chat template rejects this conversation: {exc}") from None
        if not prompt.strip():
            raise UserError("the prompt is empty")
        if chat_template and not self.has_chat_template:
            raise UserError("--chat-template given but this tokenizer has no chat template")
        if self.has_chat_template if chat_template is None else chat_template:
            return self.encode([{"role": "user", "content": prompt}])
        return list(self.tokenizer.encode(prompt))

    def stop_ids(self, ignore_eos: bool) -> frozenset[int]:
        return frozenset() if ignore_eos else frozenset(self.tokenizer.eos_token_ids)

    # --- decoding ------------------------------------------------------------------------
    def block_size(self, requested: int | None) -> int:
        if self.drafter is None:
            raise UserError("fused decoding needs a drafter (--draft)")
        limit = self.drafter.config.block_size
        size = limit if requested is None else requested
        if not 2 <= size <= limit:
            raise UserError(f"--block-size must be between 2 and the drafter's {limit}, not {size}")
        return size

    def policy(self, opts: RunOptions, learn: bool = True) -> WidthPolicy:
        """The width policy a fused run with `opts` follows. An adaptive one calibrates on
        first use of a sampling kind (a server's first sampled request: a few seconds on a
        CPU) and keeps what its run measures for the next (unless `learn` is off: a profiled
        run)."""
        block_size = opts.block_size
        if block_size is None:
            costs = self.costs(opts) or self.calibrate(opts.graph, opts.sampling)
            acceptance = self.learned_acceptance(opts.sampling.kind)
            if not learn:
                costs, acceptance = copy.deepcopy((costs, acceptance))
            return AdaptiveWidth(costs, self.block_size(None), acceptance)
        if isinstance(block_size, int):
            return FixedWidth(self.block_size(block_size))
        if not isinstance(block_size, WidthPolicy):
            missing = [m for m in ("max_width", "next_width", "record", "shadow_due",
                                   "observe_shadow") if not hasattr(block_size, m)]
            raise UserError(f"block_size must be an int, None or a WidthPolicy; "
                            f"{type(block_size).__name__} lacks {', '.join(missing)} "
                            f"(a policy that never drafts in the shadow can inherit "
                            f"mlx_engine.policy.NeverShadows)")
        return block_size

    def costs(self, opts: RunOptions) -> RoundCosts | None:
        """The round costs runs with `opts`'s sampling kind and graph mode go by, once timed
        (at warm-up or on first use)."""
        return self.round_costs.get((opts.sampling.kind, opts.graph))

    def learned_acceptance(self, kind: str) -> Acceptance:
        """The acceptance earlier sequences of a sampling kind saw (a new engine's counts for
        a kind not run yet): what an adaptive policy starts from."""
        return self.acceptance.setdefault(kind, Acceptance(self.block_size(None)))

    def generate(self, prompt: Prompt, *, options: RunOptions | None = None,
                 mode: Mode | None = None, prompt_cache: PromptCache | None = None,
                 ) -> Iterator[GenerationResponse]:
        """Stream one completion: a response per committed round, the last one with the
        finish reason and the run's stats. `mode`: fused (the default with a drafter) or
        plain AR; `prompt_cache`: rows of the previous sequence to reuse where this prompt
        starts like it (and to keep this one's in). Bad input raises UserError here, before
        anything runs."""
        opts = options or RunOptions()
        mode = mode or ("ar" if self.drafter is None else "fused")
        if mode not in ("fused", "ar"):
            raise UserError(f"mode must be fused or ar, not {mode!r}")
        if opts.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, not {opts.max_tokens}")
        is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        ids = list(prompt) if is_ids else self.encode(prompt)
        if not ids:
            raise UserError("the prompt is empty")
        policy = None
        if mode == "fused":
            policy = self.policy(opts)
        return self._responses(ids, opts, policy, prompt_cache)

    def _responses(self, prompt: list[int], opts: RunOptions, policy: WidthPolicy | None,
                   prompt_cache: PromptCache | None) -> Iterator[GenerationResponse]:
        stats = DecodeStats()
        stop_ids = self.stop_ids(opts.ignore_eos)
        rows = None if prompt_cache is None else prompt_cache.take(prompt, policy is not None)
        cache = self.verifier.make_cache() if rows is None else rows.verifier
        sampler = make_sampler(opts.sampling, opts.seed, self.verifier.vocab_size)
        common = dict(sampler=sampler, stop_ids=stop_ids, stats=stats, cache=cache)
        source = None
        if policy is None:
            loop = ar_stream(self.verifier, prompt, opts.max_tokens, **common)
        else:
            source = DFlashDraftSource(self.drafter, self.verifier, self.draft_head,
                                       None if rows is None else rows.drafter)
            loop = fused_stream(self.verifier, source, prompt, opts.max_tokens, policy,
                                graph=opts.graph, profile=opts.profile, **common)
        stop = StopStrings(self.tokenizer, opts.stop)
        text = TextStream(self.tokenizer, opts.stop, self.stop_ids(ignore_eos=False))
        tokens: list[int] = []

        def keep_rows() -> None:
            if prompt_cache is not None:
                prompt_cache.put(prompt + tokens, cache, None if source is None else source.cache)

        mx.reset_peak_memory()
        try:
            with closing(loop), wired_limit(self.verifier.model, [generation_stream]):
                rounds = 0
                for chunk in loop:
                    if not tokens and prompt_cache is not None:  # the prompt is in: mark it
                        self.verifier.mark(cache)  # for a next turn that shares only it
                    # a drafted round appended its accepted count before yielding
                    drafted = stats.accepted[-1] if len(stats.accepted) > rounds else 0
                    rounds = len(stats.accepted)
                    before = len(tokens)
                    tokens.extend(chunk)
                    finish = None
                    if (end := stop.end(tokens, len(chunk))) is not None:
                        chunk = chunk[: end - before]
                        del tokens[end:]
                        stats.new_tokens, finish = end, "stop"
                    elif chunk[-1] in stop_ids:
                        finish = "stop"
                    elif stats.new_tokens >= opts.max_tokens:
                        finish = "length"
                    if len(tokens) // CLEAR_CACHE_EVERY > before // CLEAR_CACHE_EVERY:
                        mx.clear_cache()
                    if finish is not None:
                        stats.finish_reason = finish
                        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
                    yield GenerationResponse(text.add(chunk, finish is not None), chunk,
                                             min(drafted, len(chunk)), finish,
                                             None if finish is None else stats)
                    if finish is not None:
                        break
        except GeneratorExit:  # the consumer stopped between rounds: the rows are whole
            keep_rows()
            raise
        keep_rows()

    def run(self, mode: Mode, prompt: list[int], opts: RunOptions,
            on_text: Callable[[str], None] | None = None) -> RunResult:
        """Every token of one run and its stats: `generate`, collected (`on_text` sees the
        text as it comes)."""
        tokens: list[int] = []
        for response in self.generate(prompt, options=opts, mode=mode):
            tokens.extend(response.tokens)
            if on_text is not None:
                on_text(response.text)
        return RunResult(tokens, response.stats)

    def calibrate(self, graph: GraphMode = "two-phase",
                  sampling: SamplingParams = GREEDY_PARAMS) -> RoundCosts:
        """Time rounds on this device for the adaptive policy (and warm both loops up), in
        passes pooled until `CALIBRATION_SECONDS` have gone by: one pass on a CPU, where it
        takes seconds; on a GPU a pass takes a few tenths of a second, and one pass's medians
        put a 16-row round anywhere between 1.3 and 2.2 AR steps. Rounds sample as the runs
        they are for will: a sampled row costs its noise and filters too."""
        rounds: list[tuple[int, float]] = []
        start = time.perf_counter()
        while not rounds or time.perf_counter() - start < CALIBRATION_SECONDS:
            rounds += self._calibration_pass(graph, sampling)
        self.round_costs[sampling.kind, graph] = costs = RoundCosts.from_rounds(rounds)
        return costs

    def _calibration_pass(self, graph: GraphMode,
                          sampling: SamplingParams) -> list[tuple[int, float]]:
        """AR steps by the oracle loop's own pipelined laps, before and after the drafting
        widths 2, 4, ... B, which are timed in cycles (the first one only compiles), so a
        drift of the machine's speed meanwhile reaches every width alike."""
        widths = calibration_widths(self.block_size(None))
        script = WidthScript(widths * (1 + CALIBRATION_CYCLES))
        opts = RunOptions(max_tokens=sum(script.plan) + 2, ignore_eos=True, block_size=script,
                          graph=graph, sampling=sampling)
        rounds = self._ar_laps(sampling)
        for _ in self.generate(WARMUP_PROMPT, options=opts, mode="fused"):
            if script.done:
                break
        return rounds + script.rounds[len(widths):] + self._ar_laps(sampling)

    def _ar_laps(self, sampling: SamplingParams, steps: int = 10) -> list[tuple[int, float]]:
        """(1, seconds) per AR step of a short oracle run, after its first (pipeline fill)."""
        opts = RunOptions(max_tokens=steps + 1, ignore_eos=True, sampling=sampling)
        laps = _laps(r.tokens for r in self.generate(WARMUP_PROMPT, options=opts, mode="ar"))
        return [(1, lap) for lap in laps[1:]]

    def warmup(self, opts: RunOptions) -> None:
        """Compile kernels and size buffers once so the timed runs compare steady states; with
        a drafter this is also when the adaptive policy's round costs are measured."""
        if self.drafter is None:
            self.run("ar", WARMUP_PROMPT, RunOptions(max_tokens=8, ignore_eos=True))
        else:
            self.calibrate(opts.graph, opts.sampling)
            if isinstance(opts.block_size, int):
                self.run("fused", WARMUP_PROMPT, RunOptions(
                    max_tokens=2 * opts.block_size, block_size=opts.block_size,
                    graph=opts.graph, ignore_eos=True))
