"""The operator's routes: an attention worker drained at run time gets no new request (what
it holds finishes there), /health names it, and it takes requests again once resumed;
attention workers are added in free slots and removed at run time."""

from __future__ import annotations

import time

from tests.server.conftest import SERVED, live_server
from tests.server.test_errors import _assert_error


def _owners(srv, n: int) -> list[int]:
    """Where n fresh requests go: added, routed, then aborted (the router's choice only)."""
    engine = srv.engine
    out = []
    for i in range(n):
        from afdserve.types import SamplingParams

        rid = f"probe-{i}-{id(out)}"
        out.append(engine.add_request(rid, [5, 6, 7], SamplingParams(max_tokens=64)))
    for i in range(n):
        engine.abort(f"probe-{i}-{id(out)}")
    return out


def test_a_drained_attention_worker_gets_no_new_request(afd_server):
    with afd_server.http() as h:
        assert h.get("/health").content == b""
        assert set(_owners(afd_server, 4)) == {0, 1}
        r = h.post("/admin/attention_workers/0/drain")
        assert r.status_code == 200 and r.json()["drained"] is True, r.text
        assert _owners(afd_server, 4) == [1, 1, 1, 1]
        health = h.get("/health").json()
        assert health["status"] == "degraded"
        assert health["problems"] == ["attention worker 0 drained (no new requests)"]
        # requests still complete, on the other worker
        body = {"model": SERVED, "prompt": "hi", "max_tokens": 3}
        assert h.post("/v1/completions", json=body).status_code == 200
        # the last worker taking requests cannot be drained; a bad rank is a 400
        _assert_error(h.post("/admin/attention_workers/1/drain"), 400, None)
        _assert_error(h.post("/admin/attention_workers/7/drain"), 400, None)
        listed = h.get("/admin/workers").json()
        assert [w["rank"] for w in listed["attention"]] == [0, 1]
        r = h.post("/admin/attention_workers/0/resume")
        assert r.status_code == 200 and r.json()["drained"] is False
        assert h.get("/health").content == b""
        assert set(_owners(afd_server, 4)) == {0, 1}


def _wait_healthy(h, give_up_s: float = 60.0) -> None:
    deadline = time.monotonic() + give_up_s
    while h.get("/health").content != b"":
        assert time.monotonic() < deadline, h.get("/health").text
        time.sleep(0.1)


def test_attention_workers_added_and_removed_over_http():
    """`POST /admin/attention_workers` starts a worker in a free slot of
    --max-attention-workers, `DELETE /admin/attention_workers/{rank}` stops a drained one; no
    free slot, a taken or empty slot, or a worker still holding requests is a 409, a bad rank
    a 400; the in-process engine refuses both with a 400."""
    with (
        live_server(
            mode="afd",
            attention_workers=1,
            max_attention_workers=2,
            microbatches=1,
            transport="shm",
            worker_threads=1,
        ) as srv,
        srv.http() as h,
    ):
        assert [w["rank"] for w in h.get("/admin/workers").json()["attention"]] == [0]
        r = h.post("/admin/attention_workers")
        assert r.status_code == 200 and r.json() == {"rank": 1, "added": True}, r.text
        assert (
            "no free attention slot"
            in _assert_error(h.post("/admin/attention_workers"), 409, None)["message"]
        )
        _assert_error(h.post("/admin/attention_workers?rank=0"), 409, None)
        _assert_error(h.post("/admin/attention_workers?rank=7"), 400, None)
        _wait_healthy(h)
        assert [w["rank"] for w in h.get("/admin/workers").json()["attention"]] == [0, 1]
        assert 1 in _owners(srv, 2)  # the new, empty worker takes new requests
        body = {"model": SERVED, "prompt": "hi", "max_tokens": 3}
        assert h.post("/v1/completions", json=body).status_code == 200
        _assert_error(h.delete("/admin/attention_workers/7"), 400, None)
        assert h.post("/admin/attention_workers/1/drain").status_code == 200
        srv.wait_idle()
        r = h.delete("/admin/attention_workers/1")
        assert r.status_code == 200 and r.json()["removed"] is True, r.text
        _assert_error(h.delete("/admin/attention_workers/1"), 409, None)  # empty now
        _assert_error(h.delete("/admin/attention_workers/0"), 409, None)  # the last one
        assert [w["rank"] for w in h.get("/admin/workers").json()["attention"]] == [0]
        assert h.get("/health").content == b""
        assert h.post("/v1/completions", json=body).status_code == 200


def test_in_process_engine_refuses_to_add_or_remove_workers(afd_server):
    with afd_server.http() as h:
        assert (
            "cannot add" in _assert_error(h.post("/admin/attention_workers"), 400, None)["message"]
        )
        _assert_error(h.delete("/admin/attention_workers/1"), 400, None)
