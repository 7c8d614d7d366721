"""Registrations only the cluster's workers can write: a MAC on each etcd record.

Anyone who reaches etcd could write a ``WorkerInfo`` by hand (the embedded etcd listens in
plaintext on 127.0.0.1 without credentials) and the router would send users' prompts to it.
So a worker signs what it writes, ``mac = HMAC-SHA256(key, record with mac = b"")[:16]``
with a key derived from the cluster token (``worker/cluster_auth.py``), and the cluster's
readers (router, controller, workers looking up peers) drop a record whose MAC does not
verify. Observers without the token (``scission status``) read records unverified.

An empty key (a worker or router built by hand in a test, no cluster token) signs with an
empty MAC and accepts only an empty MAC, as ``kv_transfer/capability.py`` does for handles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import TypeVar

MAC_BYTES = 16
R = TypeVar("R")


def record_key(cluster_token: str) -> bytes:
    """The signing key of a cluster's etcd records (b"" without a token)."""
    if not cluster_token:
        return b""
    return hmac.new(cluster_token.encode(), b"scission-registry-record-v1",
                    hashlib.sha256).digest()


def _mac(key: bytes, record) -> bytes:
    if not key:
        return b""
    payload = dataclasses.replace(record, mac=b"").to_bytes()
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


def sign_record(record: R, key: bytes) -> R:
    """``record`` (a ``Record`` dataclass with a ``mac: bytes`` field) with its MAC."""
    return dataclasses.replace(record, mac=_mac(key, record))


def verify_record(record, key: bytes) -> bool:
    """Whether ``record.mac`` is its MAC under ``key`` (constant time)."""
    return hmac.compare_digest(_mac(key, record), record.mac)
