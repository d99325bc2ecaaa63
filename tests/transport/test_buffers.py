"""Receive buffers are reused only once nothing refers to them any more."""

from __future__ import annotations

import gc

import torch

from afdserve.transport.buffers import (
    HUGE_ALLOC_BYTES,
    RecvBufferPool,
    _size_class,
    alloc_host_bytes,
)


def test_buffer_is_reused_only_after_every_view_is_gone():
    pool = RecvBufferPool(max_bytes=64 << 20, min_bytes=1 << 10)
    a = pool.take(100_000)
    ptrs = {a.ctypes.data}
    t = torch.from_numpy(a).view(torch.float32)[10:20]  # a derived view keeps it alive
    del a
    b = pool.take(100_000)
    ptrs.add(b.ctypes.data)
    assert pool.misses == 2 and pool.hits == 0 and len(ptrs) == 2  # still referenced through t
    del b
    c = pool.take(99_000)  # same size class as 100_000: reuses b's buffer
    assert pool.hits == 1 and c.size == 99_000 and c.ctypes.data in ptrs
    d = pool.take(100_000)  # a's buffer is still held by t
    assert pool.misses == 3
    del t, d
    gc.collect()
    e = pool.take(100_000)
    assert pool.hits == 2 and e.ctypes.data in ptrs | {c.ctypes.data}


def test_small_requests_bypass_the_pool_and_budget_is_kept():
    pool = RecvBufferPool(max_bytes=1 << 20, min_bytes=1 << 16)
    assert pool.take(100).size == 100 and pool.pooled_bytes == 0
    for _ in range(5):
        pool.take(300_000)  # each dropped at once: idle buffers are evicted past the budget
    assert pool.pooled_bytes <= 1 << 20
    held = [pool.take(300_000) for _ in range(5)]  # in use: kept even over budget
    assert pool.pooled_bytes >= 5 * 300_000
    del held


def test_size_classes_and_huge_allocations():
    assert [_size_class(n) for n in (1, 8, 9, 1000, 1024, 1025)] == [8, 8, 9, 1024, 1024, 1152]
    for n in (5, 1000, 12345, 1 << 20, (1 << 20) + 1):
        assert n <= _size_class(n) <= n * 1.125 + 8
    t = alloc_host_bytes(HUGE_ALLOC_BYTES)
    t[-1] = 7
    assert t.numel() == HUGE_ALLOC_BYTES and t[-1].item() == 7
