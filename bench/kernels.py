"""Benchmark the ``scission.kernels`` Triton kernels against their torch counterparts (CUDA).

Each case is timed with ``triton.testing.do_bench`` (median ms) and reported as achieved
GB/s and TFLOP/s, next to the roofline floor ``floor_ms = max(bytes / peak_bw,
flops / peak_flops)`` and ``floor_ms / ms`` (1.0 = at the roofline). Bytes are the
compulsory traffic (each input read once, each output written once); ``e`` = element
bytes, ``B`` = requests, ``L`` = context length, ``H``/``Hkv`` = query/kv heads,
``D`` = head_dim, ``T`` = tokens, ``n`` = blocks moved, ``bs`` = block_size::

    decode_attention   bytes = e (2 B L Hkv D + 2 B H D)            flops = 4 B H L D
    prefill_attention  bytes = e (2 B L Hkv D + 2 B q H D)          flops = 4 B H D (q L - q^2 / 2)
    kv_cache_write     bytes = e (4 T Hkv D) + 8 T                  (read k, v; write both)
    rms_norm (fused)   bytes = e (5 T hidden + hidden)              (read x, res, w; write out, res)
    rotary             bytes = e (2 T (H + Hkv) D) + 8 T             (read + write q, k)
    silu_mul           bytes = e (3 T d)                            (read 2d, write d)
    kv_gather          bytes = e (2 n bs Hkv D)                     (read + write each block)

Torch counterparts: ``TorchAttentionBackend``-style gather + SDPA, plain SDPA on contiguous
K/V (the unpaged lower bound), ``index_copy_``, the HF-style torch ops; for paged decode also
FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper`` when it is importable
(``bench/kernels_flashinfer.py``). Every decode implementation's output is checked against
SDPA on the contiguous K/V (``rel_err_vs_sdpa``, ``||out - sdpa|| / ||sdpa||``), and
``decode_speedups`` gives, per shape, each peer's time over Triton's best. Results go to
``bench/results/kernels.json``. Without a GPU the script says so and exits 0; ``--smoke``
instead runs every case once at tiny sizes on the CPU (Triton interpreter), untimed, to
keep the harness honest in CI. ``--quick``: the GPU check's sizes; ``--kernels``/``--impls``.

    python -m scission.bench.kernels --help
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernels.json"
# Dense bf16 tensor-core peak and HBM bandwidth by device-name substring (datasheets).
PEAKS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "A100": (312.0, 2039.0)}


@dataclass
class Case:
    kernel: str
    impl: str
    fn: Callable[[], object]
    bytes: int
    flops: int = 0
    params: dict = field(default_factory=dict)
    # Decode only: fn()'s output as [B, H, D], and the SDPA reference it is checked against.
    as_bhd: Callable | None = None
    ref: Callable[[], torch.Tensor] | None = None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m scission.bench.kernels",
        description="Time scission's Triton kernels against torch on a CUDA GPU; "
        "report GB/s, TFLOP/s and the roofline floor; write JSON.",
    )
    p.add_argument("--num-reqs", type=int, nargs="+", default=[32, 128],
                   help="decode batch sizes (default: 32 128)")
    p.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8192],
                   help="context lengths L in tokens (default: 1024 4096 8192)")
    p.add_argument("--num-heads", type=int, default=32, help="query heads H (default: 32)")
    p.add_argument("--num-kv-heads", type=int, default=8, help="kv heads Hkv (default: 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head_dim D (default: 128)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default: 16)")
    p.add_argument("--prefill-chunk", type=int, default=1024,
                   help="query tokens per prefill request (default: 1024)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens for the elementwise kernels (default: 4096)")
    p.add_argument("--hidden", type=int, default=4096, help="rms_norm hidden (default: 4096)")
    p.add_argument("--intermediate", type=int, default=14336,
                   help="silu_mul d (default: 14336)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="override the device's peak bf16 TFLOP/s")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="override the device's peak memory GB/s")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path ({DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true",
                   help="run each case once at tiny sizes on CPU (TRITON_INTERPRET=1), untimed")
    p.add_argument("--quick", action="store_true",
                   help="the GPU check's sizes: decode b1/32/128 x 1k/4k, prefill 1k/4k")
    p.add_argument("--kernels", nargs="+", default=None,
                   help="only these kernels (decode_attention prefill_attention kv_cache_write "
                        "rms_norm rotary silu_mul kv_gather)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="only implementations whose name starts with one of these "
                        "(e.g. triton sdpa torch flashinfer)")
    p.add_argument("--flashinfer", choices=("auto", "off"), default="auto",
                   help="auto: add FlashInfer decode cases when it is importable")
    args = p.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    if args.quick:
        args.num_reqs, args.context = [1, 32, 128], [1024, 4096]
    if args.smoke:
        args.num_reqs, args.context, args.num_heads, args.num_kv_heads = [2], [64], 4, 2
        args.head_dim, args.prefill_chunk, args.tokens, args.hidden = 64, 32, 8, 64
        args.intermediate = 96
    return args


def _paged_kv(num_reqs: int, ctx: int, args, dtype=torch.bfloat16):
    """Random caches and a shuffled block table holding ``num_reqs`` contexts of ``ctx``."""
    per_req = math.ceil(ctx / args.block_size)
    shape = (num_reqs * per_req, args.block_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=args.device)
    v_cache = torch.randn(shape, dtype=dtype, device=args.device)
    table = torch.randperm(shape[0], device=args.device).view(num_reqs, per_req).int()
    return k_cache, v_cache, table


def _gather(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """``[B, Hkv, L, D]`` contiguous context gathered through the block table."""
    bs = cache.shape[1]
    pos = torch.arange(ctx, device=cache.device)
    blocks = table.long()[:, pos // bs]  # [B, L]
    return cache[blocks, pos % bs].transpose(1, 2)


def _decode_cases(args) -> list[Case]:
    cases = []
    for b in args.num_reqs:
        for ctx in args.context:
            cases += _decode_cases_at(args, b, ctx)
    return cases


def _decode_cases_at(args, b: int, ctx: int) -> list[Case]:
    from scission.kernels.decode_attention import decode_attention

    e, h, hkv, d = 2, args.num_heads, args.num_kv_heads, args.head_dim
    kc, vc, table = _paged_kv(b, ctx, args)
    q = torch.randn(b, h, d, dtype=torch.bfloat16, device=args.device)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=args.device)
    nbytes, flops = e * (2 * b * ctx * hkv * d + 2 * b * h * d), 4 * b * h * ctx * d
    params = {"num_reqs": b, "context": ctx, "H": h, "Hkv": hkv, "D": d}

    def triton_decode(splits: int):
        return lambda: decode_attention(q, kc, vc, table, lens, d**-0.5, num_splits=splits)

    qs = q.unsqueeze(2)  # [B, H, 1, D]
    kd, vd = _gather(kc, table, ctx).contiguous(), _gather(vc, table, ctx).contiguous()
    splits = min(16, math.ceil(ctx / 1024))  # TritonAttentionBackend's default (>= 2 here)

    def sdpa_ref():
        return F.scaled_dot_product_attention(qs, kd, vd, enable_gqa=True).squeeze(2)

    check = {"ref": sdpa_ref}
    squeeze = operator.methodcaller("squeeze", 2)  # [B, H, 1, D] -> [B, H, D]
    cases = [Case("decode_attention", f"triton_splits{s}", triton_decode(s), nbytes, flops, params,
                  **check) for s in (1, max(2, splits))]
    cases += [
        Case("decode_attention", "torch_gather_sdpa", lambda: F.scaled_dot_product_attention(
            qs, _gather(kc, table, ctx), _gather(vc, table, ctx), enable_gqa=True),
            nbytes, flops, params, as_bhd=squeeze, **check),
        Case("decode_attention", "sdpa_contiguous", lambda: F.scaled_dot_product_attention(
            qs, kd, vd, enable_gqa=True), nbytes, flops, params, as_bhd=squeeze, **check),
    ]
    if args.use_flashinfer:
        from scission.bench.kernels_flashinfer import paged_decode_fn

        cases.append(Case("decode_attention", "flashinfer", paged_decode_fn(q, kc, vc, table, ctx),
                          nbytes, flops, params, **check))
    return cases


def _prefill_cases(args) -> list[Case]:
    from scission.kernels.prefill_attention import prefill_attention

    cases, e, b, chunk = [], 2, 4, args.prefill_chunk
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    for ctx in args.context:
        qlen = min(chunk, ctx)
        kc, vc, table = _paged_kv(b, ctx, args)
        q = torch.randn(b * qlen, h, d, dtype=torch.bfloat16, device=args.device)
        lens = torch.full((b,), ctx, dtype=torch.int32, device=args.device)
        cu = torch.arange(0, b * qlen + 1, qlen, dtype=torch.int32, device=args.device)
        nbytes = e * (2 * b * ctx * hkv * d + 2 * b * qlen * h * d)
        flops = int(4 * b * h * d * (qlen * ctx - qlen * qlen / 2))
        params = {"num_reqs": b, "q_len": qlen, "context": ctx, "H": h, "Hkv": hkv, "D": d}
        cases.append(Case("prefill_attention", "triton", lambda q=q, kc=kc, vc=vc, t=table,
                          n=lens, cu=cu, qlen=qlen: prefill_attention(
                              q, kc, vc, t, n, cu, qlen, d**-0.5), nbytes, flops, params))
        qs = q.view(b, qlen, h, d).transpose(1, 2)  # [B, H, q, D]
        kd, vd = _gather(kc, table, ctx).contiguous(), _gather(vc, table, ctx).contiguous()
        q_pos = torch.arange(ctx - qlen, ctx, device=args.device)[:, None]
        mask = torch.arange(ctx, device=args.device)[None, :] <= q_pos  # [q, L] offset causal
        cases.append(Case("prefill_attention", "sdpa_contiguous", lambda qs=qs, kd=kd, vd=vd,
                          m=mask: F.scaled_dot_product_attention(qs, kd, vd, attn_mask=m,
                                                                 enable_gqa=True),
                          nbytes, flops, params))
    return cases


def _elementwise_cases(args) -> list[Case]:
    from scission.engine.attention import write_kv
    from scission.kernels.kv_cache_write import kv_cache_write
    from scission.kernels.rms_norm import rms_norm
    from scission.kernels.rotary import rotary_embedding
    from scission.kernels.silu_mul import silu_mul

    t, e, hid, dff = args.tokens, 2, args.hidden, args.intermediate
    h, hkv, d = args.num_heads, args.num_kv_heads, args.head_dim
    kw = {"dtype": torch.bfloat16, "device": args.device}
    kc, vc, _ = _paged_kv(1, 4 * t, args)
    k, v = torch.randn(t, hkv, d, **kw), torch.randn(t, hkv, d, **kw)
    slots = torch.randperm(kc.shape[0] * kc.shape[1], device=args.device)[:t]
    x, res, w = torch.randn(t, hid, **kw), torch.randn(t, hid, **kw), torch.randn(hid, **kw)
    q, pos = torch.randn(t, h, d, **kw), torch.randint(0, 8192, (t,), device=args.device)
    gate_up = torch.randn(t, 2 * dff, **kw)
    p_kv, p_x = {"T": t, "Hkv": hkv, "D": d}, {"T": t, "hidden": hid}
    kvb, rmsb = e * 4 * t * hkv * d + 8 * t, e * (5 * t * hid + hid)
    ropeb, silub = e * 2 * t * (h + hkv) * d + 8 * t, e * 3 * t * dff
    return [
        Case("kv_cache_write", "triton", lambda: kv_cache_write(k, v, kc, vc, slots), kvb, 0, p_kv),
        Case("kv_cache_write", "torch_index_copy", lambda: write_kv(k, v, kc, vc, slots), kvb, 0,
             p_kv),
        Case("rms_norm", "triton", lambda: rms_norm(x, w, 1e-6, res), rmsb, 0, p_x),
        Case("rms_norm", "torch", lambda: _torch_rms_norm(x, w, res), rmsb, 0, p_x),
        Case("rotary", "triton", lambda: rotary_embedding(pos, q, k, theta=5e5), ropeb, 0,
             {"T": t, "H": h, "Hkv": hkv, "D": d}),
        Case("rotary", "torch", lambda: _torch_rotary(pos, q, k, 5e5), ropeb, 0,
             {"T": t, "H": h, "Hkv": hkv, "D": d}),
        Case("silu_mul", "triton", lambda: silu_mul(gate_up), silub, 0, {"T": t, "d": dff}),
        Case("silu_mul", "torch", lambda: F.silu(gate_up[:, :dff]) * gate_up[:, dff:], silub,
             0, {"T": t, "d": dff}),
    ]


def _gather_cases(args) -> list[Case]:
    from scission.kernels.kv_gather import KVCopyDirection, copy_kv_blocks

    kc, _, _ = _paged_kv(1, 8 * max(args.context), args)
    n = min(512, kc.shape[0] // 2)
    ids = torch.randperm(kc.shape[0], device=args.device)[:n]
    staging = torch.empty(n, *kc.shape[1:], dtype=kc.dtype, device=args.device)
    nbytes = 2 * staging.numel() * staging.element_size()
    params = {"n_blocks": n, "block_size": args.block_size, "Hkv": args.num_kv_heads,
              "D": args.head_dim}
    return [
        Case("kv_gather", "triton_gather", lambda: copy_kv_blocks(
            kc, staging, ids, KVCopyDirection.GATHER), nbytes, 0, params),
        Case("kv_gather", "torch_index_select", lambda: torch.index_select(
            kc, 0, ids, out=staging), nbytes, 0, params),
        Case("kv_gather", "triton_scatter", lambda: copy_kv_blocks(
            kc, staging, ids, KVCopyDirection.SCATTER), nbytes, 0, params),
        Case("kv_gather", "torch_index_copy", lambda: kc.index_copy_(0, ids, staging),
             nbytes, 0, params),
    ]


def _torch_rms_norm(x, w, res):
    """HF Llama: residual add in the model dtype, statistics in fp32."""
    s = x + res
    xf = s.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype), s


def _torch_rotary(pos, q, k, theta):
    """HF Llama ``apply_rotary_pos_emb`` with cos/sin computed per call."""
    d = q.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=q.device).float() / d)
    ang = pos.float()[:, None] * inv[None, :]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(q.dtype)[:, None], emb.sin().to(q.dtype)[:, None]

    def rot(x):
        return torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _peaks(args) -> tuple[float, float, str]:
    name = torch.cuda.get_device_name()
    tflops, gbps = next((v for key, v in PEAKS.items() if key in name), (None, None))
    tflops, gbps = args.peak_tflops or tflops, args.peak_gbps or gbps
    if tflops is None or gbps is None:
        raise SystemExit(f"unknown peaks for {name!r}: pass --peak-tflops and --peak-gbps")
    return tflops, gbps, name


def _measure(case: Case, peak_tflops: float, peak_gbps: float) -> dict:
    import triton.testing

    ms = triton.testing.do_bench(case.fn, warmup=25, rep=100)
    floor_ms = max(case.bytes / (peak_gbps * 1e6), case.flops / (peak_tflops * 1e9))
    row = {k: v for k, v in asdict(case).items() if k not in ("fn", "as_bhd", "ref")}
    if case.ref is not None:
        row["rel_err_vs_sdpa"] = _rel_err_vs_ref(case)
    row.update(ms=ms, gbps=case.bytes / (ms * 1e6), tflops=case.flops / (ms * 1e9),
               floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
    logger.info("%-18s %-20s %-60s %9.4f ms %8.1f GB/s %7.1f TFLOP/s %5.1f%% of roofline",
                case.kernel, case.impl, json.dumps(case.params), ms, row["gbps"], row["tflops"],
                100 * row["fraction_of_floor"])
    return row


def _rel_err_vs_ref(case: Case) -> float:
    """``||out - ref|| / ||ref||`` of one run of ``case`` against its reference."""
    from scission.kernels.reference import rel_error

    out = case.fn()
    return rel_error(case.as_bhd(out) if case.as_bhd else out, case.ref())


def _builders():
    """(kernels a builder makes cases for, the builder)."""
    return (({"decode_attention"}, _decode_cases), ({"prefill_attention"}, _prefill_cases),
            ({"kv_cache_write", "rms_norm", "rotary", "silu_mul"}, _elementwise_cases),
            ({"kv_gather"}, _gather_cases))


def _selected(args):
    """Per builder, its cases of the selected kernels and implementations (``--kernels``,
    ``--impls``); a builder none of whose kernels is selected allocates nothing."""
    for kernels, build in _builders():
        if args.kernels is None or kernels & set(args.kernels):
            yield [c for c in build(args) if (args.kernels is None or c.kernel in args.kernels)
                   and (args.impls is None or c.impl.startswith(tuple(args.impls)))]


def decode_speedups(rows: list[dict]) -> list[dict]:
    """Per decode shape: each implementation's ms over the fastest Triton split setting."""
    shapes: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == "decode_attention":
            shapes.setdefault(json.dumps(r["params"], sort_keys=True), {})[r["impl"]] = r["ms"]
    out = []
    for key, ms in shapes.items():
        triton_ms = min((v for k, v in ms.items() if k.startswith("triton")), default=None)
        if triton_ms:
            out.append({"params": json.loads(key), "triton_best_ms": triton_ms,
                        "ms_over_triton": {k: v / triton_ms for k, v in ms.items()}})
    return out


