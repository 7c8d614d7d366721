"""Attention over the paged KV cache: the backend interface and the torch backend.

Layout (``NHD``): per layer, ``k_cache`` and ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``. Token ``t`` of a request lives at
slot ``block_table[t // block_size] * block_size + t % block_size``.

A backend is planned once per batch (``plan``) and run once per layer (``run``), as in
FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``. ``run`` first writes the new K/V into
the cache through ``slot_mapping`` and then lets each request's query chunk attend causally
to its whole context (cached prefix + new tokens).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    """One batch of ``num_reqs`` requests flattened into ``num_tokens`` query tokens.

    Request ``r`` owns query rows ``cu_seqlens_q[r]:cu_seqlens_q[r+1]``; those are the last
    ``q_len`` tokens of its context of length ``seq_lens[r]`` (positions
    ``seq_lens[r] - q_len .. seq_lens[r] - 1``).
    """

    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32, context length incl. this step's tokens
    block_table: torch.Tensor  # [num_reqs, max_blocks_per_req] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not write
    max_seqlen_q: int
    max_seq_len: int
    block_size: int
    # Host copies (python ints) so backends can branch without device syncs.
    query_lens: tuple[int, ...]
    seq_lens_host: tuple[int, ...]
    # True when the builder knows no slot is -1: K/V writes skip the mask (a device sync).
    slots_all_valid: bool = False

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_seqlen_q == 1


class AttentionBackend(abc.ABC):
    """Paged attention for one worker; ``plan`` per batch, ``run`` per layer."""

    @abc.abstractmethod
    def plan(self, metadata: AttentionMetadata) -> None: ...

    @abc.abstractmethod
    def run(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def strided_rows(cache: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cache`` ``[num_blocks, block_size, H_kv, D]`` in either KV layout as one strided view
    ``[R, H_kv, D]`` (no copy) and the row pitch of a block, ``stride(0) // stride(1)``:
    slot ``s`` is row ``(s // block_size) * pitch + s % block_size`` (``slot_rows``). Rows
    between a block's last slot and the next block's first are other layers' (block-major)
    memory, never indexed. Layer-major: ``pitch == block_size``, row == slot.

    Raises:
        ValueError: a block's stride is not a whole number of slot rows.
    """
    num_blocks, block_size = cache.shape[:2]
    pitch, rem = divmod(cache.stride(0), cache.stride(1))
    if rem:
        raise ValueError(f"block stride {cache.stride(0)} is not a multiple of the slot "
                         f"stride {cache.stride(1)}")
    rows = (num_blocks - 1) * pitch + block_size
    return cache.as_strided((rows, *cache.shape[2:]), cache.stride()[1:]), pitch


def slot_rows(slots: torch.Tensor, block_size: int, pitch: int) -> torch.Tensor:
    """Rows of ``strided_rows``'s view for cache ``slots`` (int64, any shape; the slots
    themselves when ``pitch == block_size``). Graph decode computes them once per step instead
    of once per layer (or per element inside a kernel)."""
    if pitch == block_size:
        return slots
    return slots // block_size * pitch + slots % block_size


