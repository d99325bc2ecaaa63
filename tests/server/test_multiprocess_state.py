"""What the multi-process front reports to the server, without processes: AFD stats survive the
control plane exactly, malformed reports are refused with a reason, and a worker's status
report becomes the same `WorkerState` numbers the in-process engine gives (requests it has not
taken in yet count as waiting)."""

from __future__ import annotations

import json

import msgspec
import pytest

from afdserve.afd.stats import A2F, F2A, AFDStats, AFDStatsSnapshot
from afdserve.engine.scheduler import SchedulerCounters
from afdserve.launch import control
from afdserve.launch.messages import AttentionStatus, Heartbeat, Malformed
from afdserve.launch.remote_worker import RemoteWorker


def _recorded() -> AFDStatsSnapshot:
    s = AFDStats()
    s.record_transfer(A2F, 0, 3e-5, 1024)
    s.record_transfer(A2F, 0, 2.0, 512)  # the +Inf bucket
    s.record_transfer(F2A, 2, 1e-3, 256)
    s.record_ffn_batch(1, 0, 7)
    s.record_ffn_batch(1, 1, 100_000)
    s.add_active(1.5)
    s.add_idle(0.25)
    s.record_sync_timeout()
    s.record_step(5)
    s.record_step(20_000)  # the +Inf bucket
    return s.snapshot()


def test_snapshot_json_roundtrip_is_exact():
    snap = _recorded()
    back = AFDStatsSnapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert back.transfer_bytes == snap.transfer_bytes == {(A2F, 0): 1536, (F2A, 2): 256}
    assert {k: (h.counts, h.sum) for k, h in back.transfer_seconds.items()} == {
        k: (h.counts, h.sum) for k, h in snap.transfer_seconds.items()
    }
    assert {k: (h.counts, h.sum) for k, h in back.ffn_batch_tokens.items()} == {
        k: (h.counts, h.sum) for k, h in snap.ffn_batch_tokens.items()
    }
    assert back.transfer_seconds[(A2F, 0)].counts[-1] == 1
    assert (back.active_s, back.idle_s, back.sync_timeouts) == (1.5, 0.25, 1)
    assert back.busy_fraction == snap.busy_fraction
    assert back.step_tokens is not None and snap.step_tokens is not None
    assert (back.step_tokens.counts, back.step_tokens.sum) == (
        snap.step_tokens.counts,
        snap.step_tokens.sum,
    )
    assert back.step_tokens.count == 2 and back.step_tokens.counts[-1] == 1
    empty = AFDStatsSnapshot.from_dict(AFDStatsSnapshot().to_dict())
    assert empty == AFDStatsSnapshot()


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"active_s": -1}, "active_s"),
        ({"sync_timeouts": 1.5}, "sync_timeouts"),
        ({"transfers": [["sideways", 0, [0] * 20, 0.0, 0]]}, "direction"),
        ({"transfers": [["a2f", 0, [0] * 3, 0.0, 0]]}, "20 bucket counts"),
        ({"transfers": [["a2f", -1, [0] * 20, 0.0, 0]]}, "layer"),
        ({"ffn_batches": [[0, 0, [0] * 16]]}, "4-element"),
        ({"ffn_batches": "no"}, "ffn_batches"),
        ({"step_tokens": [[0] * 3, 0.0]}, "14 bucket counts"),
        ({"step_tokens": "no"}, "step_tokens"),
    ],
)
def test_malformed_snapshot_is_refused_with_the_field(patch, match):
    data = {**_recorded().to_dict(), **patch}
    with pytest.raises(ValueError, match=match):
        AFDStatsSnapshot.from_dict(data)
    with pytest.raises(ValueError, match="JSON object"):
        AFDStatsSnapshot.from_dict([1, 2])


def _status(**kw) -> AttentionStatus:
    base = dict(
        load=40,
        kv_usage=0.25,
        num_running=2,
        num_waiting=1,
        kv_blocks_used=4,
        kv_blocks_total=16,
        counters=SchedulerCounters(requests_added=3, generation_tokens=9),
    )
    return AttentionStatus(**{**base, **kw})


def test_status_report_and_requests_not_yet_taken_in():
    w = RemoteWorker(0)
    w.adds_sent = 5  # the front sent five adds; the worker reported three, refused one
    w.adds_failed = 1
    w.take_status(_status(), _recorded().to_dict())
    st = w.status
    assert (st.num_running, st.num_waiting, st.kv_blocks_used, st.kv_blocks_total) == (2, 1, 4, 16)
    assert st.kv_usage == 0.25 and st.counters.generation_tokens == 9
    assert w.unseen_adds() == 1
    assert w.afd.transfer_bytes[(A2F, 0)] == 1536
    kept = w.afd
    w.take_status(_status(counters=SchedulerCounters(requests_added=4)), None)  # the last stays
    assert w.unseen_adds() == 0 and w.afd is kept
    w.outstanding.update(a=10, b=7)
    assert w.load_score() == 17


@pytest.mark.parametrize(
    "status,afd",
    [
        (_status(num_running=-1), None),
        (_status(kv_blocks_total=-16), None),
        (_status(), {"active_s": "soon"}),
    ],
)
def test_malformed_status_changes_nothing(status, afd):
    w = RemoteWorker(1)
    w.take_status(_status(), None)
    before = (w.status, w.afd)
    with pytest.raises(ValueError):
        w.take_status(status, afd)
    assert (w.status, w.afd) == before


@pytest.mark.parametrize(
    "bad",
    [
        {"num_waiting": "2"},
        {"kv_usage": None},
        {"counters": {"requests_added": "x"}},
        {"counters": {"requests_added": 1.5}},
    ],
)
def test_status_of_the_wrong_types_never_reaches_the_front(bad):
    # the codec checks every field's type: such a report arrives as a Malformed, dropped
    good = msgspec.to_builtins(Heartbeat(0, "attention", _status()))
    frame = msgspec.msgpack.encode({**good, "status": {**good["status"], **bad}})
    assert isinstance(control.TO_FRONT.decode(frame), Malformed)
