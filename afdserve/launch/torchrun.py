"""`python -m afdserve.launch.torchrun`: the entry point of every rank a standard launcher
starts (torchrun, a LeaderWorkerSet pod). The rank's plan and its flags live in torchrun_cli.py
(an entry-point module: it reaches `afdserve serve`'s parser, above this layer)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from afdserve.launch.torchrun_cli import main

    sys.exit(main())
