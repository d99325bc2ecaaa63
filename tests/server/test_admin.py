"""The operator's routes: an attention worker drained at run time gets no new request (what
it holds finishes there), /health names it, and it takes requests again once resumed."""

from __future__ import annotations

from tests.server.conftest import SERVED
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
