"""Real NIXL (UCX backend) KV block READs between two spawned processes, DRAM to DRAM.

The "prefill" and "decode" peers are separate processes, each with its own
``KVTransferAgent``; metadata and layout travel through multiprocessing queues (stand-in
for etcd). Every wait is bounded and every process is killed in teardown.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator

import pytest
from kv_peer_procs import CacheSpec, PeerProcess, cache_block_bytes, make_kv_caches, spawn_context

from scission.kv_transfer.handle import KVNotification, KVNotificationKind

logger = logging.getLogger(__name__)

PREFILL_SEED, DECODE_SEED = 1, 2
# Non-contiguous remote ids with one run (3, 4, 5) that also maps to a local run (7, 8, 9).
REMOTE_IDS = [9, 3, 4, 5, 12]
LOCAL_IDS = [0, 7, 8, 9, 2]

PeerFactory = Callable[..., PeerProcess]


@pytest.fixture
def spawn_peers() -> Iterator[PeerFactory]:
    """Factory ``spawn_peers(*(name, spec, seed))`` -> started and ready peers."""
    ctx = spawn_context()
    started: list[PeerProcess] = []

    def spawn(*specs: tuple[str, CacheSpec, int]) -> list[PeerProcess]:
        peers = [PeerProcess(ctx, name, spec, seed) for name, spec, seed in specs]
        started.extend(peers)
        for peer in peers:  # start all first, so their start-up overlaps
            peer.wait_ready()
        return peers

    yield spawn
    for peer in started:
        peer.request_stop()  # all at once, so their shutdowns overlap
    for peer in started:
        peer.stop()
    assert not any(p.proc.is_alive() for p in started), "a peer process outlived the test"


def expected_decode_blocks(
    prefill: PeerProcess, decode: PeerProcess, remote_ids: list[int], local_ids: list[int]
) -> list[list[bytes]]:
    """Decode's initial blocks with ``local_ids[i]`` replaced by prefill's ``remote_ids[i]``."""
    src = cache_block_bytes(make_kv_caches(prefill.spec, prefill.seed))
    dst = cache_block_bytes(make_kv_caches(decode.spec, decode.seed))
    for tensor_idx in range(len(dst)):
        for r, loc in zip(remote_ids, local_ids, strict=True):
            dst[tensor_idx][loc] = src[tensor_idx][r]
    return dst


def notif_bytes(request_id: str) -> bytes:
    return KVNotification(
        kind=KVNotificationKind.PULL_DONE, request_id=request_id, incarnation=7
    ).to_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_read_blocks_byte_equal_and_notifies(spawn_peers: PeerFactory, dtype: str) -> None:
    """Decode's local blocks equal prefill's source blocks byte for byte, every other local
    block is untouched, and prefill receives decode's notification exactly once.

    Prefill's cache is 2L separate tensors, decode's is views into one big tensor.
    """
    prefill, decode = spawn_peers(
        ("prefill-0:7", CacheSpec(dtype=dtype), PREFILL_SEED),
        ("decode-0:8", CacheSpec(dtype=dtype, one_tensor=True), DECODE_SEED),
    )
    assert decode.add_peer(prefill)[0] == "ok"
    assert decode.add_peer(prefill)[0] == "ok"  # same incarnation again: a no-op

    result = decode.call("read", prefill.name, REMOTE_IDS, LOCAL_IDS, notif_bytes("req-1"), 20.0)
    assert result[0] == "ok", result

    status, blocks, _ = decode.call("cache_bytes")
    assert status == "ok"
    expected = expected_decode_blocks(prefill, decode, REMOTE_IDS, LOCAL_IDS)
    assert blocks == expected
    # The source blocks differ from decode's initial ones, so equality proves the copy.
    initial = cache_block_bytes(make_kv_caches(decode.spec, decode.seed))
    assert all(blocks[0][loc] != initial[0][loc] for loc in LOCAL_IDS)

    status, notifs, _ = prefill.call("poll_notifs", 20.0)
    assert status == "ok"
    assert [(sender, KVNotification.from_bytes(msg)) for sender, msg in notifs] == [
        (decode.name, KVNotification.from_bytes(notif_bytes("req-1")))
    ]
    assert prefill.call("poll_notifs", 0.3)[1] == []


def test_invalid_reads_raise_before_posting(spawn_peers: PeerFactory) -> None:
    """Out-of-range or mismatched block ids raise ValueError, an unknown peer raises
    KVTransferError, all before anything is posted: decode's cache stays untouched and
    prefill receives no notification. A layout published under another name is refused."""
    prefill, decode = spawn_peers(
        ("prefill-1:7", CacheSpec(), PREFILL_SEED), ("decode-1:8", CacheSpec(), DECODE_SEED)
    )
    assert decode.add_peer(prefill)[0] == "ok"
    n = CacheSpec().num_blocks
    bad_reads = {
        "remote out of range": (prefill.name, [0, n], [0, 1]),
        "local out of range": (prefill.name, [0, 1], [0, n]),
        "negative": (prefill.name, [-1], [0]),
        "length mismatch": (prefill.name, [0, 1], [0]),
        "duplicate local": (prefill.name, [0, 1], [3, 3]),
    }
    for what, (peer, remote_ids, local_ids) in bad_reads.items():
        result = decode.call("read", peer, remote_ids, local_ids, notif_bytes(what), 5.0)
        assert result[:2] == ("error", "ValueError"), (what, result)
    result = decode.call("read", "nobody:0", [0], [0], notif_bytes("unknown"), 5.0)
    assert result[:2] == ("error", "KVTransferError"), result
    result = decode.call("add_peer", "other:1", prefill.metadata, prefill.layout_bytes)
    assert result[:2] == ("error", "ValueError"), result

    status, blocks, _ = decode.call("cache_bytes")
    assert blocks == cache_block_bytes(make_kv_caches(decode.spec, decode.seed))
    assert prefill.call("poll_notifs", 0.5)[1] == []


def test_dead_peer_fails_then_new_incarnation_replaces_it(spawn_peers: PeerFactory) -> None:
    """Reading from a SIGKILLed peer raises KVTransferError promptly (no hang); re-adding
    the same agent name with a restarted process's metadata replaces the stale entry and
    the next read returns the new process's bytes."""
    spec = CacheSpec(dtype="bfloat16")
    # The restarted incarnation (same agent name, other data) starts up alongside, which
    # only saves time: it is not known to decode until it is added.
    prefill, decode, restarted = spawn_peers(
        ("prefill-2", spec, PREFILL_SEED),
        ("decode-2:8", spec, DECODE_SEED),
        ("prefill-2", spec, PREFILL_SEED + 10),
    )
    assert decode.add_peer(prefill)[0] == "ok"
    prefill.kill()

    result = decode.call("read", prefill.name, REMOTE_IDS, LOCAL_IDS, notif_bytes("r"), 10.0)
    assert result[:2] == ("error", "KVTransferError"), result

    assert decode.add_peer(restarted)[0] == "ok"
    result = decode.call("read", restarted.name, REMOTE_IDS, LOCAL_IDS, notif_bytes("r2"), 20.0)
    assert result[0] == "ok", result
    status, blocks, _ = decode.call("cache_bytes")
    assert blocks == expected_decode_blocks(restarted, decode, REMOTE_IDS, LOCAL_IDS)
    assert restarted.call("poll_notifs", 20.0)[1] == [(decode.name, notif_bytes("r2"))]


