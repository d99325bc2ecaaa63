"""`afdserve simulate --ratio` on one bundle says what it assumed and checks memory (issue 18,
item 2): Step-3 came out at 537 ms TPOT from a silent 1 + 1 devices and bf16 KV."""

from __future__ import annotations

import json

import pytest

from afdserve.cli import main
from afdserve.planner import traces_dir

needs_traces = pytest.mark.skipif(
    not (traces_dir() / "azure_2023_conv.csv").exists(), reason="shared traces not found"
)
ONE = ["simulate", "--model", "step3", "--hardware", "h800", "--workload", "azure-conv"]
ONE += ["--ratio", "8", "--batch", "64", "--requests", "40", "--closed-loop"]


@needs_traces
def test_open_choices_are_printed_and_in_the_json(capsys) -> None:
    assert main([*ONE, "--microbatches", "3", "--json"]) == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)
    assert set(d["assumed"]) == {
        "kv_dtype",
        "attention_devices",
        "ffn_devices",
        "link",
        "comm_scales_with",
    }
    for key in d["assumed"]:
        assert f"assumed: {key} = " in captured.err
    # the FFN is sized by memory: Step-3's experts need more than one 80 GB device
    assert d["expert_parallel"]["ffn_devices"] >= 8


@needs_traces
def test_explicit_choices_leave_nothing_assumed(capsys) -> None:
    argv = [*ONE, "--microbatches", "3", "--attention-devices", "1", "--ffn-devices", "16"]
    argv += ["--kv-dtype", "fp8", "--link", "scale-out", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # only the derived communication side is left to say (no flag chooses it)
    assert set(json.loads(captured.out)["assumed"]) == {"comm_scales_with"}
    assert captured.err.count("assumed:") == 1


@needs_traces
def test_a_bundle_that_does_not_fit_is_an_error(capsys) -> None:
    code = main([*ONE, "--ffn-devices", "1", "--attention-devices", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "FFN instance does not fit" in err and len(err.strip().splitlines()) == 1
