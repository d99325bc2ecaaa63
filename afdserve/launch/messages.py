"""Every message of the control plane, declared once and used by both ends.

The control plane carries each worker's configuration and the requests to attention workers,
and token events and status back to the front (hidden states never travel here: they use the
data transports and the binary wire protocol). Each message is a msgspec Struct tagged by its `op`;
one `Codec` encodes them as MessagePack and decodes a frame into exactly one of the declared
types, checking every field's type, so a field that is added on one side cannot be dropped on
the other (the way top log-probabilities were when events were positional JSON lists).

Domain types travel as themselves: `SamplingParams` (its `__post_init__` checks run again on
decode), `EngineConfig` (likewise), `TokenEvent` (every field: token, logprob, top logprobs,
finish reason, the first token's queue and prefill times, and the prompt logprobs a first
event may carry, `PromptLogprob`s) and `SchedulerCounters`. AFD stats travel as
`AFDStatsSnapshot.to_dict()`, whose reader validates
them.

SCHEMA_VERSION is in `Configure` and in `Ready`: a worker of another version is refused by name,
not misread. (The Structs refuse unknown fields; msgspec decodes the domain
dataclasses leniently, ignoring keys they do not declare, which the version check covers.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from afdserve.afd.stats import AttentionStatus
from afdserve.config import EngineConfig
from afdserve.types import SamplingParams, TokenEvent

log = logging.getLogger(__name__)

SCHEMA_VERSION = 11
"""Bump when a message changes shape; both ends of a group must agree. (11:
`EngineConfig.max_attention_workers` and the data plane's `members` in `Configure` and
`Rejoin` (attention workers added at run time), which a worker of 10 would refuse or ignore.
10: the FFN failover:
`Rejoin.placement` and `absent`, `Configure.absent`, `Joining`, and `Placement.down` in every
placement dict, which a worker of 9 would ignore, sending frames to a dead FFN worker. 9:
`EngineConfig.enable_prefix_caching`, the prefix-cache counters in `SchedulerCounters` and
`StepOutputs.kv_stored`/`kv_removed`; the KV host tier's options, counters and
`AttentionStatus.kv_host_blocks_total`; `EngineConfig.kv_cache_dtype` in `Configure`, which a
worker of 8 would refuse as unknown. 8:
`Configure.transport_key`. 7: `AddRequest`'s
`generated`, which a worker of 6 would drop unread, restarting a migrated request; `Rejoin`. 3: `TokenEvent`'s
queue and prefill times and prompt logprobs, and SamplingParams' penalties, min_p, min_tokens,
logit_bias and prompt_logprobs, which a worker of 2 would drop unread. 4: SamplingParams'
`structured` output, which a worker of 3 would drop unread, answering a JSON schema with free
text.)"""

Role = Literal["attention", "ffn"]


class Fingerprint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What two workers (and a worker and its front) must agree on to serve one model."""

    model: str
    """The model directory's base name."""
    architecture: str
    layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    batch_invariant: bool

    def differences(self, other: Fingerprint) -> dict[str, Any]:
        """field -> (mine, theirs) where they differ."""
        return {
            k: (getattr(self, k), getattr(other, k))
            for k in self.__struct_fields__
            if getattr(self, k) != getattr(other, k)
        }


