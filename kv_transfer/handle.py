"""Typed, versioned messages of the KV transfer contract (DESIGN.md "Transfer contract").

- ``TransferHandle``: returned by a prefill worker with the first token; tells the decode
  worker which blocks to pull from which NIXL agent (and which incarnation of it).
- ``KVLayoutDescriptor``: published by every worker with its registration (next to its
  NIXL agent metadata); lets a reader build remote descriptors for any block.
- ``KVNotification``: the NIXL notification a decode worker sends after a pull, so the
  prefill worker can release the request's blocks.

All three encode to msgpack maps (``to_bytes``) and decode strictly (``from_bytes`` raises
``ValueError`` on a wrong version or malformed input). Nothing here imports torch or NIXL.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from enum import IntEnum
from typing import Any

from scission.kv_transfer.capability import Signed
from scission.kv_transfer.codec import BYTES, INT, INT_TUPLE, STR, pack_message, unpack_message

logger = logging.getLogger(__name__)

# Bump on any change of these messages' fields or meaning (vLLM NIXL_CONNECTOR_VERSION).
KV_TRANSFER_VERSION = 4  # 2: hold_id in TransferHandle and KVNotification; 3: its mac;
# 4: block_checksums

# Cache layouts (``engine.config.KVLayout``); per layer ``[num_blocks, block_size,
# num_kv_heads, head_dim]`` either way.
# NHD: layer-major, each layer's K (and V) cache contiguous: a block run = 2 * num_layers ranges.
KV_LAYOUT_NHD = "NHD"
# BLOCK_NHD: block-major, ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``:
# a block's K and V of every layer are one range, so a block run = one range.
KV_LAYOUT_BLOCK_NHD = "BLOCK_NHD"
# Blocks move byte-wise only between equal layouts (``KVLayoutDescriptor.check_compatible``).
# A v4 worker rejects BLOCK_NHD through this check, so the message shapes (and the version)
# did not change with it.
SUPPORTED_LAYOUTS = (KV_LAYOUT_NHD, KV_LAYOUT_BLOCK_NHD)


def _require(cond: bool, kind: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{kind}: {msg}")


def _to_int_tuple(obj: Any, name: str) -> None:
    """Coerce a list field of a frozen dataclass to a tuple (hashable, immutable)."""
    value = getattr(obj, name)
    if isinstance(value, list):
        object.__setattr__(obj, name, tuple(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferHandle(Signed):
    """Where a request's prompt KV lives, for a one-sided NIXL READ by the decode worker.

    Invariant: ``len(block_ids) == ceil(num_tokens / block_size)``; block ``i`` holds the
    KV of tokens ``[i * block_size, min((i + 1) * block_size, num_tokens))``::

        tokens   |0 ....... bs-1|bs ..... 2bs-1| ... |(n-1)bs .. num_tokens-1|
        blocks   | block_ids[0] | block_ids[1] | ... | block_ids[n-1] (partial)|
    """

    version: int = KV_TRANSFER_VERSION
    request_id: str
    prefill_worker_id: str
    incarnation: int  # etcd lease id of the prefill worker's registration
    agent_name: str  # NIXL agent name of the prefill worker
    block_ids: tuple[int, ...]  # prefill-side block ids, in token order
    num_tokens: int  # tokens whose KV the blocks hold (the prompt)
    block_size: int  # tokens per block
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    layout: str = KV_LAYOUT_NHD
    # This hold of the request's blocks on the prefill worker (one incarnation of the
    # request_id there); a Release or PULL_DONE naming another hold leaves it. 0 = unnamed.
    hold_id: int = 0
    # XXH3-64 of each block's KV (``kv_transfer/integrity.py``), in block order, when the
    # prefill worker runs with ``kv_checksums``; () = none (the reader checks nothing).
    block_checksums: tuple[int, ...] = ()
    # HMAC of every other field with the cluster's key (``kv_transfer.capability``): the
    # handle is a capability only the prefill worker could mint. b"" = unsigned (no key).
    mac: bytes = b""

    _KIND = "TransferHandle"
    _SCHEMA = {
        "version": INT, "request_id": STR, "prefill_worker_id": STR, "incarnation": INT,
        "agent_name": STR, "block_ids": INT_TUPLE, "num_tokens": INT, "block_size": INT,
        "dtype": STR, "layout": STR, "hold_id": INT, "block_checksums": INT_TUPLE,
        "mac": BYTES,
    }  # fmt: skip

    def __post_init__(self) -> None:
        _to_int_tuple(self, "block_ids")
        _to_int_tuple(self, "block_checksums")
        k = self._KIND
        _require(self.version == KV_TRANSFER_VERSION, k, f"unsupported version {self.version}")
        _require(bool(self.request_id), k, "empty request_id")
        _require(bool(self.prefill_worker_id), k, "empty prefill_worker_id")
        _require(bool(self.agent_name), k, "empty agent_name")
        _require(self.incarnation >= 0, k, f"negative incarnation {self.incarnation}")
        _require(self.block_size > 0, k, f"block_size must be > 0, got {self.block_size}")
        _require(self.num_tokens > 0, k, f"num_tokens must be > 0, got {self.num_tokens}")
        _require(all(b >= 0 for b in self.block_ids), k, "negative block id")
        _require(len(set(self.block_ids)) == len(self.block_ids), k, "duplicate block ids")
        expected = -(-self.num_tokens // self.block_size)
        _require(
            len(self.block_ids) == expected,
            k,
            f"{len(self.block_ids)} block ids for {self.num_tokens} tokens of block_size "
            f"{self.block_size} (expected {expected})",
        )
        _require(bool(self.dtype), k, "empty dtype")
        _require(self.layout in SUPPORTED_LAYOUTS, k, f"unsupported layout {self.layout!r}")
        _require(self.hold_id >= 0, k, f"negative hold_id {self.hold_id}")
        _require(len(self.block_checksums) in (0, len(self.block_ids)), k,
                 f"{len(self.block_checksums)} checksums for {len(self.block_ids)} blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    def to_bytes(self) -> bytes:
        return pack_message(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> TransferHandle:
        """Decode; raises ``ValueError`` on a wrong version or malformed input."""
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, KV_TRANSFER_VERSION))


@dataclass(frozen=True, slots=True, kw_only=True)
class KVLayoutDescriptor:
    """A worker's registered KV cache memory, as a remote reader needs it.

    Layer ``l``'s K cache for block ``b`` starts at ``k_base_addrs[l] + b *
    block_stride_bytes`` (same for V) and spans ``bytes_per_block`` bytes. ``NHD``
    (layer-major): ``block_stride_bytes == bytes_per_block``, so a run of consecutive block
    ids is one byte range per layer and K/V. ``BLOCK_NHD`` (block-major): a block holds
    ``K_0 V_0 K_1 V_1 ...`` back to back (``v_base_addrs[l] = k_base_addrs[l] +
    bytes_per_block``, ``k_base_addrs[l + 1] = v_base_addrs[l] + bytes_per_block``) and
    ``block_stride_bytes == 2 * num_layers * bytes_per_block``, so a run of consecutive
    blocks is ONE byte range from ``k_base_addrs[0]``.
    Addresses are virtual addresses in the owning process, valid only together with the
    NIXL agent metadata of the same incarnation.
    """

    version: int = KV_TRANSFER_VERSION
    agent_name: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    layout: str = KV_LAYOUT_NHD
    bytes_per_block: int  # block_size * num_kv_heads * head_dim * element size
    k_base_addrs: tuple[int, ...]  # [num_layers] address of block 0 of each K cache
    v_base_addrs: tuple[int, ...]  # [num_layers] address of block 0 of each V cache

    _KIND = "KVLayoutDescriptor"
    _SCHEMA = {
        "version": INT, "agent_name": STR, "num_layers": INT, "num_blocks": INT,
        "block_size": INT, "num_kv_heads": INT, "head_dim": INT, "dtype": STR, "layout": STR,
        "bytes_per_block": INT, "k_base_addrs": INT_TUPLE, "v_base_addrs": INT_TUPLE,
    }  # fmt: skip
    # Fields two workers must agree on to exchange blocks (num_blocks may differ).
    _COMPAT_FIELDS = (
        "num_layers", "block_size", "num_kv_heads", "head_dim", "dtype", "layout",
        "bytes_per_block",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _to_int_tuple(self, "k_base_addrs")
        _to_int_tuple(self, "v_base_addrs")
        k = self._KIND
        _require(self.version == KV_TRANSFER_VERSION, k, f"unsupported version {self.version}")
        _require(bool(self.agent_name), k, "empty agent_name")
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            _require(getattr(self, name) > 0, k, f"{name} must be > 0")
        _require(self.bytes_per_block > 0, k, "bytes_per_block must be > 0")
        _require(bool(self.dtype), k, "empty dtype")
        _require(self.layout in SUPPORTED_LAYOUTS, k, f"unsupported layout {self.layout!r}")
        for name in ("k_base_addrs", "v_base_addrs"):
            addrs = getattr(self, name)
            _require(len(addrs) == self.num_layers, k, f"{name} has {len(addrs)} entries")
            _require(all(a > 0 for a in addrs), k, f"{name} has a null address")
        if self.is_block_major:  # one block = K_0 V_0 K_1 V_1 ... back to back
            bpb = self.bytes_per_block
            _require(all(v == kb + bpb for kb, v in zip(self.k_base_addrs, self.v_base_addrs,
                                                         strict=True))
                     and all(kn == v + bpb for v, kn in zip(self.v_base_addrs,
                                                            self.k_base_addrs[1:], strict=False)),
                     k, "BLOCK_NHD addresses are not K_0 V_0 K_1 ... back to back")

    @property
    def bytes_per_layer_cache(self) -> int:
        """Bytes of one layer's K (or V) cache."""
        return self.num_blocks * self.bytes_per_block

    @property
    def is_block_major(self) -> bool:
        return self.layout == KV_LAYOUT_BLOCK_NHD

    @property
    def block_stride_bytes(self) -> int:
        """Bytes from block ``b`` to block ``b + 1`` of one layer's K (or V) cache."""
        return 2 * self.num_layers * self.bytes_per_block if self.is_block_major \
            else self.bytes_per_block

    def check_compatible(self, other: KVLayoutDescriptor) -> None:
        """Raise ``ValueError`` if blocks of ``other`` cannot be copied byte-wise into ours."""
        diffs = [
            f"{n}: {getattr(self, n)!r} != {getattr(other, n)!r}"
            for n in self._COMPAT_FIELDS
            if getattr(self, n) != getattr(other, n)
        ]
        if diffs:
            hint = (" (the workers' CacheConfig.kv_layout differ: run every worker with the "
                    "same --kv-layout)" if self.layout != other.layout else "")
            raise ValueError(
                f"KV layout of {other.agent_name!r} is incompatible with {self.agent_name!r}: "
                + "; ".join(diffs) + hint
            )

    def to_bytes(self) -> bytes:
        return pack_message(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> KVLayoutDescriptor:
        """Decode; raises ``ValueError`` on a wrong version or malformed input."""
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, KV_TRANSFER_VERSION))


