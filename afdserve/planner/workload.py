"""Request traces: one loader for every trace format the planner, simulator and load generator read.

A trace is, per request, an arrival time (seconds from the start of the trace, optional), a prompt
length and an output length, in tokens. Three on-disk formats are understood:

- Azure LLM inference trace CSV: header `arrived_at,num_prefill_tokens,num_decode_tokens`
  (arrival in seconds);
- Mooncake JSONL: one object a line with `timestamp` (milliseconds), `input_length`,
  `output_length` (other keys such as `hash_ids` are ignored);
- generic CSV (with a header) or JSONL whose columns/keys use any of the common names in
  `PROMPT_KEYS`, `OUTPUT_KEYS` and, optionally, `ARRIVAL_S_KEYS` / `ARRIVAL_MS_KEYS`.

Named workloads (`azure-conv`, `azure-code`, `mooncake`, `mooncake-conv`, `mooncake-synthetic`)
resolve to files in the shared traces directory (see `traces_dir`). Every problem with a file
(missing, unreadable, empty, a malformed line) raises `UserInputError` naming the file and line,
so that the CLI reports it in one line.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afdserve.errors import UserInputError

# Named workloads -> file name inside the traces directory.
NAMED_WORKLOADS: Mapping[str, str] = {
    "azure-conv": "azure_2023_conv.csv",
    "azure-code": "azure_2023_code.csv",
    "mooncake": "mooncake_conversation.jsonl",
    "mooncake-conv": "mooncake_conversation.jsonl",
    "mooncake-synthetic": "mooncake_synthetic.jsonl",
}

# Accepted column / key names, first match wins. Lower-cased before matching.
PROMPT_KEYS: tuple[str, ...] = (
    "num_prefill_tokens",
    "input_length",
    "prompt_len",
    "prompt_length",
    "prompt_tokens",
    "num_prompt_tokens",
    "input_len",
    "input_tokens",
    "context_tokens",
)
OUTPUT_KEYS: tuple[str, ...] = (
    "num_decode_tokens",
    "output_length",
    "output_len",
    "output_tokens",
    "num_output_tokens",
    "completion_tokens",
    "decode_len",
    "decode_tokens",
    "generated_tokens",
)
ARRIVAL_S_KEYS: tuple[str, ...] = ("arrived_at", "arrival_s", "arrival_time", "arrival", "time_s")
"""Arrival-time keys in seconds."""
ARRIVAL_MS_KEYS: tuple[str, ...] = ("timestamp", "timestamp_ms", "arrival_ms")
"""Arrival-time keys in milliseconds (`timestamp` is the Mooncake convention)."""

TRACE_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json")
DEFAULT_TRACES_DIR = Path("/work/shared/traces")


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-request arrays of one trace, in arrival order.

    The arrays are read-only numpy arrays of equal length N; when arrival times are known the
    requests are stably sorted by them, so consumers (simulator, load generator) can replay in
    order without re-sorting.
    """

    name: str
    """The workload name or file the trace came from (for reports and plot titles)."""
    prompt_len: np.ndarray
    """[N] int64, prompt tokens per request (>= 0)."""
    output_len: np.ndarray
    """[N] int64, output tokens per request (>= 0); each output token is one decode step."""
    arrival_s: np.ndarray | None = None
    """[N] float64 seconds from the start of the trace, non-decreasing; None if the file has none."""
    path: str | None = None
    """The file it was read from, None for traces built in memory."""

    def __post_init__(self) -> None:
        p = np.asarray(self.prompt_len)
        d = np.asarray(self.output_len)
        if p.ndim != 1 or d.ndim != 1 or p.shape != d.shape:
            raise UserInputError(
                f"trace {self.name!r}: prompt_len and output_len must be 1-D arrays of equal "
                f"length, got shapes {p.shape} and {d.shape}"
            )
        if p.size == 0:
            raise UserInputError(f"trace {self.name!r}: has no requests")
        for label, arr in (("prompt_len", p), ("output_len", d)):
            if not np.issubdtype(arr.dtype, np.integer):
                if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                    raise UserInputError(f"trace {self.name!r}: {label} must be whole numbers")
            if np.any(arr < 0):
                raise UserInputError(f"trace {self.name!r}: {label} must be >= 0")
        p = _frozen(p.astype(np.int64))
        d = _frozen(d.astype(np.int64))
        a = None
        if self.arrival_s is not None:
            a = np.asarray(self.arrival_s, dtype=np.float64)
            if a.shape != p.shape:
                raise UserInputError(
                    f"trace {self.name!r}: arrival_s has shape {a.shape}, expected {p.shape}"
                )
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                raise UserInputError(f"trace {self.name!r}: arrival times must be finite and >= 0")
            if np.any(np.diff(a) < 0):
                order = np.argsort(a, kind="stable")
                a, p, d = a[order], _frozen(p[order]), _frozen(d[order])
            a = _frozen(a)
        object.__setattr__(self, "prompt_len", p)
        object.__setattr__(self, "output_len", d)
        object.__setattr__(self, "arrival_s", a)

    def __len__(self) -> int:
        return int(self.prompt_len.size)

    @property
    def num_requests(self) -> int:
        return len(self)

    @property
    def duration_s(self) -> float | None:
        """Time from the first to the last arrival, None without arrival times."""
        if self.arrival_s is None:
            return None
        return float(self.arrival_s[-1] - self.arrival_s[0])


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def repo_root() -> Path:
    """The directory holding the `afdserve` package (the checkout root in a source tree)."""
    return Path(__file__).resolve().parents[2]


