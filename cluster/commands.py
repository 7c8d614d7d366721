"""Handlers behind ``scission`` subcommands (parsing lives in ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from scission.cluster.client import GenerationResult, connect, load_image, make_request
from scission.cluster.client import generate as run_one
from scission.cluster.launcher import ClusterConfig, LocalCluster
from scission.cluster.shutdown import (
    DEFAULT_GRACE_S,
    StopSignal,
    judge,
    request_stop,
    stop_cluster,
)
from scission.cluster.state import (
    DEFAULT_STATE_FILE,
    ClusterState,
    StopRequest,
    etcd_client_config,
    etcd_tls_files,
)
from scission.engine.config import CacheConfig, EngineConfig, KVLayout, SchedulerConfig
from scission.registry.pools import PlannerMode
from scission.registry.workers import WorkerRole
from scission.router.auth import load_api_keys
from scission.router.config import PlacementConfig, RouterConfig, RoutingPolicy

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Name three primary colors and one thing that is each color.",
)


def _fail(msg: str) -> int:
    print(f"scission: error: {msg}", file=sys.stderr)
    return 2


def cluster_config(args: argparse.Namespace) -> ClusterConfig:
    engine = EngineConfig(
        model_path=args.model, dtype=args.dtype, weight_quantization=args.weight_quantization,
        linear_backend=args.linear_backend, enforce_eager=not args.graph_mode,
        native_decode=not args.no_native_decode,
        cache=CacheConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache_mb * 2**20,
                          enable_prefix_caching=not args.no_prefix_caching,
                          kv_layout=KVLayout(args.kv_layout)),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_batched_tokens))
    endpoints = tuple(e for e in args.etcd_endpoints.split(",") if e)
    external = etcd_tls_files(args) or getattr(args, "etcd_user", None)
    if external and not endpoints:
        raise ValueError("--etcd-cacert/--etcd-cert/--etcd-key/--etcd-user are for an external "
                         "etcd: pass --etcd-endpoints too (for TLS to the embedded etcd: "
                         "--embedded-etcd-tls)")
    if endpoints and getattr(args, "embedded_etcd_tls", False):
        raise ValueError("--embedded-etcd-tls is for the embedded etcd: drop --etcd-endpoints")
    return ClusterConfig(
        etcd_tls=etcd_client_config(args, endpoints, None) if external else None,
        embedded_etcd_tls=getattr(args, "embedded_etcd_tls", False),
        num_prefill=args.prefill, num_decode=args.decode, num_colocated=args.colocated,
        num_encode=args.encode, engine=engine, router=_router_config(args),
        etcd_endpoints=endpoints, ray_address=args.ray_address, lease_ttl_s=args.lease_ttl_s,
        threads_per_worker=args.threads_per_worker, max_worker_restarts=args.max_worker_restarts,
        max_router_restarts=args.max_router_restarts, worker_host=args.worker_host,
        planner_mode=PlannerMode(args.planner), slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms, max_workers=args.max_workers,
        drain_deadline_s=args.drain_deadline_s, planner_interval_s=args.planner_interval_s,
        control_metrics_port=args.control_metrics_port, kv_checksums=args.kv_checksums,
        worker_resources=worker_resources(args.worker_resource))


def worker_resources(items: list[str]) -> dict[WorkerRole, dict[str, float]]:
    """``--worker-resource`` values: ``["decode=big_mem", "prefill=fast:0.5"]`` ->
    ``{DECODE: {"big_mem": 1.0}, PREFILL: {"fast": 0.5}}``. Raises ValueError on a bad item
    (unknown role, no name, an amount that is not a number > 0)."""
    out: dict[WorkerRole, dict[str, float]] = {}
    for item in items:
        role_value, _, spec = item.partition("=")
        name, _, amount = spec.partition(":")
        try:
            role, value = WorkerRole(role_value.strip()), float(amount or 1)
        except ValueError:
            role, value = None, 0.0
        if role is None or not name.strip() or not value > 0:
            raise ValueError(f"--worker-resource {item!r}: expected ROLE=NAME[:N], ROLE one of "
                             f"{', '.join(r.value for r in WorkerRole)}, N > 0")
        out.setdefault(role, {})[name.strip()] = value
    return out


def _abspath(path: str | None) -> str | None:
    # The router runs in a Ray worker process, whose working directory is not ours.
    return None if path is None else os.path.abspath(path)


def _router_config(args: argparse.Namespace) -> RouterConfig:
    """The router measures SLO attainment (its published SloWindow) against the planner's
    SLOs, so both judge the same requests the same way. API keys are loaded here once only to
    fail early (a missing file or unset variable); the router loads them itself."""
    load_api_keys(_abspath(args.api_keys_file), args.api_keys_env)
    return RouterConfig(host=args.host, port=args.port, model_path=args.model,
                        tls_cert_file=_abspath(args.tls_cert), tls_key_file=_abspath(args.tls_key),
                        tls_client_ca_file=_abspath(args.tls_client_ca),
                        api_keys_file=_abspath(args.api_keys_file),
                        api_keys_env=args.api_keys_env,
                        metrics_port=args.metrics_port, metrics_host=args.host,
                        http_port=args.http_port,
                        max_concurrent_requests=args.max_concurrent_requests,
                        max_queued_prompt_tokens=args.max_queued_prompt_tokens,
                        max_image_bytes=args.max_image_bytes,
                        max_images_per_request=args.max_images_per_request,
                        max_image_pixels=args.max_image_pixels, image_formats=args.image_formats,
                        max_message_bytes=args.max_message_bytes,
                        placement=PlacementConfig(policy=RoutingPolicy(args.routing_policy)),
                        slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                        kv_pipelining=args.kv_pipelining)


def _start(cfg: ClusterConfig) -> LocalCluster:
    pools = ", ".join(f"{n} {role.value}" for role, n in cfg.pools.items())
    print(f"scission: starting {pools} worker(s); each loads the model (~10-60 s) ...",
          file=sys.stderr, flush=True)
    cluster = LocalCluster(cfg)
    t0 = time.monotonic()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    print(f"scission: cluster up in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return cluster


def up(args: argparse.Namespace) -> int:
    if ClusterState.read() is not None:
        return _fail(f"a cluster is already running (state file {DEFAULT_STATE_FILE}); "
                     "`scission down` first")
    try:
        cfg = cluster_config(args)
    except ValueError as e:
        return _fail(str(e))
    stop = StopSignal().install()  # LocalCluster keeps these across ray.init (not Ray's)
    cluster = _start(cfg)
    stop.serving = True
    _state(args, cfg, cluster).write()
    scheme = "https" if cfg.router.tls else "http"
    http = (f"\nscission OpenAI-compatible HTTP on {scheme}://{cluster.router_http_address}/v1"
            if cluster.router_http_address else "")
    print(f"scission router listening on {cluster.router_address}{http}\n"
          f"  try:  scission generate --chat \"What is the capital of France?\"\n"
          f"  stop: Ctrl-C here, or `scission down`", flush=True)
    try:
        stop.requested.wait()
        request = StopRequest.take(os.getpid())
        grace_s = request.grace_s if request is not None else DEFAULT_GRACE_S
        print(f"scission: stopping: requests in flight get up to {grace_s:.0f} s (signal "
              f"again to stop now) ...", file=sys.stderr, flush=True)
        report = stop_cluster(cluster, grace_s, stop.now)
        report.write()
    finally:
        DEFAULT_STATE_FILE.unlink(missing_ok=True)
    result = judge(report)
    print(f"scission: {result.message}", file=sys.stderr, flush=True)
    return 0 if result.ok else 1


def _state(args: argparse.Namespace, cfg: ClusterConfig, cluster: LocalCluster) -> ClusterState:
    """What later commands on this host need: the etcd endpoints and client credentials
    (paths: the embedded etcd's client certificate, or the external etcd's files and user)."""
    etcd = cluster.etcd
    tls = etcd.tls_files if etcd is not None else None
    password_file = getattr(args, "etcd_password_file", None)
    return ClusterState(os.getpid(), cluster.router_address,
                        list(cfg.etcd_endpoints) or [etcd.endpoint], cfg.registry_prefix,
                        max_workers=cluster.max_workers,
                        etcd_tls_files=tls.client_files() if tls else etcd_tls_files(args),
                        etcd_user=getattr(args, "etcd_user", None) or "",
                        etcd_password_file=os.path.abspath(password_file) if password_file
                        else "")


def down(args: argparse.Namespace) -> int:
    state = ClusterState.load()
    if state is None:
        return _fail("no running cluster found (nothing started with `scission up`)")
    print(f"scission: stopping the cluster of `scission up` (pid {state.pid}); requests in "
          f"flight get up to {args.grace_s:.0f} s ...", file=sys.stderr, flush=True)
    result = request_stop(state, args.grace_s)
    if not result.ok:
        print(f"scission: error: {result.message}", file=sys.stderr)
        return 1
    print(f"scission: {result.message}")
    return 0


def _print_result(res: GenerationResult, streamed: bool) -> None:
    if res.error:
        print(f"error: {res.error}", file=sys.stderr)
        return
    if not streamed:
        print(res.text)
    print(f"\n[{res.finish_reason}] prompt_tokens={res.prompt_tokens} "
          f"output_tokens={res.output_tokens} cached_tokens={res.cached_tokens} "
          f"ttft_ms={res.ttft_ms:.1f} tpot_ms={res.tpot_ms:.1f} "
          f"prefill={res.prefill_worker} decode={res.decode_worker}", file=sys.stderr)


def generate(args: argparse.Namespace) -> int:
    address = args.router or getattr(ClusterState.read(), "router_address", None)
    if address is None:
        return _fail("no router address: pass --router or start one with `scission up`")
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    elif args.prompt:
        prompts = [args.prompt]
    else:
        return _fail("give a prompt or --file")
    try:
        images = [load_image(path) for path in args.image]
    except FileNotFoundError as e:
        return _fail(f"--image {e.filename}: no such file")
    except OSError as e:
        return _fail(f"--image {e.filename}: cannot read it ({e.strerror})")
    temperature = 0.0 if args.greedy else args.temperature
    reqs = [make_request(p, args.chat or bool(images), args.max_tokens, temperature, args.top_p,
                         args.top_k, args.seed, tuple(args.stop), args.system, images)
            for p in prompts]
    stub = connect(address, args.tls_ca, os.environ.get(args.api_key_env) or None,
                   args.tls_cert, args.tls_key)
    stream = len(reqs) == 1 and not args.json
    if stream:
        res = run_one(stub, reqs[0], args.timeout_s, lambda t: print(t, end="", flush=True))
        _print_result(res, streamed=True)
        return 1 if res.error else 0
    with ThreadPoolExecutor(max(1, min(len(reqs), 64))) as ex:
        results = list(ex.map(lambda r: run_one(stub, r, args.timeout_s), reqs))
    for prompt, res in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, **res.to_dict()}))
        else:
            print(f"### {prompt}")
            _print_result(res, streamed=False)
    return 1 if any(r.error for r in results) else 0


def status(args: argparse.Namespace) -> int:
    from scission.cluster.status import print_status

    state = ClusterState.read()
    endpoints = [e for e in args.etcd_endpoints.split(",") if e] or (
        state.etcd_endpoints if state else [])
    if not endpoints:
        return _fail("no etcd endpoint: pass --etcd-endpoints or start one with `scission up`")
    prefix = args.prefix or (state.registry_prefix if state else "/scission")
    try:
        etcd = etcd_client_config(args, endpoints, state)
    except ValueError as e:
        return _fail(str(e))
    return print_status(etcd, prefix, args.json)



def demo(args: argparse.Namespace) -> int:
    if args.tls_cert or args.api_keys_file or args.api_keys_env:
        return _fail("demo runs its own client in plaintext without a key: drop the TLS and "
                     "API key flags (use `scission up` + `scission generate` for those)")
    try:
        cfg = cluster_config(args)
    except ValueError as e:
        return _fail(str(e))
    cluster = _start(cfg)
    try:
        stub = connect(cluster.router_address)
        reqs = [make_request(p, True, args.max_tokens, 0.0) for p in DEMO_PROMPTS]
        print(f"scission: sending {len(reqs)} chat prompts concurrently to "
              f"{cluster.router_address}\n", flush=True)
        with ThreadPoolExecutor(len(reqs)) as ex:
            results = list(ex.map(lambda r: run_one(stub, r, 600), reqs))
        for prompt, res in zip(DEMO_PROMPTS, results, strict=True):
            print(f"### {prompt}\n{res.text.strip() or res.error}", flush=True)
            _print_result(res, streamed=True)
            print(flush=True)
        return 1 if any(r.error for r in results) else 0
    finally:
        cluster.stop()