class _Message(msgspec.Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    pass


# -- front -> worker ----------------------------------------------------------------------------


class Configure(_Message, tag="configure"):
    """The first message a worker gets: the group's one EngineConfig (its `__post_init__`
    checks run again on decode), this worker's rank (ranks `attention_workers` and up are
    FFN workers) and where the front hosts the data transport's rendezvous store. A worker has no
    other source of configuration, so the workers of a group cannot disagree on it."""

    rank: int
    config: EngineConfig
    model: str
    """The model directory, as the front resolved it (the same path on every host)."""
    rendezvous: str
    """HOST:PORT of the store the front hosts for the data transport."""
    placement: dict[str, Any] | None = None
    """Expert parallelism: where each MoE layer's experts are (`Placement.to_dict`)."""
    epoch: int = 0
    """The data plane's incarnation (`TransportOptions.epoch`): a worker started in place of
    a dead one joins the group under the epoch the others rejoin at."""
    absent: tuple[int, ...] = ()
    """FFN ranks not in the data plane now (dead, their experts on the survivors: an FFN
    failover): an attention worker does not connect to them."""
    transport_key: bytes = b""
    """The group's secret for the data transport (`TransportOptions.auth_key`: tcp proves it on
    every connection), drawn once per group by the front; empty: none."""
    members: tuple[int, ...] = ()
    """The attention ranks in the data plane at `epoch` (the FFN workers connect to these
    only: a slot of `max_attention_workers` with no worker is not waited for); empty: every
    attention slot."""
    schema: int = SCHEMA_VERSION


class AddRequest(_Message, tag="add"):
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    seed: int
    """The request's sampling seed (the front draws one when params.seed is None)."""
    generated: tuple[int, ...] = ()
    """Tokens it already generated on an attention worker that died or stalled (a migration:
    `Request.generated`)."""


class Rejoin(_Message, tag="rejoin"):
    """To every worker but the one restarted in place of a dead one: close the data transport
    and connect again under `epoch`, as the new worker does; an attention worker in the middle
    of a step runs that step again once connected (launch/worker.py). Also sent when an
    attention worker joins at run time: `members` (the attention ranks of the new epoch's data
    plane) then names it too."""

    epoch: int
    members: tuple[int, ...] = ()
    """As `Configure.members`; empty: every attention slot."""
    placement: dict[str, Any] | None = None
    """An FFN failover: route by this placement from the step run again (its `down` FFN
    workers are sent nothing)."""
    absent: tuple[int, ...] = ()
    """FFN ranks left out of the new data plane (dead, failed over): not connected to."""


class Abort(_Message, tag="abort"):
    request_id: str


class Ping(_Message, tag="ping"):
    """The front is alive (sent every control.PING_S)."""


class Shutdown(_Message, tag="shutdown"):
    pass


class HoldExperts(_Message, tag="hold_experts"):
    """To an FFN worker (EPLB's re-placement): hold the experts `placement` gives it, loading
    those it lacks; `keep_others` keeps the ones it holds besides (phase 1: attention workers
    may still route by the old placement), false drops them (phase 3: none does any more).
    Answered with `ExpertsHeld` once the weights are in."""

    placement: dict[str, Any]
    keep_others: bool


class UsePlacement(_Message, tag="use_placement"):
    """To an attention worker (phase 2): route by `placement` from the next step on; answered
    with `PlacementInUse`."""

    placement: dict[str, Any]


# -- worker -> front ----------------------------------------------------------------------------


class Hello(_Message, tag="hello"):
    """A worker process that waits for its `Configure` says so every second: a front whose
    worker of that rank was already configured learns that it was started again (by hand, or by
    an outside supervisor) and takes it back into the group (a `Rejoin` for the others)."""

    rank: int
    pid: int


class Joining(_Message, tag="joining"):
    """A configured worker has loaded its part and connects the data plane under `epoch` now:
    a front that deferred the others' `Rejoin` for it (an FFN worker restarted while the
    survivors serve its experts) sends them now, so nobody waits for its model load."""

    rank: int
    epoch: int


class Ready(_Message, tag="ready"):
    """Sent once the worker's handshake and data transport are up."""

    rank: int
    role: Role
    pid: int
    fingerprint: Fingerprint
    schema: int = SCHEMA_VERSION
    max_model_len: int = 0
    """An attention worker's context limit (0 from the FFN worker)."""


class StepOutputs(_Message, tag="events"):
    """An attention worker's token events of one step, with its status after it."""

    rank: int
    status: AttentionStatus
    events: tuple[TokenEvent, ...]
    afd: dict[str, Any] | None = None
    """AFDStatsSnapshot.to_dict() of its FFN link, at most every STATS_EVERY_S."""
    expert_load: dict[int, list[int]] | None = None
    """Expert parallelism: the step's (token, slot) pairs per expert of each MoE layer."""
    kv_stored: tuple[bytes, ...] = ()
    """Prefix caching: keys of the blocks its cache stored during the step (in order)..."""
    kv_removed: tuple[bytes, ...] = ()
    """...and of those it evicted (the front mirrors the cache to route by it)."""


class Heartbeat(_Message, tag="heartbeat"):
    """An idle worker's report every HEARTBEAT_S: attention workers send their status, the FFN
    worker its AFD stats."""

    rank: int
    role: Role
    status: AttentionStatus | None = None
    afd: dict[str, Any] | None = None


class ExpertsHeld(_Message, tag="experts_held"):
    """An FFN worker holds the experts of placement `version` (after `HoldExperts`)."""

    rank: int
    version: int


class PlacementInUse(_Message, tag="placement_in_use"):
    """An attention worker routes by placement `version` from its next step on."""

    rank: int
    version: int


class Failed(_Message, tag="error"):
    """An error: fatal (the worker is exiting) or about one request (`request_id`), which the
    worker refused while it keeps serving."""

    rank: int
    role: Role
    message: str
    fatal: bool
    request_id: str | None = None


FrontMessage = (
    Configure | AddRequest | Abort | Ping | Shutdown | HoldExperts | UsePlacement | Rejoin
)
WorkerMessage = (
    Ready | StepOutputs | Heartbeat | Failed | ExpertsHeld | PlacementInUse | Hello | Joining
)


@dataclass(frozen=True)
class Malformed:
    """A frame that is not one of the expected messages (never sent: what `decode` returns in
    its place). `request_id` is set when the frame was an add whose id could be read,
    so the receiver can answer for that request instead of leaving it to hang."""

    error: str
    request_id: str | None = None


_ENCODER = msgspec.msgpack.Encoder()


def encode(msg: _Message) -> bytes:
    """Any message as one MessagePack frame."""
    return _ENCODER.encode(msg)


class Codec:
    """Decodes frames of one direction's messages (`FrontMessage` for a worker,
    `WorkerMessage` for the front)."""

    def __init__(self, accepts: Any) -> None:
        self._decoder = msgspec.msgpack.Decoder(accepts)

    def decode(self, frame: bytes) -> Any:
        """The message, or a `Malformed` (logged) when the frame is not one of the types this
        codec accepts or a field does not validate (SamplingParams' own checks included)."""
        try:
            return self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            # UserInputError (a ValueError) comes from a dataclass's __post_init__
            rid = _request_id(frame)
            log.warning("control: dropping a malformed message (%d bytes): %s", len(frame), exc)
            return Malformed(str(exc), rid)


def _request_id(frame: bytes) -> str | None:
    """The request id of an add frame that failed to validate, if it can be read."""
    try:
        raw = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    if isinstance(raw, dict) and raw.get("op") == "add":
        rid = raw.get("request_id")
        return rid if isinstance(rid, str) else None
    return None
