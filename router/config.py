"""Router configuration (one frozen dataclass, STYLE §3)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from scission.registry.workers import EtcdClientConfig, RegistryConfig
from scission.router.images import SUPPORTED_IMAGE_FORMATS, ImageLimits


class RoutingPolicy(enum.Enum):
    """How the prefill (or colocated) worker is picked (decode: most free blocks, always)."""

    KV_AWARE = "kv-aware"  # cost with the prefix-index hit subtracted, + speculative entries
    LEAST_LOADED = "least-loaded"  # the same cost with cached_prefix_tokens = 0
    ROUND_ROBIN = "round-robin"  # in turn, by worker_id order; ignores load and cache


@dataclass(frozen=True)
class PlacementConfig:
    """Prefill cost = prefill_load_scale * max(queued + new - cached, 0) + decode_blocks_in_use
    (DESIGN: Placement), in tokens + blocks. ``temperature`` 0 = argmin, > 0 = softmax sampling
    over -cost / temperature (so temperature is in cost units)."""

    prefill_load_scale: float = 1.0
    temperature: float = 0.0
    policy: RoutingPolicy = RoutingPolicy.KV_AWARE
    # Conditional disaggregation: prefill on the decode worker when the uncached part is
    # short or the decode worker already holds most of the prompt.
    local_prefill_max_uncached_tokens: int = 0  # 0 = never prefill locally because short
    local_prefill_min_hit_ratio: float = 1.1  # > 1 = never prefill locally because cached
    speculative_ttl_s: float = 2.0
    # KV_AWARE decode choice: the worker holding the longest prefix of the prompt, if that
    # prefix is at least ``decode_prefix_min_hit_ratio`` of the prompt (a conversation's
    # earlier turns, not just a shared system preamble), among the workers running at most
    # ``decode_prefix_max_running_gap`` requests more than the least loaded one (-1 = never
    # prefer a prefix holder; 0 = only among the least loaded).
    decode_prefix_max_running_gap: int = 4
    decode_prefix_min_hit_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.decode_prefix_max_running_gap < -1 or self.decode_prefix_min_hit_ratio < 0:
            raise ValueError("decode_prefix_max_running_gap >= -1 and "
                             "decode_prefix_min_hit_ratio >= 0 required")
        if self.prefill_load_scale < 0 or self.temperature < 0 or self.speculative_ttl_s < 0:
            raise ValueError("placement parameters must be >= 0")
        if self.local_prefill_max_uncached_tokens < 0 or self.local_prefill_min_hit_ratio < 0:
            raise ValueError("local prefill thresholds must be >= 0")
        if not isinstance(self.policy, RoutingPolicy):
            raise ValueError(f"policy must be a RoutingPolicy, got {self.policy!r}")

    @property
    def kv_aware(self) -> bool:
        return self.policy is RoutingPolicy.KV_AWARE


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    model_path: str | None = None  # tokenizer + chat template; None = default model
    etcd: EtcdClientConfig = field(default_factory=EtcdClientConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_prompt_tokens: int | None = None  # None = the model's context length
    # Images in chat requests (router/images.py), checked before the model sees them. A
    # request must also fit max_message_bytes (gRPC) / the HTTP body bound, base64 included.
    max_image_bytes: int = 20 * 2**20  # one encoded image file
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096  # width * height, checked before decoding
    image_formats: tuple[str, ...] = tuple(sorted(SUPPORTED_IMAGE_FORMATS))  # Pillow names
    prefill_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    max_message_bytes: int = 4 * 1024**2  # gRPC send/receive (router and its worker channels)
    # Pipelined KV hand-off (router/flows.py ``_pipelined``): Decode is called with Prefill
    # and pulls each piece of KV as it is computed, instead of all of it after the prefill.
    kv_pipelining: bool = False
    # Sent with every call to a worker (worker/cluster_auth.py); set by ``scission up``.
    cluster_token: str = field(default="", repr=False)
    max_concurrent_rpcs: int = 1024  # gRPC server threads; also the HTTP door's
    # Admission control (router/admission.py): requests in flight and prompt tokens not yet
    # prefilled, across both doors; beyond either -> RESOURCE_EXHAUSTED / HTTP 429 at once.
    max_concurrent_requests: int = 256
    max_queued_prompt_tokens: int = 131072
    retry_after_s: int = 1  # the Retry-After a refused client gets
    # OpenAI-compatible HTTP door (router/http_api.py) on ``host``; 0 = any free port.
    http_port: int | None = None  # None = off
    served_model_name: str | None = None  # the HTTP API's model id; None = the model file's
    metrics_port: int | None = None  # Prometheus endpoint (0 = any free port); None = off
    metrics_host: str = "127.0.0.1"
    kv_lag_probe_interval_s: float = 1.0  # metrics: how often the index lag is measured
    # Starting while etcd is away (a Ray restart of the router during an outage): keep trying
    # to load the directory and the indexes for this long, then fail.
    etcd_wait_s: float = 60.0
    # A request that finds no worker while workers are re-registering (a worker left etcd in
    # the last gap_window_s: a restart, leases lapsed during an etcd outage) waits this long
    # for one before UNAVAILABLE; with none seen leaving recently it is refused at once.
    no_workers_wait_s: float = 5.0
    no_workers_gap_window_s: float = 30.0
    # Live SLO metrics (router/slo.py): a request attains when TTFT <= slo_ttft_ms and TPOT
    # <= slo_tpot_ms; aggregates over the last slo_window_s, put in etcd every
    # slo_publish_interval_s (registry/slo_publisher.py).
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 150.0
    slo_window_s: float = 30.0
    slo_publish_interval_s: float = 2.0
    # TLS and API keys on the public doors (router/auth.py); all off by default (plaintext,
    # no key). tls_cert_file + tls_key_file (PEM): gRPC and HTTP serve TLS; a client CA makes
    # it mutual (clients must present a certificate it signed). API keys come from a file
    # (one per line, '#' comments) and/or the environment variable named here, never from
    # the command line; with any key set, every route needs 'Authorization: Bearer <key>'.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    api_keys_file: str | None = None
    api_keys_env: str | None = None  # the variable's name, read in the router process
    auth_exempt_health: bool = True  # gRPC health service and HTTP /health open without a key
    auth_exempt_metrics: bool = True  # the Prometheus port open without a key

    def __post_init__(self) -> None:
        if not (0 < self.default_max_tokens <= self.max_tokens_limit):
            raise ValueError("need 0 < default_max_tokens <= max_tokens_limit")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port out of range: {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port out of range: {self.http_port}")
        if min(self.max_concurrent_requests, self.max_queued_prompt_tokens) < 1:
            raise ValueError("max_concurrent_requests and max_queued_prompt_tokens must be >= 1")
        if self.max_concurrent_requests > self.max_concurrent_rpcs:
            raise ValueError(f"max_concurrent_requests ({self.max_concurrent_requests}) must "
                             f"be <= max_concurrent_rpcs ({self.max_concurrent_rpcs})")
        if self.retry_after_s < 1 or self.max_message_bytes < 1024:
            raise ValueError("retry_after_s must be >= 1 and max_message_bytes >= 1024")
        _ = self.image_limits  # ImageLimits raises ValueError on a bad bound or format
        if self.kv_lag_probe_interval_s <= 0:
            raise ValueError("kv_lag_probe_interval_s must be > 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        slo = (self.slo_ttft_ms, self.slo_tpot_ms, self.slo_window_s, self.slo_publish_interval_s)
        if min(slo) <= 0 or not all(math.isfinite(v) for v in slo):
            raise ValueError("slo_ttft_ms, slo_tpot_ms, slo_window_s and slo_publish_interval_s "
                             f"must be finite and > 0, got {slo}")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_images_per_request,
                           self.max_image_pixels, frozenset(self.image_formats))

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None
