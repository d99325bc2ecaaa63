"""`python -m afdserve.launch.ray`: one AFD group whose workers Ray places and restarts (an
optional extra: `pip install afdserve[ray]`). The driver and its flags live in ray_cli.py (an
entry-point module: it checks the front's flags with `afdserve serve`'s parser)."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from afdserve.launch.ray_cli import main

    sys.exit(main())
