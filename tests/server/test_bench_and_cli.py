"""`afdserve bench` against a live server (random and trace datasets, --save-result), and
`afdserve serve` as a real subprocess: defaults, a request through it, clean shutdown on
SIGINT and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from afdserve.cli import build_parser, main
from afdserve.errors import UserInputError
from afdserve.planner.workload import traces_dir
from tests.server.conftest import live_server, wait_until_healthy


def test_bench_random_against_a_live_server(afd_server, tmp_path, capsys):
    out = tmp_path / "result.json"
    rc = main(
        [
            "bench",
            "--base-url",
            afd_server.base_url,
            "--num-prompts",
            "6",
            "--random-input-len",
            "12",
            "--random-output-len",
            "5",
            "--max-concurrency",
            "3",
            "--request-rate",
            "50",
            "--seed",
            "3",
            "--save-result",
            str(out),
            "--disable-tqdm",
            "--percentiles",
            "50,99",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "============ Serving Benchmark Result ============" in text
    assert "Successful requests:                     6         " in text
    assert "Total input tokens:                      72        " in text
    assert "Total generated tokens:                  30        " in text
    assert "Maximum request concurrency:             3         " in text
    assert "P50 TTFT (ms):" in text and "P99 ITL (ms):" in text and "Mean E2EL (ms):" in text
    record = json.loads(out.read_text())
    assert record["completed"] == 6 and record["failed"] == 0
    assert record["output_lens"] == [5] * 6 and record["input_lens"] == [12] * 6
    assert record["model_id"] == "tiny" and record["mean_ttft_ms"] > 0
    assert all(len(itl) == 4 for itl in record["itls"])  # one chunk per token, flushed as produced
    afd_server.wait_idle()


@pytest.mark.skipif(
    not (traces_dir() / "azure_2023_code.csv").is_file(), reason="shared traces absent"
)
def test_bench_trace_dataset_is_clipped_to_the_server(afd_server, tmp_path, capsys):
    out = tmp_path / "trace.json"
    rc = main(
        [
            "bench",
            "--base-url",
            afd_server.base_url,
            "--dataset",
            "azure-code",
            "--num-prompts",
            "3",
            "--max-input-len",
            "40",
            "--max-output-len",
            "3",
            "--save-result",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0, capsys.readouterr()
    record = json.loads(out.read_text())
    assert record["completed"] == 3
    assert all(1 <= n <= 40 for n in record["input_lens"])
    assert all(1 <= n <= 3 for n in record["output_lens"])


def test_bench_reports_failures_and_bad_flags(capsys):
    with live_server(
        mode="aggregated", attention_workers=1, max_num_seqs=1, max_queue=1, max_model_len=32
    ) as srv:
        assert (
            main(
                [
                    "bench",
                    "--base-url",
                    srv.base_url,
                    "--random-input-len",
                    "30",
                    "--random-output-len",
                    "5",
                ]
            )
            == 2
        )
        assert "exceeds the server's max_model_len 32" in capsys.readouterr().err
        # the engine is held while 5 requests arrive at once: 1 takes the batch slot, 1 is
        # queued beyond it, 3 get 429
        with srv.held_engine() as gate:
            threading.Timer(1.0, gate.set).start()
            rc = main(
                [
                    "bench",
                    "--base-url",
                    srv.base_url,
                    "--num-prompts",
                    "5",
                    "--random-input-len",
                    "4",
                    "--random-output-len",
                    "2",
                    "--disable-tqdm",
                ]
            )
        out = capsys.readouterr()
        assert rc == 1
        assert "Successful requests:                     2         " in out.out
        assert "Failed requests:                         3         " in out.out
        assert "HTTP 429" in out.err
        srv.wait_idle()
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 2
    assert "cannot read http://127.0.0.1:9/v1/models" in capsys.readouterr().err
    assert main(["bench", "--request-rate", "fast"]) == 2


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.mode, args.attention_workers, args.microbatches, args.ffn_workers) == (
        "afd",
        2,
        2,
        1,
    )
    assert (args.host, args.port, args.transport) == ("127.0.0.1", 8000, "local")
    from afdserve.server.cli import serve_config

    cfg = serve_config(args)
    assert cfg.model == "builtin:smollm2-135m-instruct" and cfg.is_afd  # a real model
    cfg = serve_config(
        build_parser().parse_args(["serve", "builtin:tiny-llama", "--mode", "aggregated"])
    )
    assert cfg.model == "builtin:tiny-llama" and not cfg.is_afd
    with pytest.raises(UserInputError, match="disagree"):
        serve_config(build_parser().parse_args(["serve", "a", "--model", "b"]))
    assert main(["serve", "--attention-workers", "0"]) == 2


def _free_port() -> int:
    from afdserve.transport.options import free_port

    return free_port()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_subprocess_answers_and_shuts_down_cleanly(sig):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "afdserve.cli",
            "serve",
            "--port",
            str(port),
            "--threads",
            "1",
            "--served-model-name",
            "m",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, 90, proc.stdout.read)
        r = httpx.post(
            url + "/v1/completions",
            json={"model": "m", "prompt": "hi", "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "AFD 2A1F, 2 microbatches" in out
    assert "engine stopped" in out and "Application shutdown complete" in out
    assert proc.returncode in (0, 130, -int(sig)), out
