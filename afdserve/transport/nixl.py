"""`nixl`: NIXL (UCX backend) one-sided writes into pre-registered slots, optional extra.

Each endpoint creates one NIXL agent (progress thread off: whoever waits drives UCX progress,
see pump.PumpedTransport) and registers two regions with it: an inbound region of `num_slots`
slots of `slot_bytes` per peer, which peers write into, and an outbound staging region of the
same shape. The agent's metadata and the address of each peer's inbound slots are exchanged
through the rendezvous store, then a store barrier makes sure every agent knows every other
before the constructor returns.

- A frame up to `inline_bytes` travels whole as a NIXL notification (FRAME).
- A larger frame first sends its prefix as a notification (STREAM, with a per-peer frame
  number), then its tensor bytes chunk by chunk: copy into a free outbound slot, NIXL WRITE into
  the peer's matching inbound slot with a CHUNK notification (delivered after the data lands);
  the receiver copies the chunk out into the received tensor and answers ACK(slot), which frees
  the slot for the sender. Slots are memory `device` ("cpu": DRAM, "cuda": VRAM).

recv returns a tensor the caller owns (copied out of the slot). The package is optional: if
neither `nixl` nor `nixl_cu12`/`nixl_cu13` imports, constructing this transport raises a
UserInputError saying how to install it.
"""

from __future__ import annotations

import importlib
import logging
import struct
import threading
import time
from dataclasses import dataclass
from types import ModuleType

import torch

from afdserve.errors import ProtocolError, TransportTimeout, UserInputError
from afdserve.transport.base import PeerUnreachable
from afdserve.transport.buffers import RecvBufferPool
from afdserve.transport.codec import decode, encode_parts, encode_prefix
from afdserve.transport.message import Message
from afdserve.transport.options import TransportOptions, check_positive
from afdserve.transport.protocol import FrameHeader, decode_header, decode_parts
from afdserve.transport.pump import PumpedTransport
from afdserve.transport.rendezvous import Rendezvous
from afdserve.transport.tensor_bytes import tensor_u8

log = logging.getLogger(__name__)

FRAME, STREAM, CHUNK, ACK, BYE = 1, 2, 3, 4, 5
_STREAM = struct.Struct("<BQ")  # kind, frame number (+ prefix)
_CHUNK = struct.Struct("<BQIQQ")  # kind, frame number, slot, offset, bytes
_ACK = struct.Struct("<BI")  # kind, slot
_SLOTS = struct.Struct("<QIQ")  # inbound base address for one sender, slots, slot bytes
_NIXL_MODULES = ("nixl", "nixl_cu12", "nixl_cu13")


def import_nixl() -> ModuleType:
    """The NIXL Python API module, or UserInputError with install instructions."""
    errors = []
    for name in _NIXL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        if hasattr(mod, "nixl_agent"):
            return mod
        try:  # the `nixl` meta package re-exports the API from its _api module
            return importlib.import_module(f"{name}._api")
        except ImportError as e:
            errors.append(f"{name}._api: {e}")
    raise UserInputError(
        "the nixl transport needs NIXL's Python package: `pip install --no-deps nixl-cu12` "
        f"(or the `nixl` extra of afdserve); import failed: {'; '.join(errors)}"
    )


def nixl_available() -> bool:
    try:
        import_nixl()
    except UserInputError:
        return False
    return True


@dataclass(frozen=True)
class NixlOptions(TransportOptions):
    slot_bytes: int = 4 << 20
    """Size of one transfer slot; frames larger than this go in several chunks."""
    num_slots: int = 4
    """Slots per peer and direction (chunks in flight to one peer)."""
    inline_bytes: int = 16 << 10
    """Frames up to this size travel whole inside one NIXL notification."""
    device: str = "cpu"
    """Where the registered slots live: "cpu" (DRAM) or "cuda" (VRAM of the current CUDA device,
    which a worker sets from its --device before building the transport)."""
    backend: str = "UCX"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rendezvous:
            raise UserInputError(
                "the nixl transport needs `rendezvous` (HOST:PORT of rank 0's store)"
            )
        for name in ("slot_bytes", "num_slots", "inline_bytes"):
            check_positive(name, getattr(self, name), integer=True)
        if self.device not in ("cpu", "cuda"):
            raise UserInputError(f"nixl device must be 'cpu' or 'cuda', got {self.device!r}")


class _Inbound:
    """A frame from one peer being assembled from chunks."""

    def __init__(self, header: FrameHeader, prefix: bytes, dest: torch.Tensor) -> None:
        self.header, self.prefix, self.dest, self.filled = header, prefix, dest, 0


