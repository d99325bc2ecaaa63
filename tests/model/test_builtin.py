"""builtin:NAME models: generated once into the cache, reused after, safe under races."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from afdserve.errors import ModelLoadError, UserInputError
from afdserve.model import builtin
from afdserve.model.builtin import BUILTIN_MODELS, DEFAULT_MODEL, cache_dir, resolve_model
from afdserve.model.config import ModelConfig


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AFDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_from_env_or_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AFDSERVE_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("AFDSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "afdserve" / "models"


def test_default_model_is_created_once_then_reused(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afdserve.model.make_model as mm

    calls: list[tuple] = []
    real = mm.make_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "make_model", counting)
    first = resolve_model(DEFAULT_MODEL)
    assert first.parent == cache and len(calls) == 1
    assert ModelConfig.from_dir(first).architecture == "Qwen3MoeForCausalLM"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = resolve_model(DEFAULT_MODEL)
    assert second == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp dirs left behind


def _resolve_in_child(name: str, cache: str, queue) -> None:
    os.environ["AFDSERVE_CACHE_DIR"] = cache
    import torch

    torch.set_num_threads(1)
    queue.put(str(resolve_model(name)))


def test_racing_processes_share_one_complete_copy(cache: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_resolve_in_child, args=("builtin:tiny-mixtral", str(cache), queue))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    assert len(set(results)) == 1
    path = Path(results[0])
    assert [p.name for p in cache.iterdir()] == [path.name]
    ModelConfig.from_dir(path)
    import torch

    from afdserve.model.loader import load_weights

    load_weights(path, ModelConfig.from_dir(path), torch.float32)


def test_every_builtin_name_is_known() -> None:
    assert DEFAULT_MODEL.removeprefix("builtin:") in BUILTIN_MODELS
    for arch in ("llama", "qwen2", "qwen3", "mixtral", "qwen3-moe"):
        assert f"tiny-{arch}" in BUILTIN_MODELS and f"small-{arch}" in BUILTIN_MODELS


def test_unknown_builtin_lists_available(cache: Path) -> None:
    with pytest.raises(
        UserInputError, match="unknown built-in model 'huge'.*builtin:tiny-qwen3-moe"
    ):
        resolve_model("builtin:huge")
    assert not cache.exists()


def test_plain_paths(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model(str(tmp_path / "file"))


def test_bare_builtin_name_gets_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="did you mean builtin:tiny-llama"):
        resolve_model("tiny-llama")


def test_failed_generation_leaves_no_partial_model(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import afdserve.model.make_model as mm

    def broken(arch, preset, seed, out, **kwargs):
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mm, "make_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin.builtin_model_dir("tiny-llama")
    assert list(cache.iterdir()) == []


def test_losing_a_race_uses_the_winners_copy(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishes while we generate: our rename fails, and we use its copy."""
    import afdserve.model.make_model as mm

    real = mm.make_model
    winner: list[Path] = []

    def racing(arch, preset, seed, out, **kwargs):
        result = real(arch, preset, seed, out, **kwargs)
        monkeypatch.setattr(mm, "make_model", real)
        winner.append(builtin.builtin_model_dir("tiny-qwen2"))  # the other process, finishing first
        (winner[0] / "marker").write_text("winner")
        return result

    monkeypatch.setattr(mm, "make_model", racing)
    path = builtin.builtin_model_dir("tiny-qwen2")
    assert path == winner[0] and (path / "marker").read_text() == "winner"
    assert [p.name for p in cache.iterdir()] == [path.name]
