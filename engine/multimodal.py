"""Multimodal inputs of a request: where image embeddings go in the prompt, and their keys.

An image becomes a *segment* of prompt tokens (the checkpoint's processor decides it: LLaVA
repeats ``<image>`` once per patch; Idefics3/SmolVLM wraps each tile's ``<image>`` run in
``<fake_token_around_image><row_r_col_c>`` and adds a global view). Inside the segment, the
positions holding ``image_token_id`` take the image's embeddings, in order; every other
token of the segment embeds as text::

    prompt   | text ... |<-------------- segment (offset, length) -------------->| text ...
    tokens   |          | <fake> <row_1_col_1> <image> <image> ... <fake> ...      |
    embeds   | text     | text   text          emb[0]  emb[1]  ... text   ...      |

``image_hash`` is a stable content key (image bytes, processor settings, model id): it keys
the embedding cache, and it is mixed into the hash of every KV block the segment overlaps,
so the prefix cache never shares a block between two different images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class MMInput:
    """One image of a request.

    Attributes:
        offset: index of the segment's first token in the prompt.
        length: the segment's number of tokens.
        image_hash: 32-byte content key (``engine.mm_processor.image_hash``).
        embeddings: ``[num_embeddings, hidden_size]``, model dtype, CPU; row ``i`` goes to
            the ``i``-th ``image_token_id`` position of the segment. ``None`` where only the
            key is needed (a decode worker hashing blocks whose KV it pulled).
        embed_positions: prompt positions of the segment's ``image_token_id`` tokens,
            ascending, ``len == num_embeddings``.
    """

    offset: int
    length: int
    image_hash: bytes
    embed_positions: tuple[int, ...]
    embeddings: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad segment offset={self.offset} length={self.length}")
        end = self.offset + self.length
        if any(not self.offset <= p < end for p in self.embed_positions):
            raise ValueError("embed_positions outside the segment")
        if self.embeddings is not None and self.embeddings.shape[0] != len(self.embed_positions):
            raise ValueError(f"{self.embeddings.shape[0]} embeddings for "
                             f"{len(self.embed_positions)} image token positions")

    @property
    def end(self) -> int:
        return self.offset + self.length


def make_mm_input(prompt_token_ids: Sequence[int], offset: int, length: int, image_token_id: int,
                  image_hash: bytes, embeddings: torch.Tensor | None = None) -> MMInput:
    """``MMInput`` for the segment ``prompt_token_ids[offset:offset+length]``; the embedding
    positions are the segment's ``image_token_id`` tokens.

    Raises:
        ValueError: the segment leaves the prompt, or the embedding count differs.
    """
    if offset + length > len(prompt_token_ids):
        raise ValueError(f"segment [{offset}, {offset + length}) beyond the prompt "
                         f"({len(prompt_token_ids)} tokens)")
    positions = tuple(p for p in range(offset, offset + length)
                      if prompt_token_ids[p] == image_token_id)
    return MMInput(offset, length, image_hash, positions, embeddings)


def block_extra_keys(mm_inputs: Sequence[MMInput], num_blocks: int,
                     block_size: int) -> list[bytes]:
    """Extra hash keys of blocks ``0 .. num_blocks - 1``: the concatenated ``image_hash`` of
    every segment overlapping the block (``b""`` for a text-only block).

    Block ``b`` covers tokens ``[b * block_size, (b + 1) * block_size)``.
    """
    keys = [b""] * num_blocks
    for mm in sorted(mm_inputs, key=lambda m: m.offset):
        first, last = mm.offset // block_size, (mm.end - 1) // block_size
        for b in range(first, min(last + 1, num_blocks)):
            keys[b] += mm.image_hash
    return keys


def splice_segments(prompt_token_ids: Sequence[int], marker_id: int,
                    segments: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Replace the ``i``-th ``marker_id`` by ``segments[i]``.

    Returns:
        (prompt token ids, offset of each segment).
    Raises:
        ValueError: the marker count differs from ``len(segments)``.
    """
    if sum(1 for t in prompt_token_ids if t == marker_id) != len(segments):
        raise ValueError(f"prompt has a different number of image markers than "
                         f"{len(segments)} images")
    ids: list[int] = []
    offsets: list[int] = []
    it = iter(segments)
    for t in prompt_token_ids:
        if t == marker_id:
            offsets.append(len(ids))
            ids.extend(next(it))
        else:
            ids.append(t)
    return ids, offsets
