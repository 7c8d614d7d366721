"""Signed registrations (registry/signing.py) against a real etcd: what a worker holding the
cluster token writes is seen, what anyone else writes is dropped by verifying readers."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from test_registry import make_info, make_stats, wait_until

from scission.registry.directory import WorkerDirectory
from scission.registry.signing import MAC_BYTES, record_key, sign_record, verify_record
from scission.registry.workers import RegistryConfig, WorkerRegistration


def test_mac_is_hmac_sha256_of_the_unsigned_record():
    """Independent recomputation with hmac/hashlib, and every field is covered."""
    key = record_key("token-a")
    assert key == hmac.new(b"token-a", b"scission-registry-record-v1", hashlib.sha256).digest()
    info = make_info("w1")
    signed = sign_record(info, key)
    expect = hmac.new(key, info.to_bytes(), hashlib.sha256).digest()[:MAC_BYTES]
    assert signed.mac == expect and verify_record(signed, key)
    for field, value in (("endpoint", "10.9.9.9:1"), ("incarnation", 7), ("draining", True),
                         ("worker_id", "w2")):
        assert not verify_record(dataclasses.replace(signed, **{field: value}), key), field
    assert not verify_record(signed, record_key("token-b"))
    assert not verify_record(info, key)  # unsigned
    # No token: empty MAC, and only an empty MAC verifies.
    assert sign_record(info, record_key("")).mac == b""
    assert verify_record(info, b"") and not verify_record(signed, b"")


def test_directory_drops_records_not_signed_with_its_key(etcd_client, etcd_prefix):
    registry = RegistryConfig(prefix=etcd_prefix)
    key = record_key("cluster-token")
    verified = WorkerDirectory(etcd_client, registry, record_key=key)
    observer = WorkerDirectory(etcd_client, registry)  # no key: reads unverified
    with verified, observer, \
            WorkerRegistration(etcd_client, registry, record_key=key) as registration:
        registration.register(make_info("real"), ttl_s=10)
        registration.update_stats(make_stats(77))
        registration.set_draining(True)
        etcd_client.put(registry.workers_prefix + "forged", make_info("forged").to_bytes())
        etcd_client.put(registry.stats_prefix + "real", make_stats(5).to_bytes())  # overwrite
        wait_until(lambda: observer.get("forged") is not None
                   and getattr(observer.stats("real"), "num_free_blocks", None) == 5)
        wait_until(lambda: verified.num_rejected_records >= 2)
        assert [w.worker_id for w in verified.workers()] == ["real"]
        assert verified.get("real").draining
        assert verified.stats("real") is None  # the forged overwrite replaced the signed one
        registration.update_stats(make_stats(66))
        wait_until(lambda: getattr(verified.stats("real"), "num_free_blocks", None) == 66)
    # A fresh verified view (range read, not the watch) drops the forged record too.
    with WorkerDirectory(etcd_client, registry, record_key=key) as fresh:
        assert fresh.get("forged") is None and fresh.num_rejected_records == 1
