"""Block checksums (kv_transfer/integrity.py) against xxhash over hand-built byte strings."""

from __future__ import annotations

import pytest
import torch
import xxhash

from scission.kv_transfer.integrity import block_checksums, mismatched_blocks


def make_layers(dtype: torch.dtype, num_layers: int = 3, num_blocks: int = 6):
    g = torch.Generator().manual_seed(0)
    shape = (num_blocks, 4, 2, 8)
    return [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
            for _ in range(num_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checksum_is_xxh3_of_every_layers_k_then_v_bytes(dtype):
    layers = make_layers(dtype)
    for b in (0, 3, 5):
        data = b"".join(bytes(k[b].contiguous().view(torch.uint8).numpy().tobytes())
                        + bytes(v[b].contiguous().view(torch.uint8).numpy().tobytes())
                        for k, v in layers)
        assert block_checksums(layers, [b]) == (xxhash.xxh3_64_intdigest(data),)


def test_one_flipped_byte_is_found_in_its_block_only():
    layers = make_layers(torch.bfloat16)
    ids = [5, 1, 2]
    expected = block_checksums(layers, ids)
    assert mismatched_blocks(expected, layers, ids) == []
    raw = layers[2][1].view(torch.uint8)  # layer 2's V, block 1: position 1 of ids
    raw[1, 0, 1, 3] ^= 0x01
    assert mismatched_blocks(expected, layers, ids) == [1]
    with pytest.raises(ValueError):
        mismatched_blocks(expected[:2], layers, ids)
    with pytest.raises(IndexError):
        block_checksums(layers, [6])


def test_checksums_equal_in_both_kv_layouts():
    """The same values in a layer-major and a block-major KVCache hash alike (checksums
    cover each block's bytes per layer, K then V, whatever the memory order), so a
    checksum minted on one layout verifies on the other's copy of the data."""
    from scission.engine.config import KVLayout, ModelConfig
    from scission.engine.kv_cache import KVCache

    model = ModelConfig(vocab_size=1, hidden_size=16, intermediate_size=1, num_layers=3,
                        num_heads=2, num_kv_heads=2, head_dim=8, rope_theta=1.0,
                        rms_norm_eps=1e-5, max_position_embeddings=1)
    layer, block = (KVCache(model, 6, 4, torch.bfloat16, layout=lay) for lay in KVLayout)
    src = torch.randn(layer.tensor.shape, generator=torch.Generator().manual_seed(1))
    layer.layer_major().copy_(src)
    block.layer_major().copy_(src)
    ids = [4, 0, 5]
    assert block_checksums(block.layers, ids) == block_checksums(layer.layers, ids)
    assert block.block_bytes(ids) == layer.block_bytes(ids)