class NixlTransport(PumpedTransport):
    def __init__(
        self, rank: int, world_size: int, options: NixlOptions | None = None, **kwargs: object
    ) -> None:
        opts = options if options is not None else NixlOptions(**kwargs)  # type: ignore[arg-type]
        self.peers = opts.peer_ranks(rank, world_size)
        nixl = import_nixl()
        if opts.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("nixl device 'cuda' needs a CUDA device")
        super().__init__(rank, world_size)
        self.options = opts
        self.spin_s = opts.spin_s
        self._pool = RecvBufferPool()
        self._agent_lock = threading.Lock()  # every call into the agent
        self._rdv: Rendezvous | None = None
        self._agent = None
        self._regs: list = []
        self._pending: list = []  # posted transfer handles, released when done
        self._next_frame = dict.fromkeys(self.peers, 0)
        self._free = {
            p: set(range(opts.num_slots)) for p in self.peers
        }  # outbound slots usable per peer
        self._send_locks = {p: threading.Lock() for p in self.peers}
        self._inbound: dict[tuple[int, int], _Inbound] = {}
        self._early: dict[
            tuple[int, int], list[tuple[int, int, int]]
        ] = {}  # chunks before their STREAM
        self._names: dict[int, str] = {}
        self._dead: dict[int, str] = {}  # peer -> why NIXL considers it gone
        self._rank_of: dict[str, int] = {}
        self._remote_slots: dict[int, int] = {}
        try:
            self._setup(nixl, time.monotonic() + opts.connect_timeout_s)
        except BaseException:
            self._teardown()
            self._abandon()
            raise
        self._start_pump(f"afd-nixl-pump-{rank}")

    def _setup(self, nixl: ModuleType, deadline: float) -> None:
        opts, rank = self.options, self.rank
        per_region = len(self.peers) * opts.num_slots * opts.slot_bytes
        dev = torch.device(opts.device)
        self._rx = torch.zeros(
            per_region, dtype=torch.uint8, device=dev
        )  # [peers * slots * slot_bytes]
        self._tx = torch.zeros(per_region, dtype=torch.uint8, device=dev)
        mem = "DRAM" if opts.device == "cpu" else "VRAM"
        dev_id = 0 if opts.device == "cpu" else self._rx.get_device()
        self._mem, self._dev_id = mem, dev_id
        self._on_gpu = opts.device == "cuda"
        config = nixl.nixl_agent_config(
            enable_prog_thread=False,
            enable_listen_thread=False,
            backends=[opts.backend],
            sync_mode=nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
        )
        self._name = f"afdserve-{rank}"
        self._agent = nixl.nixl_agent(self._name, config)
        if opts.backend not in self._agent.backends:
            raise UserInputError(
                f"NIXL has no {opts.backend} backend here (plugins: {self._agent.get_plugin_list()})"
            )
        for region in (self._rx, self._tx):
            descs = self._agent.register_memory(
                [(region.data_ptr(), region.numel(), dev_id, "")], mem
            )
            self._regs.append(descs)
        self._rdv = Rendezvous(
            opts.rendezvous,
            rank,
            self.world_size,
            opts.connect_timeout_s,
            f"afd/nixl/e{opts.epoch}",
            host_store=not opts.external_store,
        )
        self._rdv.publish(f"md/{rank}", self._agent.get_agent_metadata())
        for i, p in enumerate(self.peers):
            base = self._rx.data_ptr() + i * opts.num_slots * opts.slot_bytes
            self._rdv.publish(
                f"slots/{rank}/{p}", _SLOTS.pack(base, opts.num_slots, opts.slot_bytes)
            )
        for p in self.peers:
            name = self._agent.add_remote_agent(self._rdv.lookup(f"md/{p}", deadline))
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._names[p], self._rank_of[name] = name, p
            base, slots, size = _SLOTS.unpack(self._rdv.lookup(f"slots/{p}/{rank}", deadline))
            if slots != opts.num_slots or size != opts.slot_bytes:
                raise UserInputError(
                    f"nixl rank {p} uses {slots} slots of {size} bytes, rank {rank} {opts.num_slots} of "
                    f"{opts.slot_bytes}: every rank needs the same slot options"
                )
            self._remote_slots[p] = base
        self._rdv.publish(f"ready/{rank}", b"1")
        for p in self.peers:
            self._rdv.lookup(f"ready/{p}", deadline)

    # -- sending -------------------------------------------------------------------------------

    def send(self, dst: int, msg: Message) -> None:
        """Send `msg` to dst. Small frames go as one notification; larger ones return once their
        last chunk is posted (each chunk is first copied into a registered slot, so the tensor
        may be reused after send returns). TransportTimeout if dst frees no slot in time."""
        self._check_open()
        if dst not in self._names:
            raise ValueError(f"rank {self.rank} cannot send to {dst}: peers are {list(self.peers)}")
        t = msg.tensor
        if (
            t is not None
            and t.is_cuda
            and self.carries(t.device)
            and t.nbytes >= self.options.inline_bytes
        ):
            # stay on the GPU: slot copies are device-to-device (no staging through host);
            # smaller tensors go inline in a notification, through host memory
            prefix = encode_prefix(msg, sender=self.rank)
            src = tensor_u8(t, device=None)  # [n] on the GPU
            n = src.numel()
            self.options.check_frame_len(len(prefix) + n, dst)
        else:
            prefix, payload = encode_parts(msg, sender=self.rank)
            n = len(payload)
            self.options.check_frame_len(len(prefix) + n, dst)
            if 1 + len(prefix) + n <= self.options.inline_bytes:
                self._notify(dst, bytes([FRAME]) + prefix + bytes(payload))
                return
            src = torch.frombuffer(payload, dtype=torch.uint8) if n else None  # [n], host bytes
        slot_bytes = self.options.slot_bytes
        deadline = time.monotonic() + self.options.send_timeout_s
        with self._send_locks[dst]:
            frame = self._next_frame[dst]
            self._next_frame[dst] = frame + 1
            self._notify(dst, _STREAM.pack(STREAM, frame) + prefix)
            off = 0
            while off < n:
                slot = self._wait_for(lambda: self._take_slot(dst), deadline)
                if slot is None:
                    raise TransportTimeout(
                        f"nixl rank {self.rank}: rank {dst} freed no slot for {self.options.send_timeout_s:.1f}s"
                    )
                k = min(slot_bytes, n - off)
                local = self._slot_offset(dst, slot)
                self._tx[local : local + k].copy_(src[off : off + k])
                if self._on_gpu:  # the slot must be whole before NIXL reads it
                    torch.cuda.synchronize(self._tx.device)
                remote = self._remote_slots[dst] + slot * slot_bytes
                notif = _CHUNK.pack(CHUNK, frame, slot, off, k)
                with self._agent_lock:
                    ag = self._agent
                    handle = ag.initialize_xfer(
                        "WRITE",
                        ag.get_xfer_descs(
                            [(self._tx.data_ptr() + local, k, self._dev_id)], self._mem
                        ),
                        ag.get_xfer_descs([(remote, k, self._dev_id)], self._mem),
                        self._names[dst],
                        notif,
                    )
                    state = ag.transfer(handle)
                    if state == "ERR":
                        handle.release()
                        raise TransportTimeout(
                            f"nixl rank {self.rank}: posting a write to rank {dst} failed"
                        )
                    self._pending.append(handle)
                off += k

    def carries(self, device: torch.device) -> bool:
        """VRAM slots carry tensors of this endpoint's GPU as they are; DRAM slots host memory."""
        if self._on_gpu:
            return device.type == "cuda" and device.index in (None, self._rx.get_device())
        return device.type == "cpu"

    def _peer_gone(self, peer: int) -> str | None:
        return self._dead.get(peer)

    def _take_slot(self, dst: int) -> int | None:
        if dst in self._dead:
            raise PeerUnreachable(
                f"nixl rank {self.rank}: rank {dst} is unreachable ({self._dead[dst]})"
            )
        free = self._free[dst]
        return free.pop() if free else None

    def _slot_offset(self, peer: int, slot: int) -> int:
        return (self.peers.index(peer) * self.options.num_slots + slot) * self.options.slot_bytes

    def _notify(self, dst: int, data: bytes) -> None:
        """One notification to dst; PeerUnreachable if NIXL reports it gone (or fails to send)."""
        if dst in self._dead:
            raise PeerUnreachable(
                f"nixl rank {self.rank}: rank {dst} is unreachable ({self._dead[dst]})"
            )
        try:
            with self._agent_lock:
                self._agent.send_notif(self._names[dst], data)
        except (
            Exception
        ) as e:  # nixl's errors derive from Exception only (nixlRemoteDisconnectError, ...)
            self._dead[dst] = f"{type(e).__name__}: {e}"
            raise PeerUnreachable(
                f"nixl rank {self.rank}: rank {dst} is unreachable ({self._dead[dst]})"
            ) from None

    # -- receiving (pump lock held) ------------------------------------------------------------

    def _drain(self) -> int:
        with self._agent_lock:
            if self._agent is None:
                return 0
            notifs = self._agent.get_new_notifs()
            still = []
            for h in self._pending:  # progress our writes; release the finished ones
                state = self._agent.check_xfer_state(h)
                if state == "PROC":
                    still.append(h)
                else:
                    if state == "ERR":
                        log.warning("nixl rank %d: a write failed (peer gone?)", self.rank)
                    h.release()
            self._pending = still
        handled = 0
        for name, msgs in notifs.items():
            src = self._rank_of.get(name.decode() if isinstance(name, bytes) else name)
            for data in msgs:
                handled += 1
                if src is None:
                    self._drop(f"notification from unknown agent {name!r}")
                    continue
                try:
                    self._handle(src, bytes(data))
                except ProtocolError as e:
                    self._drop(f"from rank {src}: {e}")
                except Exception as e:  # a bug, not bad input: it must not kill the pump
                    self._drop(f"from rank {src}", e)
        return handled

    def _handle(self, src: int, data: bytes) -> None:
        if not data:
            raise ProtocolError("empty notification")
        kind = data[0]
        if kind == FRAME:
            if len(data) - 1 > self.options.max_frame_bytes:
                raise ProtocolError(
                    f"a frame of {len(data) - 1} bytes exceeds max_frame_bytes "
                    f"({self.options.max_frame_bytes})"
                )
            self._deliver(src, decode(memoryview(data)[1:]))
        elif kind == STREAM:
            if len(data) < _STREAM.size:
                raise ProtocolError("malformed STREAM")
            _, frame = _STREAM.unpack_from(data)
            prefix = data[_STREAM.size :]
            header = decode_header(prefix, self.options.max_frame_bytes)  # before allocating
            if len(prefix) != header.prefix_len or not header.tensor_nbytes:
                raise ProtocolError("STREAM prefix does not fit its header")
            if self.options.device == "cpu":
                dest = torch.from_numpy(self._pool.take(header.tensor_nbytes))
            else:
                dest = torch.empty(header.tensor_nbytes, dtype=torch.uint8, device=self._rx.device)
            self._inbound[(src, frame)] = _Inbound(header, prefix, dest)
            for chunk in self._early.pop((src, frame), []):
                self._on_chunk(src, frame, *chunk)
        elif kind == CHUNK:
            if len(data) != _CHUNK.size:
                raise ProtocolError("malformed CHUNK")
            _, frame, slot, off, n = _CHUNK.unpack(data)
            if slot >= self.options.num_slots or not 0 < n <= self.options.slot_bytes:
                self._ack(src, slot)
                raise ProtocolError(f"CHUNK names slot {slot} / {n} bytes")
            if (src, frame) not in self._inbound:  # its STREAM notification is still on the way
                self._early.setdefault((src, frame), []).append((slot, off, n))
                return
            self._on_chunk(src, frame, slot, off, n)
        elif kind == ACK:
            if len(data) != _ACK.size:
                raise ProtocolError("malformed ACK")
            _, slot = _ACK.unpack(data)
            if slot >= self.options.num_slots:
                raise ProtocolError(f"ACK of slot {slot}")
            self._free[src].add(slot)
        elif kind == BYE:
            log.info("nixl rank %d: rank %d closed its endpoint", self.rank, src)
        else:
            raise ProtocolError(f"unknown notification kind {kind}")

    def _on_chunk(self, src: int, frame: int, slot: int, off: int, n: int) -> None:
        inb = self._inbound[(src, frame)]
        try:
            if off + n > inb.dest.numel():
                del self._inbound[(src, frame)]
                raise ProtocolError(
                    f"chunk ({off}, {n}) overruns the frame's {inb.dest.numel()} bytes"
                )
            at = self._slot_offset(src, slot)
            inb.dest[off : off + n].copy_(self._rx[at : at + n])
            if self._on_gpu:
                torch.cuda.synchronize(self._rx.device)  # copied out before the slot is freed
            inb.filled += n
        finally:
            self._ack(src, slot)
        if inb.filled == inb.dest.numel():
            del self._inbound[(src, frame)]
            self._deliver(src, decode_parts(inb.header, inb.prefix, inb.dest))

    def _ack(self, src: int, slot: int) -> None:
        try:
            self._notify(src, _ACK.pack(ACK, slot))
        except PeerUnreachable as e:  # nobody to free the slot for any more
            log.warning("%s", e)

    def _deliver(self, src: int, msg: Message) -> None:
        if msg.sender != src:
            raise ProtocolError(f"frame from rank {src} claims sender {msg.sender}")
        self.mailbox.put(msg)

    # -- teardown ------------------------------------------------------------------------------

    def _close_backend(self) -> None:
        for p in self._names:
            try:
                self._notify(p, bytes([BYE]))
            except PeerUnreachable:  # the peer is gone already
                pass
        self._teardown()

    def _teardown(self) -> None:
        with self._agent_lock:
            agent, self._agent = self._agent, None
            if agent is not None:
                for h in self._pending:
                    try:
                        h.release()
                    except Exception:
                        log.debug(
                            "nixl rank %d: releasing a transfer failed", self.rank, exc_info=True
                        )
                self._pending = []
                for name in self._names.values():
                    try:
                        agent.remove_remote_agent(name)
                    except Exception:
                        pass
                for descs in self._regs:
                    try:
                        agent.deregister_memory(descs)
                    except Exception:
                        pass
                self._regs = []
                del agent
        if self._rdv is not None:
            self._rdv.close()
            self._rdv = None
