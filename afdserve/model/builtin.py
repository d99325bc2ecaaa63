"""Built-in models: `builtin:NAME` resolves to a generated model, created on first use.

So the main job, the demos and the tests need no model argument and no hub: the first use of
`builtin:tiny-qwen3-moe` runs make-model into the cache directory (AFDSERVE_CACHE_DIR, else
~/.cache/afdserve/models) and every later use finds it there. Creation writes into a private
temporary directory and renames it into place, so a reader never sees a half-written model and
two processes racing to create the same model both end up using one complete copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from afdserve.errors import ModelLoadError, UserInputError

DEFAULT_MODEL = "builtin:tiny-qwen3-moe"
PREFIX = "builtin:"

BUILTIN_SEED = 0
BUILTIN_FORMAT = 1
"""Bump when make_model's output changes, so that stale cached copies are not reused."""

BUILTIN_MODELS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        f"{preset}-{alias}": (alias, preset)
        for preset in ("tiny", "small")
        for alias in ("llama", "qwen2", "qwen3", "mixtral", "qwen3-moe")
    }
)
"""name -> (architecture alias, preset): tiny-llama, ..., small-qwen3-moe."""


def cache_dir() -> Path:
    """Where built-in models live: $AFDSERVE_CACHE_DIR, else ~/.cache/afdserve/models."""
    env = os.environ.get("AFDSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afdserve" / "models"


def resolve_model(name_or_path: str | Path) -> Path:
    """`builtin:NAME` -> its directory (created on first use); a path -> itself, if it exists."""
    text = str(name_or_path)
    if text.startswith(PREFIX):
        return builtin_model_dir(text[len(PREFIX) :])
    path = Path(text).expanduser()
    if not path.exists():
        hint = f"; did you mean {PREFIX}{text}?" if text in BUILTIN_MODELS else ""
        raise ModelLoadError(f"model directory {text!r} does not exist{hint}")
    if not path.is_dir():
        raise ModelLoadError(f"model path {text!r} is not a directory")
    return path


def builtin_model_dir(name: str) -> Path:
    """The cached directory of built-in model `name`, generating it if it is not there yet."""
    if name not in BUILTIN_MODELS:
        raise UserInputError(
            f"unknown built-in model {name!r}; available: "
            + ", ".join(PREFIX + n for n in BUILTIN_MODELS)
        )
    final = cache_dir() / f"{name}-seed{BUILTIN_SEED}-v{BUILTIN_FORMAT}"
    if (final / "config.json").is_file():
        return final
    from afdserve.model.make_model import make_model

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        arch, preset = BUILTIN_MODELS[name]
        make_model(arch, preset, BUILTIN_SEED, tmp)
        try:
            tmp.rename(final)  # atomic; fails if another process got there first
        except OSError as exc:
            if not (final / "config.json").is_file():
                raise ModelLoadError(
                    f"cannot create built-in model at {final} ({exc}); remove that directory"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
