"""Shared test setup: one torch thread, `slow`/`gpu` markers, and tiny models of every arch.

- torch uses one thread in the test process (OMP_NUM_THREADS=1 for subprocesses too): the test
  machine is small and shared, and results must not depend on thread scheduling.
- `slow` tests run only with `--runslow` or AFDSERVE_SLOW=1; `gpu` tests only where CUDA is.
- `tiny_model_dirs` builds a tiny model of each of the five architectures once per session
  (seed 0, float32); `tiny_model_dir("qwen3-moe")` returns one of them.
- Built-in models (`builtin:NAME`) go to a per-session cache directory, never to ~/.cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mixtral", "qwen3-moe")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # torch-free parts of the suite still run
        return
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or os.environ.get("AFDSERVE_SLOW") == "1"
    has_gpu = _cuda_available() if any("gpu" in item.keywords for item in items) else False
    skip_slow = pytest.mark.skip(reason="slow: use --runslow or AFDSERVE_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point AFDSERVE_CACHE_DIR at a session directory (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("afdserve-cache")
    old = os.environ.get("AFDSERVE_CACHE_DIR")
    os.environ["AFDSERVE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("AFDSERVE_CACHE_DIR", None)
    else:
        os.environ["AFDSERVE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch alias (llama, qwen2, qwen3, mixtral, qwen3-moe) -> tiny model dir, seed 0, fp32."""
    from afdserve.model.make_model import make_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_model(arch, "tiny", 0, root / arch) for arch in TINY_ARCHS}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs: dict[str, Path]) -> Callable[[str], Path]:
    """tiny_model_dir("mixtral") -> that arch's tiny model dir."""

    def get(arch: str) -> Path:
        if arch not in tiny_model_dirs:
            raise KeyError(f"no tiny model for {arch!r}; have {', '.join(tiny_model_dirs)}")
        return tiny_model_dirs[arch]

    return get
