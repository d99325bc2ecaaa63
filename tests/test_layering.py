"""The packages import only downward: a test of the architecture, walking every import.

Each library package has a layer; a module may import its own package and packages of lower
layers only, so there is no cycle between packages and a reader can learn the code bottom up.
Entry points are exempt: the `cli.py` / `*_cli.py` modules (argparse verbs, which wire layers
together) and the package root, which re-exports the public API. `sim` must stay free of the
runtime (and of torch): only `calibration` runs the engine for it. The one exception is the
torch-free half of `engine` (scheduler, block allocator, sequences, configs, microbatch split),
which the simulator's reference replica drives exactly as an attention worker does; `sim` sits
a layer above `engine` for that.
"""

from __future__ import annotations

import ast
from pathlib import Path

import afdserve

ROOT = Path(afdserve.__file__).parent

LAYERS: dict[str, int] = {
    "__version__": 0,  # `from afdserve import __version__`: a constant of the (lazy) root
    "errors": 0,
    "types": 1,
    "model": 2,
    "transport": 2,
    "planner": 2,
    "config": 3,
    "engine": 3,
    "eplb": 3,
    "sim": 4,
    "afd": 4,
    "launch": 5,
    "llm": 6,
    "server": 7,
    "calibration": 7,
}
RUNTIME = {"model", "transport", "engine", "afd", "launch", "llm", "server", "calibration"}
"""What `sim` may not import: it is the torch-free model of these..."""
SIM_MAY_DRIVE = {
    "afdserve.engine",
    "afdserve.engine.block_allocator",
    "afdserve.engine.config",
    "afdserve.engine.microbatch",
    "afdserve.engine.prefix_cache",
    "afdserve.engine.scheduler",
    "afdserve.engine.sequence",
}
"""...but for these torch-free modules of `engine`: the scheduler the reference replica runs."""


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_entry_point(path: Path) -> bool:
    return (
        path.name in ("cli.py", "__main__.py")
        or path.name.endswith("_cli.py")
        or (path.parent == ROOT and path.name == "__init__.py")
    )


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, afdserve module) for every import in the file, at any depth (lazy ones too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "afdserve":
            names = [f"afdserve.{a.name}" for a in node.names]  # what it takes from the root
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "afdserve" or n.startswith("afdserve.")]
    return out


def _edges() -> list[tuple[str, str, str, str]]:
    """(importing package, imported package, imported module, where) for every cross-package
    library import."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        if _is_entry_point(path):
            continue
        rel = path.relative_to(ROOT)
        src = rel.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            dst = _package(module)
            if dst != src:
                edges.append((src, dst, module, f"afdserve/{rel}:{line} imports {module}"))
    return edges


def test_every_package_has_a_layer():
    packages = {p.name.removesuffix(".py") for p in ROOT.iterdir() if not p.name.startswith("_")}
    packages -= {"cli", "llm_cli", "py.typed"}
    packages = {p for p in packages if (ROOT / p).is_dir() or (ROOT / f"{p}.py").is_file()}
    assert packages - {"csrc"} <= set(LAYERS), sorted(packages - set(LAYERS))


def test_packages_import_only_lower_layers():
    bad = [
        f"{where} ({src}: layer {LAYERS[src]}, {dst}: layer {LAYERS.get(dst)})"
        for src, dst, _, where in _edges()
        if dst not in LAYERS or LAYERS[dst] >= LAYERS[src]
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_simulator_imports_nothing_of_the_runtime():
    bad = [
        where
        for src, dst, module, where in _edges()
        if src == "sim" and dst in RUNTIME and module not in SIM_MAY_DRIVE
    ]
    assert not bad, "\n".join(bad)


def test_the_check_sees_a_wrong_edge(tmp_path):
    # the walker finds lazy imports inside functions, which is where a wrong edge would hide
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from afdserve.launch.worker import run_worker\n")
    assert _imports(f) == [(2, "afdserve.launch.worker")]
