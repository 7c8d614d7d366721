"""``scission bench ...``: added to the ``scission`` CLI through the ``scission.cli``
entry point (``pyproject.toml``), so ``cluster/`` never imports ``bench/``."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``bench serve|engine|side-by-side|elastic|images|kv-transfer|worker-vs-engine``
    under the ``scission`` subparsers ``sub``."""
    from scission.bench import elastic, images, kv_transfer, side_by_side, worker_vs_engine
    from scission.bench import engine as bench_engine
    from scission.bench import serve as bench_serve

    bench = sub.add_parser("bench", help="benchmarks (needs the bench extra: pip install "
                                         "'scission[bench]')")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    serve = bench_sub.add_parser("serve", help="load generator against a running router")
    bench_serve.add_arguments(serve)
    serve.set_defaults(func=bench_serve.run)
    eng = bench_sub.add_parser("engine", help="engine alone vs HF transformers (and llama.cpp)")
    bench_engine.add_arguments(eng)
    eng.set_defaults(func=bench_engine.run)
    sbs = bench_sub.add_parser("side-by-side",
                               help="colocated vs disaggregated on the same cores, one command")
    side_by_side.add_arguments(sbs)
    sbs.set_defaults(func=side_by_side.run)
    ela = bench_sub.add_parser("elastic",
                               help="the pool planner vs static splits on a shifting workload")
    elastic.add_arguments(ela)
    ela.set_defaults(func=elastic.run)
    img = bench_sub.add_parser("images", help="an image workload on E-P-D vs EP-D vs colocated")
    images.add_arguments(img)
    img.set_defaults(func=images.run)
    kvt = bench_sub.add_parser("kv-transfer",
                               help="NIXL READ of a prompt's KV vs memcpy and TCP; the hand-off "
                                    "in a running cluster")
    kv_transfer.add_arguments(kvt)
    kvt.set_defaults(func=kv_transfer.run)
    from scission.bench import soak

    sk = bench_sub.add_parser("soak", help="a cluster under load for minutes, a fault every "
                                           "minute: served/failed/hung, RSS, blocks at the end")
    soak.add_arguments(sk)
    sk.set_defaults(func=soak.run)
    wve = bench_sub.add_parser("worker-vs-engine",
                               help="the same requests through the engine alone and one worker: "
                                    "decode TPOT vs step time")
    worker_vs_engine.add_arguments(wve)
    wve.set_defaults(func=worker_vs_engine.run_cli)
