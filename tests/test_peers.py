"""`bench --peers`: the peer DFlash runtimes as arms on a tiny random pair, and how the bench
reports a peer that is not installed or fails (those tests always run)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tiny import TARGET_CONFIGS, drafter_config, save_model_dir, save_random_drafter

from mlx_engine import evidence, peers
from mlx_engine.bench import main


@pytest.fixture(scope="module", params=["gemma3_text", "qwen3"])
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(f"peers-{family}")
    layers = TARGET_CONFIGS[family]["num_hidden_layers"]
    draft = save_random_drafter(root / "draft", drafter_config(layers, block_size=8))
    return family, save_model_dir(root / "model", family), draft


def _bench(pair, tmp_path: Path, *extra: str) -> dict:
    _, model, draft = pair
    out = tmp_path / "evidence.json"
    rc = main(["--model", str(model), "--draft", str(draft), "--workload", "code", "--n", "2",
               "--max-tokens", "12", "--no-mlx-lm", "--no-profile", "--json", str(out), *extra])
    assert rc == 0
    record = json.loads(out.read_text())
    evidence.validate(record)
    return record


def test_a_peer_that_is_not_installed_is_an_arm_that_says_why(pair, tmp_path, monkeypatch,
                                                               capsys):
    loaded = [m for m in sys.modules if m.partition(".")[0] in ("dflash", "dflash_mlx")]
    for module in {"dflash", "dflash_mlx", *loaded}:
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    record = _bench(pair, tmp_path, "--peers", "dflash-mlx,zlab")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("peer ")]
    assert len(lines) == 2 and "pip install 'dflash==0.1.0'" in lines[1]
    assert record["aggregate"]["lossless_all"] is True  # our arms ran as ever
    for s in record["samples"]:
        for name in peers.NAMES:
            assert s["peers"][name]["error"].startswith("unavailable: not installed")
            assert s["peers"][name]["how_called"]
    for name in peers.NAMES:
        a = record["aggregate"]["peers"][name]
        assert a["ran"] == a["failed"] == 0 and a["decode_tok_s"] is None
        assert "not installed" in a["error"]


def test_the_peers_extra_pins_what_the_bench_asks_for():
    """`pip install '.[peers]'`, the bench's install hint and .ci/run (which reads
    peers.INSTALL) name the same versions."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert sorted(project["project"]["optional-dependencies"]["peers"]) == sorted(
        peers.INSTALL.values())


def test_why_names_the_raising_file_as_its_package_does(tmp_path, monkeypatch):
    """Wherever the peer is installed (site-packages, dist-packages, a --target dir on
    PYTHONPATH), the location reads `package/module.py:line`."""
    module = tmp_path / "installed" / "peerpkg" / "engine" / "ops.py"
    module.parent.mkdir(parents=True)
    module.write_text("def load():\n    raise NotImplementedError('model_type=x\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # a shallower root holds it too
    monkeypatch.syspath_prepend(str(tmp_path / "installed"))
    from peerpkg.engine import ops

    with pytest.raises(NotImplementedError) as raised:
        ops.load()
    assert peers.why(raised.value) == "NotImplementedError at peerpkg/engine/ops.py:2: model_type=x"


def test_unknown_peer_is_one_line_and_exit_2(pair, capsys):
    _, model, draft = pair
    assert main(["--model", str(model), "--draft", str(draft), "--workload", "code",
                 "--peers", "zlab,vllm"]) == 2
    assert capsys.readouterr().err.strip() == "error: --peers: unknown peer vllm; known: " \
                                              "dflash-mlx, zlab"


class Failing(peers.Peer):
    """A peer whose loop raises mid-stream on every prompt but the warm-up's."""

    name, how_called = "zlab", "a stub that fails"

    def stream(self, prompt: list[int], max_tokens: int, width: int | None, eos: list[int],
               reported: dict[str, Any]) -> Iterator[list[int]]:
        yield [prompt[0]]
        if max_tokens > 8:
            raise RuntimeError("kernel exploded\nsecond line")


def test_a_peer_run_that_raises_is_recorded_and_the_bench_goes_on(pair, tmp_path, monkeypatch):
    monkeypatch.setitem(peers.PEERS, "zlab", Failing)
    record = _bench(pair, tmp_path, "--peers", "zlab")
    for s in record["samples"]:
        assert s["peers"]["zlab"]["error"].startswith("RuntimeError at ")
        assert s["peers"]["zlab"]["error"].endswith(": kernel exploded")
    a = record["aggregate"]["peers"]["zlab"]
    assert a["ran"] == 0 and a["failed"] == 2


def _ran(record: dict, name: str) -> None:
    for s in record["samples"]:
        p = s["peers"][name]
        assert "error" not in p, p["error"]
        assert p["new_tokens"] >= 1 and p["decode_tok_s"] > 0 and p["tau"] >= 1
        assert p["blocks"] >= 1
        assert isinstance(p["matches_ar"], bool) and p["how_called"] == peers.PEERS[name].how_called
    a = record["aggregate"]["peers"][name]
    assert a["ran"] == 2 and a["failed"] == 0 and a["fused_vs_peer"] > 0


def test_peer_tau_is_pooled_over_blocks_as_ours_is():
    entries = [{"tau": 10.0, "blocks": 9}, {"tau": 2.0, "blocks": 40},
               {"tau": None, "blocks": None}]
    assert peers.pooled_tau(entries) == pytest.approx((10 * 9 + 2 * 40) / 49)
    assert peers.pooled_tau([{"tau": None, "blocks": None}]) is None


def test_zlab_runs_its_own_loop_on_the_pair(pair, tmp_path):
    pytest.importorskip("dflash.model_mlx")
    _ran(_bench(pair, tmp_path, "--peers", "zlab", "--block-size", "4", "--ignore-eos"), "zlab")


def test_dflash_mlx_runs_qwen3_and_refuses_gemma3(pair, tmp_path):
    pytest.importorskip("dflash_mlx.runtime.bundle")
    record = _bench(pair, tmp_path, "--peers", "dflash-mlx", "--ignore-eos")
    if pair[0] == "qwen3":
        _ran(record, "dflash-mlx")
        return
    error = record["aggregate"]["peers"]["dflash-mlx"]["error"]
    assert error.startswith("unavailable: NotImplementedError at dflash_mlx/engine/target_ops.py")
    assert "model_type=gemma3_text" in error