def test_hung_peer_times_out_and_agent_recovers(spawn_peers: PeerFactory) -> None:
    """A READ from a frozen (SIGSTOPped) peer raises KVTransferTimeoutError after its
    timeout instead of hanging; once the peer resumes, the same agents complete a read."""
    prefill, decode = spawn_peers(
        ("prefill-3:7", CacheSpec(), PREFILL_SEED), ("decode-3:8", CacheSpec(), DECODE_SEED)
    )
    assert decode.add_peer(prefill)[0] == "ok"
    prefill.signal(signal.SIGSTOP)
    try:
        result = decode.call("read", prefill.name, [1], [1], notif_bytes("hung"), 1.0)
    finally:
        prefill.signal(signal.SIGCONT)
    assert result[:2] == ("error", "KVTransferTimeoutError"), result

    result = decode.call("read", prefill.name, REMOTE_IDS, LOCAL_IDS, notif_bytes("ok"), 20.0)
    assert result[0] == "ok", result
    status, blocks, _ = decode.call("cache_bytes")
    expected = expected_decode_blocks(prefill, decode, REMOTE_IDS, LOCAL_IDS)
    source = cache_block_bytes(make_kv_caches(prefill.spec, prefill.seed))
    for tensor_idx, tensor_blocks in enumerate(blocks):
        # Local block 1 was the cancelled READ's target: untouched or fully read (cma
        # copies before completion is reported), never anything else.
        assert tensor_blocks[1] in (expected[tensor_idx][1], source[tensor_idx][1])
        tensor_blocks[1] = expected[tensor_idx][1]
    assert blocks == expected
    assert decode.call("close")[0] == "ok"


def test_concurrent_reads_from_threads(spawn_peers: PeerFactory) -> None:
    """Reads issued from several threads of one agent at once (engine + gRPC threads) all
    complete, land in their own local blocks, and each sends its own notification."""
    prefill, decode = spawn_peers(
        ("prefill-4:7", CacheSpec(), PREFILL_SEED), ("decode-4:8", CacheSpec(), DECODE_SEED)
    )
    assert decode.add_peer(prefill)[0] == "ok"
    reads = [([2 * i, 2 * i + 1], [15 - i, 8 + i], notif_bytes(f"req-{i}")) for i in range(4)]
    status, results, _ = decode.call("read_threads", prefill.name, reads, 20.0)
    assert (status, results) == ("ok", ["ok"] * 4)

    remote_ids = [r for remote, _, _ in reads for r in remote]
    local_ids = [loc for _, local, _ in reads for loc in local]
    assert decode.call("cache_bytes")[1] == expected_decode_blocks(
        prefill, decode, remote_ids, local_ids
    )
    notifs: list[tuple[str, bytes]] = []
    for _ in range(50):
        notifs += prefill.call("poll_notifs", 0.2)[1]
        if len(notifs) == len(reads):
            break
    assert sorted(notifs) == sorted((decode.name, msg) for _, _, msg in reads)


