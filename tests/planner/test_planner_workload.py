"""Trace loading: the shared traces, generic files, named workloads and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afdserve.errors import UserInputError
from afdserve.planner import NAMED_WORKLOADS, Trace, load_trace, stats_from_trace, traces_dir
from afdserve.planner.workload import repo_root

SHARED = traces_dir()
needs_traces = pytest.mark.skipif(
    not (SHARED / "azure_2023_conv.csv").is_file(), reason=f"shared traces not found in {SHARED}"
)

# request counts, as the traces' README lists them
EXPECTED_COUNTS = {
    "azure-conv": 19366,
    "azure-code": 8819,
    "mooncake-conv": 12031,
    "mooncake-synthetic": 3993,
}


@needs_traces
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_named_shared_traces_load(name) -> None:
    trace = load_trace(name)
    assert isinstance(trace, Trace)
    assert trace.num_requests == EXPECTED_COUNTS[name]
    assert trace.prompt_len.dtype == np.int64 and trace.output_len.dtype == np.int64
    assert trace.arrival_s is not None and np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.arrival_s[0] == 0.0
    # spans in seconds, as the README lists them (Mooncake timestamps are ms)
    assert 1000 < trace.duration_s < 3600
    s = stats_from_trace(trace)
    assert s.theta > 0 and s.sigma2 > 0


@needs_traces
def test_azure_conv_first_rows_and_readme_means() -> None:
    trace = load_trace("azure-conv")
    assert trace.prompt_len[:2].tolist() == [374, 396]
    assert trace.output_len[:2].tolist() == [44, 109]
    assert trace.arrival_s[1] == pytest.approx(4.314579)
    assert trace.prompt_len.mean() == pytest.approx(1155, abs=1)
    assert trace.output_len.mean() == pytest.approx(211, abs=1)


@needs_traces
def test_mooncake_alias_and_ms_timestamps() -> None:
    a, b = load_trace("mooncake"), load_trace("mooncake-conv")
    assert np.array_equal(a.prompt_len, b.prompt_len)
    assert a.prompt_len[:2].tolist() == [6758, 7322]
    assert a.duration_s == pytest.approx(3536.999)


def test_names_cover_the_issue() -> None:
    assert set(NAMED_WORKLOADS) == {
        "azure-conv",
        "azure-code",
        "mooncake",
        "mooncake-conv",
        "mooncake-synthetic",
    }


def test_traces_dir_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AFDSERVE_TRACES_DIR", str(tmp_path))
    assert traces_dir() == tmp_path
    (tmp_path / "azure_2023_code.csv").write_text(
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0,5,6\n"
    )
    assert load_trace("azure-code").prompt_len.tolist() == [5]
    with pytest.raises(UserInputError, match="azure_2023_conv.csv"):
        load_trace("azure-conv")
    monkeypatch.delenv("AFDSERVE_TRACES_DIR")
    expected = repo_root().parent / "shared" / "traces"
    if expected.is_dir():
        assert traces_dir() == expected


@pytest.mark.parametrize(
    "header, row",
    [
        ("prompt_len,output_len", "10,3"),
        ("input_len,output_tokens", "10,3"),
        ("prompt_tokens,completion_tokens,arrival_s", "10,3,1.5"),
        ("Prompt_Length,Output_Length", "10,3"),
    ],
)
def test_generic_csv_column_names(tmp_path, header, row) -> None:
    f = tmp_path / "t.csv"
    f.write_text(f"{header}\n{row}\n\n{row}\n")
    trace = load_trace(f)
    assert trace.prompt_len.tolist() == [10, 10]
    assert trace.output_len.tolist() == [3, 3]
    assert trace.name == "t.csv" and trace.path == str(f)


def test_generic_jsonl_with_and_without_arrivals(tmp_path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text(
        json.dumps({"prompt_tokens": 7, "output_len": 2})
        + "\n"
        + json.dumps({"prompt_tokens": 9, "output_len": 4})
        + "\n"
    )
    trace = load_trace(f)
    assert trace.arrival_s is None and trace.duration_s is None
    assert trace.prompt_len.tolist() == [7, 9]
    g = tmp_path / "m.jsonl"
    g.write_text(
        json.dumps({"timestamp": 2500, "input_length": 7, "output_length": 2, "hash_ids": [1]})
        + "\n"
        + json.dumps({"timestamp": 500, "input_length": 9, "output_length": 4})
        + "\n"
    )
    trace = load_trace(g)
    # timestamps are ms; requests come back in arrival order
    assert trace.arrival_s.tolist() == [0.5, 2.5]
    assert trace.prompt_len.tolist() == [9, 7]


def test_arrays_are_read_only() -> None:
    trace = Trace(name="x", prompt_len=np.array([1, 2]), output_len=np.array([3, 4]))
    with pytest.raises(ValueError):
        trace.prompt_len[0] = 5


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.csv", "", "empty trace"),
        ("header_only.csv", "prompt_len,output_len\n", "empty trace"),
        ("nocol.csv", "foo,bar\n1,2\n", r"nocol.csv:2: no prompt-length field"),
        ("noout.csv", "prompt_len,bar\n1,2\n", r"noout.csv:2: no output-length field"),
        ("neg.csv", "prompt_len,output_len\n1,2\n-3,4\n", r"neg.csv:3: prompt_len must be a whole"),
        ("frac.csv", "prompt_len,output_len\n1,2.5\n", r"frac.csv:2: output_len must be a whole"),
        ("text.csv", "prompt_len,output_len\n1,abc\n", r"text.csv:2: output_len must be a number"),
        ("short.csv", "prompt_len,output_len\n1\n", r"short.csv:2: expected 2 fields"),
        ("nan.csv", "prompt_len,output_len\n1,nan\n", r"nan.csv:2: output_len must be finite"),
        ("missing.csv", "prompt_len,output_len\n1,\n", r"missing.csv:2: missing value"),
        (
            "bad.jsonl",
            '{"prompt_len": 1, "output_len": 2}\n{oops\n',
            r"bad.jsonl:2: not valid JSON",
        ),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", "empty trace"),
        ("t.txt", "prompt_len,output_len\n1,2\n", "unknown trace format"),
        ("negtime.csv", "arrival_s,prompt_len,output_len\n-1,1,2\n", "arrival_s must be >= 0"),
        ("bool.jsonl", '{"prompt_len": true, "output_len": 2}\n', "must be a number"),
    ],
)
def test_bad_traces_name_file_and_line(tmp_path, name, text, message) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserInputError, match=message):
        load_trace(f)


def test_missing_unreadable_and_binary(tmp_path) -> None:
    with pytest.raises(UserInputError, match="no trace file"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(UserInputError, match="not a file"):
        load_trace(tmp_path)
    b = tmp_path / "bin.csv"
    b.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserInputError, match="UTF-8"):
        load_trace(b)


def test_an_empty_trace_names_its_file(tmp_path) -> None:
    f = tmp_path / "empty.csv"
    f.write_text("")
    with pytest.raises(UserInputError, match="empty trace") as err:
        load_trace(f)
    assert str(f) in str(err.value)
