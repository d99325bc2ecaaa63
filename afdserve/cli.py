"""`afdserve <verb>`: one argparse front for every tool.

Each verb lives in the subpackage that owns it and exposes `add_parser(subparsers)`; the parser
it registers sets `func` to a callable taking the parsed args and returning an exit status. Verb
modules import nothing heavy at module level, so `afdserve plan --help` never loads torch.

Bad input is reported as one line on stderr with exit status 2 (`CLIError`), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from afdserve.errors import AfdserveError, UserInputError

# verbs raise UserInputError (or this alias) for bad input: one line on stderr, exit status 2
CLIError = UserInputError

# verb modules, in the order `afdserve --help` lists them; a module absent from this checkout is
# skipped so that partial installs still work.
VERB_MODULES: tuple[str, ...] = (
    "afdserve.llm_cli",  # demo, generate
    "afdserve.model.cli",  # make-model
    "afdserve.launch.cli",  # worker, launch
    "afdserve.server.cli",  # serve, bench
    "afdserve.planner.cli",  # plan
    "afdserve.sim.cli",  # simulate, profile, validate
)


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse prints usage plus the error; keep malformed flags to one line, exit status 2."""

    def error(message: str) -> None:
        sys.stderr.write(f"{parser.prog}: error: {message} (see --help)\n")
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afdserve", description="Attention-FFN Disaggregated LLM serving"
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def _version() -> str:
    from afdserve import __version__

    return f"afdserve {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserInputError as exc:
        print(f"afdserve {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except AfdserveError as exc:  # a worker that failed, a peer that timed out: said in one line
        print(f"afdserve {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `afdserve plan ... | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
