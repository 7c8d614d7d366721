"""The cluster driver of ``test_multinode.py``, run inside the head node's namespace (not
collected: no test_ prefix): etcd bound to the head's address, then ``LocalCluster`` joined to
the two-node Ray (as ``scission up --ray-address ... --etcd-endpoints ... --worker-resource``
would). Writes ``{"router_address", "cluster_token", "etcd_endpoint"}`` as JSON to
``--info`` once every worker is registered, then serves until stdin closes (or SIGTERM) and
stops the cluster and etcd. The test process lives in another namespace; the token lets it
call the workers' internal API (``GetStats``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from scission.cluster.etcd_server import EmbeddedEtcd, EmbeddedEtcdConfig
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.engine.config import CacheConfig, EngineConfig
from scission.registry.workers import WorkerRole
from scission.router.config import PlacementConfig, RouterConfig, RoutingPolicy


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--head-ip", required=True)
    p.add_argument("--ray-address", required=True)
    p.add_argument("--info", required=True, type=Path)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--lease-ttl-s", type=int, required=True)
    p.add_argument("--num-blocks", type=int, default=256)
    args = p.parse_args()
    etcd = EmbeddedEtcd(EmbeddedEtcdConfig(host=args.head_ip, data_dir=args.data_dir,
                                           unsafe_no_fsync=True)).start()
    # Two prefill workers, one per node (each node offers one sc_prefill), the decode worker
    # on the head (only it offers sc_decode); round robin alternates the prefill node.
    cfg = ClusterConfig(
        num_prefill=2, num_decode=1, ray_address=args.ray_address,
        etcd_endpoints=(etcd.endpoint,), lease_ttl_s=args.lease_ttl_s, threads_per_worker=1,
        hold_timeout_s=60, max_worker_restarts=0,
        worker_resources={WorkerRole.PREFILL: {"sc_prefill": 1},
                          WorkerRole.DECODE: {"sc_decode": 1}},
        engine=EngineConfig(cache=CacheConfig(num_blocks=args.num_blocks)),
        router=RouterConfig(host=args.head_ip, port=0,
                            placement=PlacementConfig(policy=RoutingPolicy.ROUND_ROBIN)))
    cluster = LocalCluster(cfg)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        cluster.start()
        tmp = args.info.with_suffix(".tmp")
        tmp.write_text(json.dumps({"router_address": cluster.router_address,
                                   "cluster_token": cluster.cluster_token,
                                   "etcd_endpoint": etcd.endpoint}))
        os.replace(tmp, args.info)
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait()
    finally:
        cluster.stop()
        etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
