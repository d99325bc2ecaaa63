"""The KV cache tensors: zeroed, the shape attention expects, huge pages asked for on Linux."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from afdserve.engine.kv_cache import HUGE_PAGE, KVCache, _advise_hugepages
from afdserve.model.config import ModelConfig

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _config() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_tensors_are_zero_and_head_major(dtype):
    cache = KVCache(_config(), num_blocks=4096, block_size=16, dtype=dtype)
    assert len(cache.k) == len(cache.v) == 2
    for t in cache.k + cache.v:
        assert t.shape == (2, 4096, 16, 8) and t.dtype == dtype
        assert not t.any()


@pytest.mark.skipif(
    sys.platform != "linux" or not THP.exists() or "[never]" in THP.read_text(),
    reason="no transparent huge pages here",
)
def test_huge_pages_are_advised_for_a_large_cache():
    t = torch.empty(3 * HUGE_PAGE, dtype=torch.uint8)
    assert _advise_hugepages(t.data_ptr(), t.numel())
    assert not _advise_hugepages(t.data_ptr(), HUGE_PAGE // 2)  # no whole huge page inside


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_quantised_cache_holds_codes_and_scales(kv):
    from afdserve.model.kv_quant import FORMATS, QuantizedKV

    cache = KVCache(_config(), num_blocks=64, block_size=16, dtype=torch.float32, kv_cache_dtype=kv)
    assert len(cache.k) == len(cache.v) == 2
    for layer in cache.k + cache.v:
        assert isinstance(layer, QuantizedKV) and layer.shape == (2, 64, 16, 8)
        assert layer.codes.dtype == FORMATS[kv].storage and not layer.codes.any()
        assert layer.scale.shape == (2, 64, 16) and layer.scale.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache(_config(), 4, 16, torch.float32, kv_cache_dtype="int4")


def test_bytes_per_block_counts_codes_and_scales():
    """2 layers x K and V x 16 tokens x 2 KV heads x (8 elements of the dtype, or 8 code bytes
    and a 4-byte scale)."""
    cfg = _config()
    assert KVCache.bytes_per_block(cfg, 16, torch.float32) == 2 * 2 * 16 * 2 * 8 * 4
    assert KVCache.bytes_per_block(cfg, 16, torch.bfloat16) == 2 * 2 * 16 * 2 * 8 * 2
    for kv in ("int8", "fp8"):
        for dtype in (torch.float32, torch.bfloat16):
            assert KVCache.bytes_per_block(cfg, 16, dtype, kv) == 2 * 2 * 16 * 2 * (8 + 4)
