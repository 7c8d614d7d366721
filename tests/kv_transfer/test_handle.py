"""Typed, versioned msgpack messages of the KV transfer contract."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest

from scission.kv_transfer.handle import (
    KV_LAYOUT_BLOCK_NHD,
    KV_TRANSFER_VERSION,
    KVLayoutDescriptor,
    KVNotification,
    KVNotificationKind,
    TransferHandle,
)

logger = logging.getLogger(__name__)


def make_handle(**overrides: Any) -> TransferHandle:
    fields: dict[str, Any] = dict(
        request_id="req-1",
        prefill_worker_id="prefill-0",
        incarnation=7587869430120853000,  # etcd lease ids are large int64
        agent_name="prefill-0:7587869430120853000",
        block_ids=(12, 3, 4, 5),
        num_tokens=50,
        block_size=16,
        dtype="bfloat16",
        hold_id=(1 << 63) - 5,  # the prefill worker's hold ids are random 63-bit
    )
    fields.update(overrides)
    return TransferHandle(**fields)


def make_layout(**overrides: Any) -> KVLayoutDescriptor:
    fields: dict[str, Any] = dict(
        agent_name="decode-0:1",
        num_layers=2,
        num_blocks=64,
        block_size=16,
        num_kv_heads=8,
        head_dim=128,
        dtype="bfloat16",
        bytes_per_block=16 * 8 * 128 * 2,
        k_base_addrs=(0x7F0000000000, 0x7F0000200000),
        v_base_addrs=(0x7F0000100000, 0x7F0000300000),
    )
    fields.update(overrides)
    return KVLayoutDescriptor(**fields)


def make_notification() -> KVNotification:
    return KVNotification(kind=KVNotificationKind.PULL_DONE, request_id="req-1", incarnation=3,
                          hold_id=(1 << 63) - 5)


MESSAGES = [make_handle, make_layout, make_notification]


def repack(msg: bytes, **changes: Any) -> bytes:
    """Decode raw msgpack, apply ``changes`` (``None`` deletes a key), re-encode."""
    fields = msgpack.unpackb(msg)
    for key, value in changes.items():
        if value is None:
            fields.pop(key)
        else:
            fields[key] = value
    return msgpack.packb(fields)


@pytest.mark.parametrize("factory", MESSAGES)
def test_roundtrip_is_identity(factory: Any) -> None:
    """from_bytes(to_bytes(m)) == m, field types included (tuples stay tuples)."""
    msg = factory()
    decoded = type(msg).from_bytes(msg.to_bytes())
    assert decoded == msg
    assert decoded.version == KV_TRANSFER_VERSION == 4


def test_block_checksums_roundtrip_as_unsigned_64_bit_and_count_checked() -> None:
    """XXH3-64 values use all 64 bits; one per block or none."""
    sums = (0, (1 << 64) - 1, 1 << 63, 12345)
    handle = TransferHandle.from_bytes(make_handle(block_checksums=list(sums)).to_bytes())
    assert handle.block_checksums == sums
    assert make_handle().block_checksums == ()
    with pytest.raises(ValueError, match="3 checksums for 4 blocks"):
        make_handle(block_checksums=(1, 2, 3))


def test_handle_fields_and_derived_values() -> None:
    """A handle keeps its block ids in token order and derives num_blocks from them."""
    handle = TransferHandle.from_bytes(make_handle(block_ids=[12, 3, 4, 5]).to_bytes())
    assert handle.block_ids == (12, 3, 4, 5)
    assert handle.num_blocks == 4
    assert handle.layout == "NHD"
    assert handle.incarnation == 7587869430120853000


@pytest.mark.parametrize("factory", MESSAGES)
@pytest.mark.parametrize("version", [0, 1, KV_TRANSFER_VERSION + 100])
def test_version_mismatch_raises(factory: Any, version: int) -> None:
    """Any other version is rejected with a message that names the version."""
    msg = factory()
    with pytest.raises(ValueError, match=f"unsupported version {version}"):
        type(msg).from_bytes(repack(msg.to_bytes(), version=version))


def test_newer_version_with_new_fields_reports_version() -> None:
    """A newer payload with extra fields fails on the version, not on the field set."""
    data = repack(make_handle().to_bytes(), version=KV_TRANSFER_VERSION + 1, priority=5)
    with pytest.raises(ValueError, match=f"unsupported version {KV_TRANSFER_VERSION + 1}"):
        TransferHandle.from_bytes(data)


MALFORMED: dict[str, Any] = {
    "empty": b"",
    "invalid msgpack byte": b"\xc1",
    "truncated": make_handle().to_bytes()[:-3],
    "trailing garbage": make_handle().to_bytes() + b"\x00",
    "not a map": msgpack.packb([1, "req-1"]),
    "int keys": msgpack.packb({1: 1}),
    "no version": repack(make_handle().to_bytes(), version=None),
    "bool version": repack(make_handle().to_bytes(), version=True),
    "missing field": repack(make_handle().to_bytes(), num_tokens=None),
    "unknown field": repack(make_handle().to_bytes(), extra=1),
    "str block ids": repack(make_handle().to_bytes(), block_ids="1,2"),
    "float in block ids": repack(make_handle().to_bytes(), block_ids=[1.0, 2, 3, 4]),
    "bool incarnation": repack(make_handle().to_bytes(), incarnation=True),
    "int request id": repack(make_handle().to_bytes(), request_id=5),
    "negative block id": repack(make_handle().to_bytes(), block_ids=[-1, 2, 3, 4]),
    "too few blocks": repack(make_handle().to_bytes(), block_ids=[1, 2]),
    "duplicate blocks": repack(make_handle().to_bytes(), block_ids=[1, 1, 2, 3]),
    "bad layout": repack(make_handle().to_bytes(), layout="HND"),
    "zero block size": repack(make_handle().to_bytes(), block_size=0),
    "a layout descriptor": make_layout().to_bytes(),
    "not bytes": "req-1",
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_handle_raises_value_error(what: str) -> None:
    """Every malformed payload raises ValueError (never another type, never a half object)."""
    with pytest.raises(ValueError, match="TransferHandle"):
        TransferHandle.from_bytes(MALFORMED[what])


@pytest.mark.parametrize(
    "changes",
    [
        {"k_base_addrs": [1]},  # fewer addresses than layers
        {"v_base_addrs": [0, 1]},  # null address
        {"num_blocks": 0},
        {"layout": "HND"},
    ],
)
def test_malformed_layout_raises_value_error(changes: dict[str, Any]) -> None:
    """Layout descriptors with inconsistent fields are rejected on decode."""
    with pytest.raises(ValueError, match="KVLayoutDescriptor"):
        KVLayoutDescriptor.from_bytes(repack(make_layout().to_bytes(), **changes))


def test_unknown_notification_kind_raises() -> None:
    """Notification kinds are a closed enum; an unknown kind is a ValueError."""
    with pytest.raises(ValueError, match="unknown kind 9"):
        KVNotification.from_bytes(repack(make_notification().to_bytes(), kind=9))


def test_handle_constructor_checks_block_count() -> None:
    """ceil(num_tokens / block_size) must equal len(block_ids)."""
    assert make_handle(num_tokens=49).num_blocks == 4  # 3 full blocks + 1 partial
    assert make_handle(num_tokens=64).num_blocks == 4
    for num_tokens in (48, 65):
        with pytest.raises(ValueError, match="expected"):
            make_handle(num_tokens=num_tokens)


def test_layout_compatibility() -> None:
    """Layouts differing only in name, addresses or num_blocks are compatible; a dtype or
    head_dim difference is reported with both values."""
    base = make_layout()
    base.check_compatible(make_layout(agent_name="p:2", num_blocks=8, k_base_addrs=(8, 16)))
    other = make_layout(agent_name="p:3", dtype="float16", head_dim=64, bytes_per_block=8)
    with pytest.raises(ValueError, match="head_dim: 128 != 64; dtype: 'bfloat16' != 'float16'"):
        base.check_compatible(other)


def test_a_signed_handle_verifies_and_any_change_breaks_it() -> None:
    """The prefill worker's MAC (kv_transfer/capability.py) verifies under the cluster key;
    guessed block ids, another hold or request, another key, or no MAC all fail; without a
    cluster token only the unsigned handle passes. Hand-checked against HMAC-SHA256."""
    import dataclasses
    import hashlib
    import hmac

    from scission.kv_transfer.capability import transfer_key
    from scission.kv_transfer.codec import pack_message

    key = transfer_key("cluster-token")
    assert key == hmac.new(b"cluster-token", b"scission-transfer-handle-v1",
                           hashlib.sha256).digest()
    handle = make_handle(block_ids=[12, 3, 4, 5]).signed(key)
    fields = {k: v for k, v in sorted(dataclasses.asdict(handle).items()) if k != "mac"}
    assert handle.mac == hmac.new(key, pack_message(fields), hashlib.sha256).digest()[:16]
    decoded = TransferHandle.from_bytes(handle.to_bytes())
    assert decoded.verify(key)
    for change in ({"block_ids": (0, 1, 2, 3)}, {"hold_id": 7}, {"request_id": "other"},
                   {"mac": b""}):
        assert not dataclasses.replace(decoded, **change).verify(key), change
    assert not decoded.verify(transfer_key("another-cluster"))
    assert transfer_key("") == b"" and make_handle().verify(b"")
    assert not decoded.verify(b"")


def test_block_major_layout_roundtrip_and_refused_against_layer_major() -> None:
    """A BLOCK_NHD layout (K_0 V_0 K_1 V_1 back to back in a block) round-trips with its
    block stride of 2L blocks; addresses not in that order are refused; a layer-major
    (NHD) peer is incompatible, with the layouts and the --kv-layout hint in the error."""
    bpb, base = 16 * 8 * 128 * 2, 0x7F0000000000
    block = make_layout(layout=KV_LAYOUT_BLOCK_NHD, k_base_addrs=(base, base + 2 * bpb),
                        v_base_addrs=(base + bpb, base + 3 * bpb))
    assert KVLayoutDescriptor.from_bytes(block.to_bytes()) == block
    assert block.block_stride_bytes == 4 * bpb and make_layout().block_stride_bytes == bpb
    with pytest.raises(ValueError, match="back to back"):
        make_layout(layout=KV_LAYOUT_BLOCK_NHD)  # per-layer addresses far apart
    with pytest.raises(ValueError, match="layout: 'NHD' != 'BLOCK_NHD'.*--kv-layout"):
        make_layout().check_compatible(block)
    handle = make_handle(layout=KV_LAYOUT_BLOCK_NHD)
    assert TransferHandle.from_bytes(handle.to_bytes()).layout == KV_LAYOUT_BLOCK_NHD
