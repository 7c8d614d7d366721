"""``scission status``: one read of the worker directory in etcd, printed as a table."""

from __future__ import annotations

import json
import sys
import time

from scission.registry.directory import WorkerDirectory
from scission.registry.etcd_watch import ETCD_ERRORS, describe_etcd_error
from scission.registry.workers import EtcdClientConfig, RegistryConfig, connect


def print_status(etcd: EtcdClientConfig, prefix: str, as_json: bool) -> int:
    """Exit code 1 and one line on stderr when etcd does not answer."""
    endpoints = etcd.endpoints
    client = connect(etcd)
    try:
        rows = _rows(WorkerDirectory(client, RegistryConfig(prefix=prefix)))
    except ETCD_ERRORS as e:
        print(f"scission: error: etcd unreachable at {', '.join(endpoints)} "
              f"({describe_etcd_error(e)})", file=sys.stderr)
        return 1
    finally:
        client.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    pools: dict[str, int] = {}
    for r in rows:
        pools[r["role"]] = pools.get(r["role"], 0) + 1
    print("pools: " + (", ".join(f"{k}={v}" for k, v in sorted(pools.items())) or "none"))
    header = f"{'worker':<14}{'role':<11}{'endpoint':<22}{'KV used':>14}{'run':>6}{'wait':>6}"
    print(header)
    for r in rows:
        kv = f"{r['kv_blocks_used']}/{r['kv_blocks_total']}" if r["kv_blocks_used"] is not None \
            else f"?/{r['kv_blocks_total']}"
        print(f"{r['worker_id']:<14}{r['role']:<11}{r['endpoint']:<22}{kv:>14}"
              f"{r['running'] if r['running'] is not None else '?':>6}"
              f"{r['waiting'] if r['waiting'] is not None else '?':>6}")
    return 0


def _rows(directory: WorkerDirectory) -> list[dict]:
    """One read of the directory (raises etcd errors)."""
    rows = []
    with directory:
        for w in directory.workers():
            st = directory.stats(w.worker_id)
            used = w.num_blocks - st.num_free_blocks if st else None
            rows.append({
                "worker_id": w.worker_id, "role": w.role.value, "endpoint": w.endpoint,
                "kv_blocks_used": used, "kv_blocks_total": w.num_blocks,
                "running": st.num_running if st else None,
                "waiting": st.num_waiting if st else None,
                "queued_prefill_tokens": st.queued_prefill_tokens if st else None,
                "uptime_s": round(time.time() - w.started_at_s),
            })
    return rows
