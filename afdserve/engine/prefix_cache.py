"""Prefix caching: full KV blocks kept after their sequence ends, found again by their tokens.

A full block's key is a chained hash (vLLM's automatic prefix caching): blake2b over the key of
the block before it and the block's own token ids, so a key names the block's tokens *and*
everything before them, which is what its KV depends on. Two requests whose prompts share the
first k full blocks share those k keys, and the second reuses the first one's KV for them.

`BlockPool` is one attention worker's pool of KV blocks with that cache in it. Every block is in
exactly one of three states:

* free: holds nothing (the `BlockAllocator`'s free list);
* held: referenced by at least one running sequence (`refs[b] > 0`); a held full block may also
  be cached (its key maps to it), and then other sequences may take a reference to it;
* cached but unreferenced (`evictable`): its sequence ended or was preempted; kept with its KV
  until an allocation needs the space. These count as free for `can_allocate`; `allocate`
  takes truly free blocks first and then evicts the least recently released.

The host tier (`num_host_blocks` > 0; vLLM's CPU offload, SGLang's HiCache): a cached block that
an allocation evicts from the device is not dropped but copied to a slot of a second, larger pool
in host memory, under the same key, and a later lookup that finds a key there brings the block
back (a new device block, copied into before this step's chunks read it) instead of computing
it again. So a preempted sequence, whose blocks are the first to be evicted, resumes from the
tier rather than by recompute, and a prefix pushed out of the device by others is still a hit.
The tier is exclusive (a key is on the device or in the host, not both: a block brought back
leaves the host) and LRU too (a full tier drops its least recently stored block). The pool
only plans the copies: `take_plan_copies` hands them to the scheduler for the step's plan
(`StepPlan.swap_out`, `swap_in`), and the runner makes them, outs first, at the step's start
(engine/kv_tier.py). A slot emptied by a copy back is reused only from the next plan on, so
this plan's copies never race each other.

The keys never depend on anything but token ids and the block size, so the front (which routes
by them, afd/router.py) and the workers compute the same ones with `block_hashes`.
Used by one thread: the scheduler's.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from afdserve.engine.block_allocator import NULL_BLOCK, BlockAllocator, NoFreeBlocksError

BlockHash = bytes
"""A full block's key: 16 bytes of blake2b (collisions: about 2^-64 at 2^32 distinct blocks)."""

