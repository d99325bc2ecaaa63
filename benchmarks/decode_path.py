"""Which source files and packages one decode step crosses, front to workers and back.

    python benchmarks/decode_path.py [--transport shm] [--model builtin:tiny-llama]

Runs one request (a 1-token prompt, 400 tokens, EOS ignored) through `LLM(transport=...)`
(1 attention worker, 1 FFN worker, or in-process with `--transport local`) with every process
recording which afdserve files run code in each 100 ms (decode_path/sitecustomize.py, loaded
through PYTHONPATH), then prints the files and packages touched during the middle of the decode
phase: a window in which every step is a decode step, so the union is what a decode step, its
control messages and its metrics cross. Counts, not timings: the tracing slows everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_RUN = """
import json, sys, time
from afdserve import LLM, SamplingParams
llm = LLM({model!r}, mode="afd", attention_workers=1, microbatches=1, transport={transport!r})
llm.generate([[1]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
t0 = time.time()
llm.generate([[1]], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
t1 = time.time()
llm.close()
print(json.dumps([t0, t1]))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--model", default="builtin:tiny-llama")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, AFDSERVE_DECODE_PATH_DIR=out)
        path = [str(HERE / "decode_path"), env.get("PYTHONPATH", ""), str(HERE.parent)]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)  # a given tree comes first
        code = _RUN.format(model=args.model, transport=args.transport)
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=out,  # `-c` puts the working directory first on sys.path: nothing there
        )
        t0, t1 = json.loads(proc.stdout.strip().splitlines()[-1])
        mid, half = (t0 + t1) / 2, max(0.1, (t1 - t0) / 4)  # the middle half of the decode
        files: set[str] = set()
        for path in Path(out).glob("*.json"):
            data = json.loads(path.read_text())
            for bucket, names in data["buckets"].items():
                if abs(int(bucket) / 10 - mid) <= half:
                    files.update(names)
    rel = sorted(f.split("afdserve" + os.sep, 1)[-1] for f in files if "afdserve" + os.sep in f)
    packages = sorted({r.split(os.sep)[0] if os.sep in r else "(top)" for r in rel})
    print(f"transport {args.transport}: decode for {t1 - t0:.1f}s (traced)")
    for r in rel:
        print(f"  {r}")
    print(f"{len(rel)} files in {len(packages)} packages: {', '.join(packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