def test_read_pages_byte_equal_and_notifies(spawn_peers: PeerFactory) -> None:
    """Image embedding pages registered next to the KV cache: a READ of a peer's pages (one
    run merged, one not) lands byte-equal where asked, every other page untouched, and the
    READ's notification reaches the peer; a standalone notification does too."""
    from kv_peer_procs import make_embedding_pages, page_bytes

    from scission.kv_transfer.embeddings import (
        EmbeddingNotification,
        EmbeddingNotificationKind,
    )

    spec = CacheSpec(embedding_pages=8)
    encoder, prefill = spawn_peers(("encode", spec, 5), ("prefill", spec, 6))
    assert prefill.add_peer(encoder)[0] == "ok"
    remote, local = [6, 2, 3], [0, 4, 5]
    note = EmbeddingNotification(kind=EmbeddingNotificationKind.PULLED, pin_id="pin-1",
                                 incarnation=7)
    status = prefill.call("read_pages", encoder.name, remote, local, note.to_bytes(), 10.0)
    assert status[0] == "ok", status
    src = page_bytes(make_embedding_pages(spec, 5))
    expected = page_bytes(make_embedding_pages(spec, 6))
    for r, loc in zip(remote, local, strict=True):
        expected[loc] = src[r]
    assert prefill.call("page_bytes")[1] == expected
    _, notifs, _ = encoder.call("poll_notifs", 10.0)
    assert [(peer, EmbeddingNotification.from_bytes(m)) for peer, m in notifs] == \
        [(prefill.name, note)]
    aborted = EmbeddingNotification(kind=EmbeddingNotificationKind.ABORTED, pin_id="pin-2",
                                    incarnation=7)
    assert prefill.call("send_notification", encoder.name, aborted.to_bytes())[0] == "ok"
    _, notifs, _ = encoder.call("poll_notifs", 10.0)
    assert [EmbeddingNotification.from_bytes(m) for _, m in notifs] == [aborted]
    bad = prefill.call("read_pages", encoder.name, [8], [0], b"", 10.0)
    assert bad[:2] == ("error", "ValueError")  # page id out of range, nothing posted


def test_block_major_read_byte_equal(spawn_peers: PeerFactory) -> None:
    """Block-major caches on both sides (KVLayout.BLOCK_MAJOR: one descriptor per merged
    run, every layer's K and V in it): decode's local blocks equal prefill's source blocks
    byte for byte in every layer, every other block is untouched, and the notification
    arrives once."""
    prefill, decode = spawn_peers(
        ("prefill-bm:7", CacheSpec(block_major=True), PREFILL_SEED),
        ("decode-bm:8", CacheSpec(block_major=True), DECODE_SEED),
    )
    assert decode.add_peer(prefill)[0] == "ok"
    result = decode.call("read", prefill.name, REMOTE_IDS, LOCAL_IDS, notif_bytes("req-bm"), 20.0)
    assert result[0] == "ok", result
    status, blocks, _ = decode.call("cache_bytes")
    assert status == "ok"
    assert blocks == expected_decode_blocks(prefill, decode, REMOTE_IDS, LOCAL_IDS)
    initial = cache_block_bytes(make_kv_caches(decode.spec, decode.seed))
    assert all(blocks[-1][loc] != initial[-1][loc] for loc in LOCAL_IDS)  # last layer's V too
    status, notifs, _ = prefill.call("poll_notifs", 20.0)
    assert [KVNotification.from_bytes(msg) for _, msg in notifs] == [
        KVNotification.from_bytes(notif_bytes("req-bm"))]


def test_layer_major_decode_refuses_block_major_prefill(spawn_peers: PeerFactory) -> None:
    """A layer-major decode worker cannot copy a block-major prefill's blocks byte-wise:
    add_peer raises ValueError naming the layouts (the decode worker's pull fails and it
    recomputes the prompt), and no READ can be posted to that peer."""
    prefill, decode = spawn_peers(
        ("prefill-bm:9", CacheSpec(block_major=True), PREFILL_SEED),
        ("decode-lm:10", CacheSpec(), DECODE_SEED),
    )
    status, kind, msg, _ = decode.add_peer(prefill)
    assert (status, kind) == ("error", "ValueError")
    assert "layout: 'NHD' != 'BLOCK_NHD'" in msg and "--kv-layout" in msg, msg
    result = decode.call("read", prefill.name, [0], [0], b"", 5.0)
    assert result[:2] == ("error", "KVTransferError"), result
    status, blocks, _ = decode.call("cache_bytes")
    assert blocks == cache_block_bytes(make_kv_caches(decode.spec, decode.seed))
