"""Internal worker API (``scission.internal.v1``) <-> engine types. The one place they meet."""

from __future__ import annotations

from scission.engine.engine_loop import RequestOutput
from scission.engine.request import SamplingParams
from scission.proto.scission.internal.v1 import worker_pb2 as pb


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
        has_seed=p.seed is not None, seed=p.seed or 0, max_tokens=p.max_tokens,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
    )


def sampling_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError (a ValueError) on out-of-range values."""
    return SamplingParams(
        temperature=m.temperature, top_k=m.top_k, top_p=m.top_p,
        seed=m.seed if m.has_seed else None, max_tokens=m.max_tokens,
        stop=tuple(m.stop), stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos,
    )


def output_to_chunk(out: RequestOutput, first: bool = False) -> pb.TokenChunk:
    reason = out.finish_reason.value if out.finish_reason is not None else ""
    return pb.TokenChunk(token_ids=list(out.new_token_ids), text=out.text_delta,
                         finish_reason=reason,
                         cached_tokens=out.num_cached_tokens if first else 0)
