#!/usr/bin/env bash
# Set up afdserve in ./.venv on a fresh machine.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --test   runtime plus the test tools (pytest, transformers oracle, openai client)
# CPU machines get the CPU build of torch 2.13.0 (an unpinned torch would pull a multi-GB CUDA
# build). A machine whose system Python already has torch (a GPU box) keeps that torch unchanged:
# the venv then sees the system site-packages and nothing installs over it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: using the system torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".${extras}"
if [ -n "$extras" ] && ! .venv/bin/python -c "import nixl_cu12" 2>/dev/null; then
  # the optional NIXL transport: its wheel needs only numpy (hence --no-deps); tests of it are
  # skipped with a clear message where it cannot be installed
  .venv/bin/pip install -q --no-deps nixl-cu12 || echo "setup: nixl-cu12 not installed (optional transport)"
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
