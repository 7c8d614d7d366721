"""Handlers of ``scission planner status|pause|resume|mode`` (parsing lives in ``cli.py``):
the ``PlannerControl`` record the planner obeys and the decisions (``PlannerDecision``) it
leaves, in etcd (``registry.pools.PoolStore``). The SLOs shown are the routers' (their
cluster-scope ``SloWindow``), which ``scission up`` sets to the planner's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from scission.cluster import pools_view
from scission.cluster.pools_cli import handler, open_conn, print_json
from scission.registry.metrics import SCOPE_CLUSTER
from scission.registry.pools import PlannerControl, PlannerMode


@handler
def planner_status(args: argparse.Namespace) -> int:
    with open_conn(args) as conn:
        control = conn.store.read_control()
        decisions = conn.store.decisions(args.last)
        last_tick = conn.store.read_last_tick()
        slo = pools_view.read_slo(conn.client, conn.registry.prefix).get(SCOPE_CLUSTER)
    if args.json:
        print_json({**pools_view.control_dict(control, decisions),
                    "last_tick": pools_view.record_dict(last_tick) if last_tick else None,
                    "slo_ttft_ms": slo.slo_ttft_ms if slo else None,
                    "slo_tpot_ms": slo.slo_tpot_ms if slo else None})
        return 0
    print(pools_view.planner_line(control, slo))
    if control is None:
        print("  (never set: `scission up --planner` or `scission planner mode`)")
    if last_tick is not None:
        age_s = max(0.0, time.time() - last_tick.at_s)
        print(f"last tick ({age_s:.0f} s ago): {last_tick.action} ({last_tick.loop}): "
              f"{last_tick.reason}")
    print("last decisions:\n" + pools_view.decisions_table(decisions))
    return 0


@handler
def planner_set(args: argparse.Namespace) -> int:
    """``planner pause|resume|mode MODE``: rewrite the control record."""
    with open_conn(args) as conn:
        control = conn.store.read_control() or PlannerControl()
        if args.planner_command == "mode":
            control = replace(control, mode=PlannerMode(args.mode))
        else:
            control = replace(control, paused=args.planner_command == "pause")
        control = replace(control, updated_at_s=time.time())
        conn.store.write_control(control)
    if args.json:
        print_json(pools_view.record_dict(control))
    else:
        print(pools_view.planner_line(control, None))
    return 0
