"""The planner is pure Python: importing and running it (its CLI verbs included) must never load
torch. Only the planner's own parser is built here, so other packages' verbs cannot mask or cause
a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import pkgutil, importlib, sys
import afdserve.planner as planner
for mod in pkgutil.iter_modules(planner.__path__):
    importlib.import_module("afdserve.planner." + mod.name)
from afdserve.planner import StageCosts, WorkloadStats, plan
plan(StageCosts.explicit(5e-5, 0.6, 0.02, 1.0, 0.005, 0.2), 64, WorkloadStats(2000.0, 1e5))
import argparse
from afdserve.planner.cli import add_parser
parser = argparse.ArgumentParser()
add_parser(parser.add_subparsers())
args = parser.parse_args(["plan", "--model", "llama-3.1-8b", "--hw", "h100", "--batch", "8",
                          "--theta", "100", "--json"])
assert args.func(args) == 0
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("LOADED", heavy)
sys.exit(1 if heavy else 0)
"""


def test_planner_never_imports_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout
