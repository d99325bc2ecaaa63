#!/usr/bin/env bash
# Set up (with test extras) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/python -m ruff check afdserve tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
