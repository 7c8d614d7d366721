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
