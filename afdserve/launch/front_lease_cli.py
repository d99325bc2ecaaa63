"""`python -m afdserve.launch.front_lease_cli --lease FILE --timeout S -- <serve flags>`: the
front a keeper starts (front_lease.py): `afdserve serve` in this process, plus the thread that
stops it once no keeper renews the lease."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from afdserve.launch.front_lease import watch_lease


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afdserve.launch.front_lease_cli")
    p.add_argument("--lease", required=True, type=Path)
    p.add_argument("--timeout", required=True, type=float)
    p.add_argument("serve", nargs=argparse.REMAINDER, help="-- then `afdserve serve` flags")
    args = p.parse_args(argv)
    serve = args.serve[1:] if args.serve[:1] == ["--"] else args.serve
    threading.Thread(
        target=watch_lease, args=(args.lease, args.timeout), name="afd-lease", daemon=True
    ).start()
    from afdserve.cli import main as cli_main

    return cli_main(["serve", *serve])


if __name__ == "__main__":
    sys.exit(main())