def gather_slots(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``cache[slot // block_size, slot % block_size]`` for int64 ``slots`` of any shape:
    ``[*slots.shape, H_kv, D]`` (a copy), for either KV layout."""
    rows, pitch = strided_rows(cache)
    return rows[slot_rows(slots, cache.shape[1], pitch)]


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, all_valid: bool = False,
) -> None:
    """Scatter new K/V rows into the cache; slots of -1 are skipped (``all_valid``: the
    caller knows there are none, so no boolean mask and ``nonzero``). Either KV layout."""
    if not all_valid:
        keep = slot_mapping >= 0
        slot_mapping = slot_mapping[keep]
        if slot_mapping.numel() == 0:
            return
        k, v = k[keep], v[keep]
    rows = None
    for new, cache in ((k, k_cache), (v, v_cache)):
        view, pitch = strided_rows(cache)
        if rows is None:  # K and V caches share strides
            rows = slot_rows(slot_mapping, cache.shape[1], pitch)
        view.index_copy_(0, rows, new)


class TorchAttentionBackend(AttentionBackend):
    """Reference-quality paged attention in torch (CPU default).

    Decode rows (``q_len == 1``) are gathered and padded into one batched SDPA call;
    longer query chunks run one request at a time with an offset causal mask.

    ``native_prefill`` (set by the engine with native decode, float32 on CPU): query chunks
    run ``kernels/llama_decode.py: prefill_attention`` instead, one C call per request
    reading K/V from the paged cache (no gather): ~2.2 ms against SDPA's CPU flash kernel's
    ~5.7 ms per layer on a 512-token prompt with SmolLM2's heads (2 threads, AVX2), the same
    values up to float32 summation order. With native decode on, only steps with image
    embeddings still come here (text steps run whole in C, engine/native_decode.py).
    """

    native_prefill = False

    def __init__(self) -> None:
        self._md: AttentionMetadata | None = None
        self._decode_rows: list[int] = []  # request indices with q_len == 1
        self._decode_blocks: torch.Tensor | None = None  # [n_dec * max_blocks] int64
        self._decode_mask: torch.Tensor | None = None  # [n_dec, 1, 1, max_blocks * bs] bool
        self._decode_starts: torch.Tensor | None = None  # [n_dec] rows in the flat batch
        self._extend_slots: list[torch.Tensor] = []  # per extend request: [seq_len] int64
        # One decode row whose blocks are consecutive ids: (first slot, seq_len); its K/V
        # are then a view of the cache (no gather, no mask).
        self._decode_contig: tuple[int, int] | None = None
        self._planned = False

    def plan(self, metadata: AttentionMetadata) -> None:
        """Take the batch; the per-batch tensors are built at the first ``run`` (a step that
        never calls ``run``, such as a native decode step, pays nothing for them)."""
        self._md = metadata
        self._planned = False

    def _plan_now(self) -> None:
        metadata = self._md
        self._planned = True
        bs = metadata.block_size
        table = metadata.block_table.to(torch.int64)
        self._decode_rows = [r for r, n in enumerate(metadata.query_lens) if n == 1]
        self._extend_rows = [r for r, n in enumerate(metadata.query_lens) if n > 1]
        self._decode_contig = None
        if self._decode_rows:
            rows = torch.tensor(self._decode_rows, dtype=torch.int64)
            lens = torch.tensor([metadata.seq_lens_host[r] for r in self._decode_rows])
            num_blocks = -(-int(lens.max()) // bs)
            self._decode_blocks = table[rows, :num_blocks].reshape(-1)  # [n_dec * nb]
            self._decode_starts = metadata.cu_seqlens_q[rows].to(torch.int64)
            if len(self._decode_rows) == 1:
                self._decode_contig = _contiguous_run(self._decode_blocks, int(lens[0]), bs)
            if self._decode_contig is None:
                pos = torch.arange(num_blocks * bs)
                self._decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :]
        self._extend_slots = []
        for r in ([] if self.native_prefill else self._extend_rows):  # native: block table
            pos = torch.arange(metadata.seq_lens_host[r])
            self._extend_slots.append(table[r, pos // bs] * bs + pos % bs)

    @property
    def metadata(self) -> AttentionMetadata | None:
        """The planned batch (graph mode reads it to run decode attention in its graphs)."""
        return self._md

    def run(self, q, k, v, k_cache, v_cache, scale):
        md = self._md
        assert md is not None, "plan() must be called before run()"
        if not self._planned:
            self._plan_now()
        write_kv(k, v, k_cache, v_cache, md.slot_mapping, md.slots_all_valid)
        if not self._extend_rows:  # pure decode: row r of q is request r's token
            return self._decode(q, k_cache, v_cache, scale)
        out = torch.empty_like(q)
        gqa = q.shape[1] // k.shape[1]
        if self._decode_rows:
            out[self._decode_starts] = self._decode(q[self._decode_starts], k_cache, v_cache,
                                                    scale)
        if self.native_prefill and q.dtype == torch.float32 and q.device.type == "cpu":
            from scission.kernels.llama_decode import prefill_attention

            for r in self._extend_rows:
                s, end = int(md.cu_seqlens_q[r]), md.query_lens[r]
                q_r = q[s : s + end]
                if q_r.stride()[1:] != (q.shape[2], 1):
                    q_r = q_r.contiguous()
                out[s : s + end] = prefill_attention(q_r, k_cache, v_cache, md.block_table[r],
                                                     md.seq_lens_host[r], scale)
            return out
        for r, slots in zip(self._extend_rows, self._extend_slots, strict=True):
            s, end = int(md.cu_seqlens_q[r]), md.query_lens[r]
            q_r = q[s : s + end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            k_r = gather_slots(k_cache, slots).transpose(0, 1).unsqueeze(0)  # [1, H_kv, L, D]
            v_r = gather_slots(v_cache, slots).transpose(0, 1).unsqueeze(0)
            out[s : s + end] = _causal_sdpa(q_r, k_r, v_r, scale, gqa)[0].transpose(0, 1)
        return out


    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                scale: float) -> torch.Tensor:
        """One SDPA call for all decode rows. The GQA group is folded into the query axis
        (``[n, H, D] -> [n, H_kv, gqa, D]``) so K/V are gathered once per KV head and never
        repeated; whole blocks are gathered (one ``index_select`` per layer)."""
        n, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        gqa = num_heads // num_kv_heads
        qf = q.view(n, num_kv_heads, gqa, head_dim)  # head h -> kv head h // gqa
        if self._decode_contig is not None:  # batch of one, consecutive blocks
            # layer-major: a view of the cache; block-major: the blocks are strided, so
            # reshape copies them (as index_select would)
            first, length = self._decode_contig
            bs = k_cache.shape[1]
            blocks = slice(first // bs, -(-(first + length) // bs))
            k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length][None]
            v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:length][None]
            mask = None
        else:
            k = k_cache.index_select(0, self._decode_blocks).view(n, -1, num_kv_heads, head_dim)
            v = v_cache.index_select(0, self._decode_blocks).view(n, -1, num_kv_heads, head_dim)
            mask = self._decode_mask
        o = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale)
        return o.reshape(n, num_heads, head_dim)


def _contiguous_run(blocks: torch.Tensor, seq_len: int, block_size: int
                    ) -> tuple[int, int] | None:
    """``(first_slot, seq_len)`` if ``blocks`` (one request's, in order) are consecutive ids,
    else None."""
    ids = blocks.tolist()
    if ids != list(range(ids[0], ids[0] + len(ids))):
        return None
    return ids[0] * block_size, seq_len


def _offset_causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool: query i (position kv_len - q_len + i) sees keys <= its position."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def _causal_sdpa(q, k, v, scale, gqa: int) -> torch.Tensor:
    """Causal SDPA of a query chunk at the end of its context: q ``[1, H, q_len, D]``,
    k/v ``[1, H_kv, kv_len, D]``. A whole prompt (``q_len == kv_len``) takes SDPA's own
    ``is_causal`` (no mask tensor: the CPU flash kernel skips the masked tiles), a chunk after
    a prefix the offset mask. GQA through ``enable_gqa`` (K/V never repeated). 512-token
    prompt, SmolLM2 heads, 2 threads: 6.8 -> 4.8 ms per layer in float32 against a mask and
    repeated K/V, the same bits."""
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=gqa > 1)
    mask = _offset_causal_mask(q_len, kv_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa > 1)


def reference_paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """Float64 loop reference over requests and block tables (for tests); cache already written."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty(q.shape, dtype=torch.float64)
    gqa = q.shape[1] // k_cache.shape[2]
    s = 0
    for r, q_len in enumerate(md.query_lens):
        seq_len = md.seq_lens_host[r]
        pos = torch.arange(seq_len)
        blocks = md.block_table[r].to(torch.int64)[pos // md.block_size]
        k_ctx = k_cache[blocks, pos % md.block_size].double().repeat_interleave(gqa, 1)
        v_ctx = v_cache[blocks, pos % md.block_size].double().repeat_interleave(gqa, 1)
        qr = q[s : s + q_len].double()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", qr, k_ctx) * scale
        mask = _offset_causal_mask(q_len, seq_len, torch.device("cpu"))
        scores = scores.masked_fill(~mask, float("-inf"))
        out[s : s + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_ctx)
        s += q_len
    return out
