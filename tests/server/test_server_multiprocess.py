"""`afdserve serve --transport shm`: the server over worker processes (2 attention, 1 FFN).

One real `afdserve serve` subprocess on 127.0.0.1 serves the whole module (each multi-process
start costs seconds on a small machine). The official `openai` client gets the offline
engine's greedy tokens, /metrics shows per-worker load and AFD metrics shipped from the worker
processes, a disconnect frees the workers' KV blocks, /health turns 503 once the FFN worker
process is killed, a burst into free batch slots is admitted whole, and SIGINT leaves no worker
process and no shared memory behind. The tests
run in file order; the destructive ones come last.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import MODEL, SERVED, wait_until_healthy

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds worker processes through /proc"
)

START_DEADLINE_S = 180.0
PROMPTS: list[Any] = [
    "Hello there",
    [72, 101, 108, 108, 111, 32, 119],
    "The quick brown fox jumps over",
    [5, 9, 200, 17],
]


@dataclass
class MPServer:
    proc: subprocess.Popen
    base_url: str
    log: Path
    attention_pids: list[int]
    ffn_pid: int

    @property
    def worker_pids(self) -> list[int]:
        return [*self.attention_pids, self.ffn_pid]

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60
        )

    def http(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kw.pop("timeout", 60), **kw)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _free_port() -> int:
    from afdserve.transport.options import free_port

    return free_port()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _segments_of(pids: list[int]) -> list[str]:
    """/dev/shm ring files created by any of `pids` (the shm transport names them by creator)."""
    from afdserve.transport.shm_segments import SEGMENT_RE

    found = []
    for name in os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else ():
        m = SEGMENT_RE.match(name)
        if m is not None and int(m.group(1)) in pids:
            found.append(name)
    return found


@pytest.fixture(scope="module")
def mp_server(tmp_path_factory: pytest.TempPathFactory):
    port = _free_port()
    log = tmp_path_factory.mktemp("mp-server") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "afdserve.cli",
                "serve",
                MODEL,
                "--transport",
                "shm",
                "--attention-workers",
                "2",
                "--microbatches",
                "2",
                "--threads",
                "1",
                "--port",
                str(port),
                "--served-model-name",
                SERVED,
                # 8 batch slots per attention worker, 1 request may wait beyond them
                "--max-num-seqs",
                "8",
                "--max-queue",
                "1",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    workers: list[int] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, START_DEADLINE_S, lambda: log.read_text(errors="replace"))
        cmds = {pid: _cmdline(pid) for pid in _children(proc.pid)}
        cmds = {pid: c for pid, c in cmds.items() if "worker" in c}
        workers = list(cmds)
        ranks = {pid: int(_flag(c, "--rank")) for pid, c in cmds.items()}  # r = 2: FFN is 2
        attention = sorted((p for p in workers if ranks[p] < 2), key=ranks.__getitem__)
        ffn = [p for p in workers if ranks[p] == 2]
        assert len(attention) == 2 and len(ffn) == 1, cmds
        yield MPServer(proc, url, log, attention, ffn[0])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in workers:  # whatever the tests did, leave no worker running
            if _alive(pid) and "worker" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


def _scrape(srv: MPServer) -> dict[tuple[str, tuple], float]:
    with srv.http() as h:
        resp = h.get("/metrics")
    assert resp.status_code == 200
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


def _total(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def _wait_metrics(srv: MPServer, ok, what: str, deadline_s: float = 20.0) -> dict:
    """Scrape until `ok(metrics)`: worker reports reach the front within about a second."""
    end = time.monotonic() + deadline_s
    while True:
        m = _scrape(srv)
        if ok(m):
            return m
        if time.monotonic() > end:
            raise AssertionError(f"{what} not seen within {deadline_s}s")
        time.sleep(0.1)


def _idle(m: dict) -> bool:
    return (
        _total(m, "vllm:num_requests_running") == 0
        and _total(m, "vllm:num_requests_waiting") == 0
        and _total(m, "vllm:kv_cache_usage_perc") == 0
    )


def _settled(srv: MPServer, deadline_s: float = 30.0) -> dict:
    """Metrics of an idle server once the workers' last reports are in: two scrapes a few
    heartbeats apart agree (the FFN worker reports its AFD stats once a second)."""
    end = time.monotonic() + deadline_s
    m = _wait_metrics(srv, _idle, "an idle server", deadline_s)
    while True:
        time.sleep(2.5)
        again = _scrape(srv)
        if _idle(again) and _afd_part(again) == _afd_part(m):
            return again
        assert time.monotonic() < end, f"AFD metrics still moving after {deadline_s}s"
        m = again


def _afd_part(m: dict) -> dict:
    names = ("afdserve:afd_transfer_bytes_total", "afdserve:ffn_batch_tokens_sum")
    return {k: v for k, v in m.items() if k[0] in names}


def _complete(srv: MPServer, prompt: Any, stream: bool) -> tuple[list[int], str, Any]:
    """(token ids, text, usage) of one greedy completion through the openai client."""
    client = srv.openai()
    kw: dict[str, Any] = dict(
        model=SERVED,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    if not stream:
        (choice,) = (resp := client.completions.create(**kw)).choices
        assert choice.finish_reason == "length"
        return list(choice.model_extra["token_ids"]), choice.text, resp.usage
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    token_chunks = [c for c in chunks if c.choices]
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    ids = [t for c in token_chunks for t in c.choices[0].model_extra["token_ids"]]
    return ids, "".join(c.choices[0].text for c in token_chunks), chunks[-1].usage


def test_completions_equal_offline_greedy(mp_server, oracle):
    jobs = [(p, stream) for p in PROMPTS for stream in (False, True)]
    with ThreadPoolExecutor(4) as pool:  # concurrent, so both attention workers serve some
        results = list(pool.map(lambda j: _complete(mp_server, *j), jobs))
    for (prompt, stream), (ids, text, usage) in zip(jobs, results, strict=True):
        want = oracle(prompt, max_tokens=10, temperature=0, ignore_eos=True)
        assert ids == want.token_ids, (prompt, stream)
        assert text == want.text, (prompt, stream)
        assert usage.completion_tokens == 10
        assert usage.prompt_tokens == len(want.prompt_token_ids)
    with mp_server.http() as h:
        card = h.get("/v1/models").json()["data"][0]
    assert card["id"] == SERVED and card["vocab_size"] == 384 and card["max_model_len"] > 0


def test_metrics_come_from_the_worker_processes(mp_server):
    srv = mp_server
    before = _settled(srv)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34], [41, 42]]

    def send(p: list[int]) -> dict:
        with srv.http() as h:
            body = {"model": SERVED, "prompt": p, "max_tokens": 12, "ignore_eos": True}
            return h.post("/v1/completions", json=body).json()

    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(send, prompts))
    assert all(r["usage"]["completion_tokens"] == 12 for r in results), results
    # every layer processes each prompt token and each generated token but the last, once
    tokens = sum(len(p) for p in prompts) + 11 * len(prompts)
    hidden_bytes = 64 * 4  # the tiny model's hidden size, float32

    def moved(m: dict, name: str, **labels: str) -> float:
        return _total(m, name, **labels) - _total(before, name, **labels)

    def afd_reported(m: dict) -> bool:
        # attention stats ride on events messages (every 0.5 s) and heartbeats, the FFN's on
        # its heartbeat (every second): wait until the final ones arrived
        return (
            _idle(m)
            and moved(m, "afdserve:ffn_batch_tokens_sum", layer="2") == tokens
            and all(
                moved(m, "afdserve:afd_transfer_bytes_total", direction=d, layer="2")
                == tokens * hidden_bytes
                for d in ("a2f", "f2a")
            )
        )

    after = _wait_metrics(srv, afd_reported, "the final AFD stats from every worker")
    # the schedulers' counters, reported by the attention worker processes, moved exactly
    assert moved(after, "vllm:prompt_tokens_total") == sum(len(p) for p in prompts)
    assert moved(after, "vllm:generation_tokens_total") == 12 * len(prompts)
    # the schedulers' queue and prefill times crossed with each first token, and the tokens
    # of every attention-worker step with their AFD stats
    for phase in ("queue", "prefill", "decode", "inference"):
        assert moved(after, f"vllm:request_{phase}_time_seconds_count") == len(prompts), phase
    assert moved(after, "vllm:request_prefill_time_seconds_sum") > 0
    assert moved(after, "vllm:iteration_tokens_total_sum") == tokens
    routed = [moved(after, "afdserve:router_requests_total", worker=str(k)) for k in range(2)]
    assert sum(routed) == len(prompts) and min(routed) >= 1, routed
    for k in range(2):  # per-worker gauges exist for both workers
        assert ("afdserve:worker_load", (("worker", str(k)),)) in after
        assert ("afdserve:worker_kv_cache_usage_perc", (("worker", str(k)),)) in after
    # AFD: every layer's activations crossed both ways, and the FFN batched them
    layers = sorted(
        {dict(ls)["layer"] for (n, ls) in after if n == "afdserve:afd_transfer_bytes_total"}
    )
    assert layers == ["0", "1", "2"]  # the tiny model's 3 layers
    for layer in layers:
        assert moved(after, "afdserve:ffn_batch_tokens_sum", layer=layer) == tokens
        assert 0 < moved(after, "afdserve:ffn_batch_tokens_count", layer=layer) <= tokens
        for d in ("a2f", "f2a"):
            sent = moved(after, "afdserve:afd_transfer_bytes_total", direction=d, layer=layer)
            assert sent == tokens * hidden_bytes
            assert moved(after, "afdserve:afd_transfer_seconds_count", direction=d, layer=layer) > 0
    for name, workers in (
        ("afdserve:attention_busy_seconds_total", ("0", "1")),
        ("afdserve:attention_idle_seconds_total", ("0", "1")),
        ("afdserve:ffn_busy_seconds_total", ("0",)),
    ):
        for w in workers:
            assert moved(after, name, worker=w) > 0, (name, w)
    assert _total(after, "afdserve:afd_attention_ratio") == 2
    assert _total(after, "afdserve:afd_microbatches") == 2
    assert _total(after, "afdserve:healthy") == 1


def test_load_shows_per_worker_and_disconnect_frees_worker_kv(mp_server):
    srv = mp_server
    _wait_metrics(srv, _idle, "an idle server")
    body = {"model": SERVED, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=srv.base_url, timeout=60) as c0,
        httpx.Client(base_url=srv.base_url, timeout=60) as c1,
    ):
        s0 = c0.stream("POST", "/v1/completions", json={**body, "prompt": [65, 66, 67]})
        s1 = c1.stream("POST", "/v1/completions", json={**body, "prompt": [68, 69, 70]})
        with s0 as r0, s1 as r1:
            # keep the line iterators: a dropped one closes its response (a disconnect)
            lines = [r0.iter_lines(), r1.iter_lines()]
            for r, it in zip((r0, r1), lines, strict=True):
                assert r.status_code == 200
                assert next(it).startswith("data: {")
            # both streams are generating: each worker holds one request and its KV blocks
            busy = _wait_metrics(
                srv,
                lambda m: all(
                    _total(m, name, worker=str(k)) > 0
                    for name in ("afdserve:worker_load", "afdserve:worker_kv_cache_usage_perc")
                    for k in range(2)
                ),
                "load on both workers",
            )
            assert _total(busy, "vllm:num_requests_running") == 2
        # leaving the blocks closes both half-read responses: the clients went away
    after = _wait_metrics(srv, _idle, "KV freed in the workers after the disconnect")
    assert all(_total(after, "afdserve:worker_load", worker=str(k)) == 0 for k in range(2))
    generated = _total(after, "vllm:generation_tokens_total")
    time.sleep(1.5)  # a heartbeat later, nothing has run
    assert _total(_scrape(srv), "vllm:generation_tokens_total") == generated
    assert generated < 2 * 1500


def test_a_burst_into_free_batch_slots_is_admitted(mp_server):
    # 12 requests at once into 2 x 8 free batch slots with --max-queue 1, while the attention
    # worker processes are stopped (SIGSTOP), so that none of the adds has been reported: they
    # are within the slots and will run as soon as the workers read them, so none is refused
    # (counting unreported adds as waiting, all but the first were a 429)
    srv = mp_server
    n = 12

    def send(i: int) -> httpx.Response:
        with srv.http() as h:
            body = {"model": SERVED, "prompt": [10 + i] * 8, "max_tokens": 2, "ignore_eos": True}
            return h.post("/v1/completions", json=body)

    _wait_metrics(srv, _idle, "an idle server")
    for pid in srv.attention_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(send, i) for i in range(n)]
            # every request answered (a 429) or added, unread, to a stopped worker
            _wait_metrics(
                srv,
                lambda m: (
                    _total(m, "vllm:num_requests_waiting") + sum(f.done() for f in futures) == n
                ),
                "every request of the burst admitted or refused",
            )
            for pid in srv.attention_pids:
                os.kill(pid, signal.SIGCONT)
            responses = [f.result(timeout=60) for f in futures]
    finally:
        for pid in srv.attention_pids:
            os.kill(pid, signal.SIGCONT)
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r in responses)
    _wait_metrics(srv, _idle, "an idle server after the burst")


def test_streams_survive_the_ffn_worker_dying(mp_server, oracle):
    """SIGKILL of the FFN worker under streaming load: /health turns degraded (naming it) and
    back, the front restarts it, and every stream ends normally ([DONE], finish_reason length)
    with the offline greedy tokens: the attention workers kept their KV and ran the step
    again."""
    srv = mp_server
    n = 120
    client = srv.openai()
    kw: dict[str, Any] = dict(
        model=SERVED,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    streams = [client.completions.create(prompt=p, **kw) for p in PROMPTS[:4]]
    got: list[list[int]] = [[] for _ in streams]
    reasons: list[str | None] = [None] * len(streams)

    def read(i: int) -> None:
        for c in streams[i]:
            if c.choices:
                got[i].extend(c.choices[0].model_extra["token_ids"])
                reasons[i] = c.choices[0].finish_reason

    with ThreadPoolExecutor(len(streams)) as pool:
        futures = [pool.submit(read, i) for i in range(len(streams))]
        deadline = time.monotonic() + 60
        while min(map(len, got)) < 3:  # every stream has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(srv.ffn_pid, signal.SIGKILL)
        seen_degraded = False
        with srv.http() as h:
            while not all(f.done() for f in futures):
                assert time.monotonic() < deadline, "streams did not finish"
                resp = h.get("/health")
                assert resp.status_code == 200, resp.text  # degraded, never down
                if resp.content:
                    seen_degraded = seen_degraded or resp.json()["status"] == "degraded"
                time.sleep(0.05)
            for f in futures:
                f.result()
            while h.get("/health").content:  # healthy again: 200 with no body
                assert time.monotonic() < deadline, "still degraded after the restart"
                time.sleep(0.1)
    for prompt, ids, why in zip(PROMPTS[:4], got, reasons, strict=True):
        assert why == "length"
        assert ids == oracle(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids
    assert seen_degraded  # the restart takes a model load: seconds of degraded /health
    after = _scrape(srv)
    assert _total(after, "afdserve:healthy") == 1
    assert _total(after, "afdserve:worker_restarts_total") == 1
    assert _total(after, "afdserve:requests_migrated_total") == 0  # the FFN side holds no state


def test_sigint_stops_every_worker_and_leaves_no_shared_memory(mp_server):
    srv = mp_server
    pids = srv.worker_pids
    assert any(_alive(p) for p in pids)  # the attention workers still run
    srv.proc.send_signal(signal.SIGINT)
    srv.proc.wait(60)
    out = srv.output()
    assert srv.proc.returncode in (0, 130, -signal.SIGINT), out
    assert "engine stopped" in out and "Application shutdown complete" in out, out
    assert not [p for p in pids if _alive(p)], "worker processes outlived the server"
    assert not _segments_of(pids), f"leftover shared memory: {_segments_of(pids)}"
    assert re.search(r"2 attention and 1 FFN worker processes over shm", out), out


def test_serve_exits_for_its_supervisor_once_the_engine_failed_for_good(tmp_path):
    """With no restart left, an FFN worker's death fails the group: `afdserve serve` answers
    503 a moment, then exits with ENGINE_FAILED (3) and leaves no worker behind, so that a
    supervisor restarts the whole group rather than keep a server that answers 503 for ever."""
    from afdserve.server.cli import ENGINE_FAILED

    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "afdserve.cli", "serve", MODEL, "--transport", "shm"]
    cmd += ["--attention-workers", "1", "--max-restarts", "0", "--port", str(port)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc, START_DEADLINE_S, lambda: log.read_text(errors="replace"))
        workers = _children(proc.pid)
        ffn = [p for p in workers if int(_flag(_cmdline(p), "--rank")) == 1]
        os.kill(ffn[0], signal.SIGKILL)
        assert proc.wait(60) == ENGINE_FAILED, log.read_text(errors="replace")
        assert not any(_alive(p) for p in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
