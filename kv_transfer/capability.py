"""Transfer handles as capabilities: a MAC only the cluster's workers can compute.

A ``TransferHandle`` (or ``EmbeddingHandle``) names memory another worker reads with a
one-sided NIXL READ, which the owner cannot check when it happens. So the owner signs the
handle when it grants it: ``mac = HMAC-SHA256(key, handle fields)[:16]`` with a key derived
from the cluster token (``worker/cluster_auth.py``); the reader verifies the MAC before it
reads anything. A handle with guessed block ids, or any field changed, fails verification and
reads nothing.

An empty key (a worker built by hand in a test, no cluster token) signs with an empty MAC and
accepts only an empty MAC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Any, Self

from scission.kv_transfer.codec import pack_message

MAC_BYTES = 16


def transfer_key(cluster_token: str) -> bytes:
    """The signing key of a cluster's handles (b"" without a token)."""
    if not cluster_token:
        return b""
    return hmac.new(cluster_token.encode(), b"scission-transfer-handle-v1",
                    hashlib.sha256).digest()


def mac_of(key: bytes, fields: dict[str, Any]) -> bytes:
    """MAC of a message's fields (``mac`` itself excluded), canonical msgpack."""
    if not key:
        return b""
    payload = pack_message({k: v for k, v in sorted(fields.items()) if k != "mac"})
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


def verify_mac(key: bytes, fields: dict[str, Any], mac: bytes) -> bool:
    """Whether ``mac`` is the MAC of ``fields`` under ``key`` (constant time)."""
    return hmac.compare_digest(mac_of(key, fields), mac)


class Signed:
    """Mixin for a frozen dataclass message with a ``mac: bytes`` field."""

    __slots__ = ()

    def signed(self, key: bytes) -> Self:
        """This message with its MAC under ``key`` (the owner grants it)."""
        return dataclasses.replace(self, mac=mac_of(key, dataclasses.asdict(self)))

    def verify(self, key: bytes) -> bool:
        """Whether the MAC is right under ``key`` (check before reading what it names)."""
        return verify_mac(key, dataclasses.asdict(self), self.mac)