def _smoke(args) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the lazy kernel imports
    for case in (c for cases in _selected(args) for c in cases):
        case.fn()
        err = f" rel_err_vs_sdpa={_rel_err_vs_ref(case):.1e}" if case.ref else ""
        logger.info("smoke ok: %s %s %s%s", case.kernel, case.impl, json.dumps(case.params), err)
    return 0


def _flashinfer_choice(args) -> str | None:
    """Sets ``args.use_flashinfer``; returns the note saying why FlashInfer is left out."""
    from scission.bench.kernels_flashinfer import unavailable_reason

    wanted = args.flashinfer == "auto" and (
        args.impls is None or any(i.startswith("flashinfer") for i in args.impls))
    reason = unavailable_reason(args.device) if wanted else "flashinfer: not requested"
    args.use_flashinfer = wanted and reason is None
    return reason


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = _parse_args(argv)
    note = _flashinfer_choice(args)
    if note:
        logger.info("%s", note)
    if args.smoke:
        return _smoke(args)
    if not torch.cuda.is_available():
        logger.info("bench.kernels: no CUDA GPU available; nothing to benchmark (Triton "
                    "kernels are tested on CPU under TRITON_INTERPRET=1 instead).")
        return 0
    peak_tflops, peak_gbps, device = _peaks(args)
    rows = []
    for cases in _selected(args):
        rows += [_measure(case, peak_tflops, peak_gbps) for case in cases]
        del cases
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "peak_tflops": peak_tflops, "peak_gbps": peak_gbps,
            "torch": torch.__version__, "notes": [note] if note else []}
    doc = {"meta": meta, "results": rows, "decode_speedups": decode_speedups(rows)}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    logger.info("wrote %d results to %s", len(rows), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