def traces_dir() -> Path:
    """Where named workloads live.

    `$AFDSERVE_TRACES_DIR` if set; else `../shared/traces` next to the checkout (where the
    project's shared data sits); else `/work/shared/traces`.
    """
    env = os.environ.get("AFDSERVE_TRACES_DIR")
    if env:
        return Path(env)
    local = repo_root().parent / "shared" / "traces"
    if local.is_dir():
        return local
    return DEFAULT_TRACES_DIR


def trace_files(directory: str | Path | None = None) -> list[Path]:
    """Every trace file (.csv/.jsonl/.json) in `directory` (default: `traces_dir()`), sorted."""
    d = Path(directory) if directory is not None else traces_dir()
    if not d.is_dir():
        raise UserInputError(f"traces directory {str(d)!r} does not exist")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in TRACE_SUFFIXES)


def resolve_trace_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A named workload's file in `traces_dir()`, or the given path; raises if it is not a file."""
    text = os.fspath(name_or_path)
    if text in NAMED_WORKLOADS:
        path = traces_dir() / NAMED_WORKLOADS[text]
        if not path.is_file():
            raise UserInputError(
                f"workload {text!r}: trace file {str(path)!r} not found (set AFDSERVE_TRACES_DIR "
                "to the directory holding the shared traces)"
            )
        return path
    path = Path(text)
    if not path.exists():
        names = ", ".join(NAMED_WORKLOADS)
        raise UserInputError(
            f"no trace file {text!r} and no workload of that name (named: {names})"
        )
    if not path.is_file():
        raise UserInputError(f"trace {text!r} is not a file")
    return path


def load_trace(name_or_path: str | os.PathLike[str]) -> Trace:
    """Load a named workload or a trace file (format chosen by suffix: .csv, or .jsonl/.json)."""
    path = resolve_trace_path(name_or_path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path)
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise UserInputError(f"{path}: unknown trace format {suffix!r}; expected .csv or .jsonl")
    name = os.fspath(name_or_path)
    return _build(rows, path, name if name in NAMED_WORKLOADS else path.name)