class KVNotificationKind(IntEnum):
    """What a decode worker tells a prefill worker about a request's blocks."""

    PULL_DONE = 1  # blocks were read; release them
    PULL_ABORTED = 2  # decode gave up (failure, cancellation); release them


@dataclass(frozen=True, slots=True, kw_only=True)
class KVNotification:
    """NIXL notification payload from decode to prefill (sent with/after the READ).

    ``incarnation`` is the prefill incarnation from the ``TransferHandle``; a prefill
    worker ignores notifications addressed to another incarnation of itself.
    """

    version: int = KV_TRANSFER_VERSION
    kind: KVNotificationKind
    request_id: str
    incarnation: int
    hold_id: int = 0  # the TransferHandle's: only that hold is released (0 = any)

    _KIND = "KVNotification"
    _SCHEMA = {"version": INT, "kind": INT, "request_id": STR, "incarnation": INT,
               "hold_id": INT}

    def __post_init__(self) -> None:
        k = self._KIND
        _require(self.version == KV_TRANSFER_VERSION, k, f"unsupported version {self.version}")
        try:
            object.__setattr__(self, "kind", KVNotificationKind(self.kind))
        except ValueError as e:
            raise ValueError(f"{k}: unknown kind {self.kind!r}") from e
        _require(bool(self.request_id), k, "empty request_id")
        _require(self.incarnation >= 0, k, f"negative incarnation {self.incarnation}")
        _require(self.hold_id >= 0, k, f"negative hold_id {self.hold_id}")

    def to_bytes(self) -> bytes:
        fields = asdict(self)
        fields["kind"] = int(self.kind)
        return pack_message(fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> KVNotification:
        """Decode; raises ``ValueError`` on a wrong version or malformed input."""
        return cls(**unpack_message(data, cls._SCHEMA, cls._KIND, KV_TRANSFER_VERSION))


__all__ = [
    "KV_LAYOUT_BLOCK_NHD",
    "KV_LAYOUT_NHD",
    "KV_TRANSFER_VERSION",
    "KVLayoutDescriptor",
    "KVNotification",
    "KVNotificationKind",
    "TransferHandle",
]