_ROOT = b"afdserve-prefix-v1"
"""What the first block of every sequence chains from (fixed: front and workers must agree)."""


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The key of a full block whose tokens are `token_ids`, after the block keyed `parent`
    (None: the sequence's first block)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(_ROOT if parent is None else parent)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, known: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """Keys of every full block of `token_ids`; `known` are keys already computed for its first
    blocks (a sequence's tokens only grow, so they are reused rather than hashed again)."""
    out = list(known)
    for i in range(len(out), len(token_ids) // block_size):
        parent = out[i - 1] if i else None
        out.append(hash_block(parent, token_ids[i * block_size : (i + 1) * block_size]))
    return out


class BlockPool:
    """Physical KV blocks 1..num_blocks-1 with reference counts and, when `caching`, a cache of
    full blocks by key with LRU eviction of the unreferenced ones (module docstring).

    With `caching` off it is exactly a `BlockAllocator`: nothing is ever cached, `lookup` finds
    nothing and a released block is free at once.
    """

    def __init__(self, num_blocks: int, *, caching: bool = True, num_host_blocks: int = 0) -> None:
        self._free = BlockAllocator(num_blocks)
        self.num_blocks = num_blocks
        self.caching = bool(caching)
        if num_host_blocks and not self.caching:
            raise ValueError("a KV host tier keeps cached blocks: it needs prefix caching")
        self.host = HostTier(num_host_blocks) if num_host_blocks else None
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._emptied: list[int] = []
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks no sequence references, least recently released first."""
        self.evictions = 0
        """Cached blocks evicted from the device to make room (monotonic)."""
        self.swapped_out = 0
        """Of those, blocks copied to the host tier (planned copies handed out)."""
        self.host_hits = 0
        """Blocks brought back from the host tier."""
        self.record_events = False
        """Keep the keys stored and removed for `take_events` (a worker process whose front
        mirrors its cache sets it; nobody else would drain them)."""
        self._stored: list[BlockHash] = []
        self._removed: list[BlockHash] = []

    # ---- sizes (the BlockAllocator interface) --------------------------------------------

    @property
    def num_usable(self) -> int:
        return self._free.num_usable

    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: free ones plus cached ones nobody references."""
        return self._free.num_free + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by sequences."""
        return self.num_usable - self.num_free

    @property
    def usage(self) -> float:
        return self.num_used / self.num_usable

    @property
    def num_cached(self) -> int:
        """Blocks whose key is in the cache (held or not)."""
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    # ---- allocation ----------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """`n` blocks, each referenced once; free blocks first, then the least recently
        released cached ones (their keys leave the cache). All or nothing."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"cannot allocate {n!r} blocks")
        if n > self.num_free:
            raise NoFreeBlocksError(f"asked for {n} KV blocks but only {self.num_free} are free")
        take = min(n, self._free.num_free)
        out = self._free.allocate(take)
        while len(out) < n:
            b, _ = self._evictable.popitem(last=False)
            key = self._key_of[b]
            self._uncache(b)
            self.evictions += 1
            if self.host is not None:
                slot = self.host.put(key)
                if slot is not None:
                    self._swap_out.append((b, slot))
            out.append(b)
        for b in out:
            self._refs[b] = 1
        return out

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody references any more is cached
        (evictable, in the order given: pass a sequence's blocks last first, so its tail is
        evicted before its prefix) or free. All or nothing: validated first."""
        blocks = list(blocks)
        drops: dict[int, int] = {}
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 < b < self.num_blocks:
                raise ValueError(
                    f"block id {b!r} is not an allocatable block (1..{self.num_blocks - 1})"
                )
            drops[b] = drops.get(b, 0) + 1
            if drops[b] > self._refs[b]:
                raise ValueError(f"double free of KV block {b}")
        uncached = []
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if b in self._key_of:
                self._evictable[b] = None
            else:
                uncached.append(b)
        self._free.free(uncached)

    # ---- the cache -----------------------------------------------------------------------

    def lookup(self, keys: Sequence[BlockHash]) -> list[int]:
        """The device blocks of the longest prefix of `keys` cached on the device (no
        reference is taken)."""
        out: list[int] = []
        if not self.caching:
            return out
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def lookup_tiers(self, keys: Sequence[BlockHash]) -> list[int | HostHit]:
        """The longest prefix of `keys` cached on the device or in the host tier: a device
        block id, or a `HostHit` naming the host slot, per key."""
        out: list[int | HostHit] = []
        if not self.caching:
            return out
        for key in keys:
            b = self._block_of.get(key)
            if b is not None:
                out.append(b)
                continue
            slot = self.host.slot_of(key) if self.host is not None else None
            if slot is None:
                break
            out.append(HostHit(slot))
        return out

    def take(self, hit: Sequence[int | HostHit]) -> list[int]:
        """Reference what `lookup_tiers` found, as a sequence's first blocks: device blocks are
        touched; each host one gets a new device block, cached under its key at once (the copy
        into it runs before this step reads it), and leaves the host. The caller checked
        `can_allocate(len(host ones) + num_evictable_of(device ones))`."""
        self.touch([b for b in hit if not isinstance(b, HostHit)])
        slots = [h.slot for h in hit if isinstance(h, HostHit)]
        if not slots:
            return list(hit)  # type: ignore[arg-type]
        assert self.host is not None
        keys = iter([self.host.take(s) for s in slots])  # out of the host's map and LRU
        fresh = iter(self.allocate(len(slots)))  # may evict others to the host, not these
        out = []
        for h in hit:
            if isinstance(h, HostHit):
                b = next(fresh)
                self._swap_in.append((h.slot, b))
                self._cache_or_fail(b, next(keys))
                out.append(b)
            else:
                out.append(h)
        self._emptied.extend(slots)
        self.host_hits += len(slots)
        return out

    def take_plan_copies(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The host-tier copies planned since the last call, (swap_out, swap_in), for one
        step's plan; the host slots they emptied become free for the next plan."""
        out = (tuple(self._swap_out), tuple(self._swap_in))
        self.swapped_out += len(self._swap_out)
        self._swap_out.clear()
        self._swap_in.clear()
        if self.host is not None:
            self.host.release(self._emptied)
        self._emptied.clear()
        return out

    def num_evictable_of(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` (cached ones) are unreferenced: taking them uses up free space."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        """Take one reference to each of these cached blocks (a sequence reuses them)."""
        for b in blocks:
            if b not in self._key_of:
                raise ValueError(f"KV block {b} is not cached")
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1

    def _cache_or_fail(self, block: int, key: BlockHash) -> None:
        if not self.cache(block, key):
            raise RuntimeError(f"block key of KV block {block} is cached twice")

    def cache(self, block: int, key: BlockHash) -> bool:
        """Enter a held block that just became full (its KV is written) under `key`. False
        when caching is off, or when another block already holds that key (two sequences
        computed the same prefix at once: this copy stays private and is freed with them)."""
        if not self.caching or key in self._block_of or block in self._key_of:
            return False
        if block == NULL_BLOCK or self._refs[block] == 0:
            raise ValueError(f"only a held block can be cached, not {block}")
        self._block_of[key] = block
        self._key_of[block] = key
        if self.record_events:
            self._stored.append(key)
        return True

    def cached_prefix_len(self, keys: Sequence[BlockHash]) -> int:
        """Leading `keys` that are cached (the router's question)."""
        return len(self.lookup(keys))

    def take_events(self) -> tuple[tuple[BlockHash, ...], tuple[BlockHash, ...]]:
        """(keys stored, keys removed) since the last call, in order, for a front that mirrors
        this cache to route by it (Dynamo's KV events). A key may be in both."""
        out = (tuple(self._stored), tuple(self._removed))
        self._stored.clear()
        self._removed.clear()
        return out

    def reset(self) -> int:
        """Forget every unreferenced cached block (they become free) and the host tier;
        returns how many device blocks."""
        if self.host is not None:
            self.host.clear()
        n = len(self._evictable)
        blocks = list(self._evictable)
        self._evictable.clear()
        for b in blocks:
            self._uncache(b)
        self._free.free(blocks)
        return n

    def _uncache(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]
        if self.record_events:
            self._removed.append(key)


@dataclass(frozen=True)
class HostHit:
    """A lookup's hit in the host tier: the slot holding the block's KV."""

    slot: int


class HostTier:
    """The host pool's bookkeeping: slots 0..n-1, key <-> slot, least recently stored first.

    Every stored slot is unreferenced (sequences only ever reference device blocks), so any may
    be dropped for a new one, except those a plan is copying back (`take`n until `release`).
    """

    def __init__(self, num_slots: int) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1, got {num_slots!r}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[BlockHash, int] = {}
        self._key_of: OrderedDict[int, BlockHash] = OrderedDict()  # LRU first
        self.dropped = 0
        """Blocks dropped from a full tier (their KV is gone: a later hit recomputes)."""

    @property
    def num_stored(self) -> int:
        return len(self._key_of)

    def slot_of(self, key: BlockHash) -> int | None:
        return self._slot_of.get(key)

    def put(self, key: BlockHash) -> int | None:
        """A slot to copy the block keyed `key` into (a free one, else the least recently
        stored one's); None when the key is already here or every slot is being read."""
        if key in self._slot_of:
            return None
        if self._free:
            slot = self._free.pop()
        elif self._key_of:
            slot, old = self._key_of.popitem(last=False)
            del self._slot_of[old]
            self.dropped += 1
        else:
            return None
        self._slot_of[key] = slot
        self._key_of[slot] = key
        return slot

    def take(self, slot: int) -> BlockHash:
        """Remove a slot's block from the tier (it goes back to the device); the slot stays
        out of use until `release`."""
        key = self._key_of.pop(slot)
        del self._slot_of[key]
        return key

    def release(self, slots: Iterable[int]) -> None:
        self._free.extend(slots)

    def clear(self) -> None:
        self._free.extend(self._key_of)
        self._key_of.clear()
        self._slot_of.clear()