def trace_from_lengths(
    prompt_len: Iterable[int],
    output_len: Iterable[int],
    arrival_s: Iterable[float] | None = None,
    name: str = "in-memory",
) -> Trace:
    """A Trace from plain sequences (tests, synthetic workloads)."""
    arr = None if arrival_s is None else np.asarray(list(arrival_s), dtype=np.float64)
    return Trace(
        name=name,
        prompt_len=np.asarray(list(prompt_len)),
        output_len=np.asarray(list(output_len)),
        arrival_s=arr,
    )


# ---- parsing -------------------------------------------------------------------------------

# One row: (line number, {lower-cased key: raw value}).
_Row = tuple[int, dict[str, Any]]


def _open_text(path: Path) -> Iterator[str]:
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            yield from fh
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read trace ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not a UTF-8 text file") from None


def _csv_rows(path: Path) -> Iterator[_Row]:
    reader = csv.reader(_open_text(path))
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            continue
        if len(row) != len(header):
            raise UserInputError(
                f"{path}:{line}: expected {len(header)} fields like the header, got {len(row)}"
            )
        yield line, dict(zip(header, (c.strip() for c in row), strict=True))
    if header is None:
        raise UserInputError(f"{path}: empty trace (no header line)")


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    for line, text in enumerate(_open_text(path), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise UserInputError(f"{path}:{line}: expected a JSON object per line")
        yield line, {str(k).lower(): v for k, v in obj.items()}


def _pick(keys: Iterable[str], available: Iterable[str]) -> str | None:
    have = set(available)
    return next((k for k in keys if k in have), None)


def _build(rows: Iterable[_Row], path: Path, name: str) -> Trace:
    prompts: list[int] = []
    outputs: list[int] = []
    arrivals: list[float] = []
    keys: tuple[str | None, str | None, str | None, float] | None = None
    for line, row in rows:
        if keys is None:
            pk = _pick(PROMPT_KEYS, row)
            ok = _pick(OUTPUT_KEYS, row)
            if pk is None or ok is None:
                missing = "prompt-length" if pk is None else "output-length"
                choices = PROMPT_KEYS if pk is None else OUTPUT_KEYS
                raise UserInputError(
                    f"{path}:{line}: no {missing} field; expected one of {', '.join(choices)}"
                )
            ak_s = _pick(ARRIVAL_S_KEYS, row)
            ak_ms = None if ak_s else _pick(ARRIVAL_MS_KEYS, row)
            keys = (pk, ok, ak_s or ak_ms, 1.0 if ak_s else 1e-3)
        pk, ok, ak, scale = keys
        prompts.append(_count(row.get(pk), pk, path, line))
        outputs.append(_count(row.get(ok), ok, path, line))
        if ak is not None:
            t = _number(row.get(ak), ak, path, line)
            if t < 0:
                raise UserInputError(f"{path}:{line}: {ak} must be >= 0, got {t}")
            arrivals.append(t * scale)
    if not prompts:
        raise UserInputError(f"{path}: empty trace (no requests)")
    return Trace(
        name=name,
        prompt_len=np.asarray(prompts, dtype=np.int64),
        output_len=np.asarray(outputs, dtype=np.int64),
        arrival_s=np.asarray(arrivals, dtype=np.float64) if arrivals else None,
        path=str(path),
    )


def _number(raw: Any, key: str, path: Path, line: int) -> float:
    if raw is None or raw == "":
        raise UserInputError(f"{path}:{line}: missing value for {key}")
    if isinstance(raw, bool):
        raise UserInputError(f"{path}:{line}: {key} must be a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UserInputError(f"{path}:{line}: {key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise UserInputError(f"{path}:{line}: {key} must be finite, got {raw!r}")
    return value


def _count(raw: Any, key: str, path: Path, line: int) -> int:
    value = _number(raw, key, path, line)
    if value < 0 or value != int(value):
        raise UserInputError(f"{path}:{line}: {key} must be a whole number >= 0, got {raw!r}")
    return int(value)
