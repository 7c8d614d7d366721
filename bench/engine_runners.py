"""The engines of ``bench/engine.py``: each runs ``generate_s(prompts, new_tokens) -> seconds``.

``generate_s`` generates ``new_tokens`` tokens greedily for every prompt (EOS ignored) and returns
the wall time from submitting the prompts to the last token (``time.perf_counter``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scission.engine.quant import WEIGHT_QUANTIZATIONS

logger = logging.getLogger(__name__)

# Bench dtypes that mean a float32 model with quantized linears (scission only): weight-only
# int4 / int8, w8a8 (int8 weights and per-token int8 activations, engine/quant_w8a8.py) or
# w4a8 (4-bit weights, int8 activations per block of 32: kernels/w4a8.py).
QUANTIZED_DTYPES = WEIGHT_QUANTIZATIONS
TORCH_DECODE = "+torch-decode"  # suffix: w4a8 without native decode (engine/native_decode.py)


@dataclass(frozen=True)
class RunnerSpec:
    """What every engine is built with: the same model file and thread count."""

    model_path: str  # a .gguf file
    threads: int
    max_batch: int  # largest decode batch
    max_step_tokens: int  # most prompt tokens submitted at once
    max_seq_tokens: int  # longest sequence (prompt + new tokens)


class ScissionRunner:
    name = "scission"

    def __init__(self, spec: RunnerSpec, dtype: str) -> None:
        from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from scission.engine.llm_engine import LLMEngine

        self.dtype = dtype
        # "+torch-decode": w4a8 steps through torch (EngineConfig.native_decode=False)
        native, dtype = not dtype.endswith(TORCH_DECODE), dtype.removesuffix(TORCH_DECODE)
        graph, dtype = dtype.endswith("+graph"), dtype.removesuffix("+graph")  # graph mode
        self.engine = LLMEngine(
            EngineConfig(
                model_path=spec.model_path,
                enforce_eager=not graph,
                native_decode=native,
                dtype="float32" if dtype in QUANTIZED_DTYPES else dtype,
                weight_quantization=dtype if dtype in QUANTIZED_DTYPES else "none",
                num_threads=spec.threads,
                # No prefix caching: repeats of the same prompt must recompute it.
                cache=CacheConfig(enable_prefix_caching=False),
                scheduler=SchedulerConfig(
                    max_num_seqs=max(64, spec.max_batch),
                    max_num_batched_tokens=max(1024, spec.max_step_tokens),
                ),
            )
        )
        self._next_id = 0

    def generate_s(self, prompts: Sequence[list[int]], new_tokens: int) -> float:
        from scission.engine.request import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        for prompt in prompts:
            self._next_id += 1
            self.engine.add_request(f"bench-{self._next_id}", prompt, params)
        while self.engine.has_unfinished():
            self.engine.step()
        return time.perf_counter() - start

    def close(self) -> None:
        del self.engine


class HFRunner:
    name = "hf"

    def __init__(self, spec: RunnerSpec, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec.threads)
        self.dtype = dtype
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(spec.model_path),
            gguf_file=os.path.basename(spec.model_path),
            dtype=getattr(torch, dtype),
        ).eval()
        self.pad_id = 0

    def generate_s(self, prompts: Sequence[list[int]], new_tokens: int) -> float:
        width = max(len(p) for p in prompts)  # left padding + mask (equal lengths: no padding)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.pad_id,
            )
        return time.perf_counter() - start

    def close(self) -> None:
        del self.model


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python's C API: one context with a sequence per prompt, one
    ``llama_decode`` per step for the whole batch (prompts in one call), greedy argmax on the
    logits of each sequence's last token."""

    name = "llama.cpp"

    def __init__(self, spec: RunnerSpec, dtype: str) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_log_set(_silent_log_callback(), ctypes.c_void_p(0))
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(
            spec.model_path.encode(), lc.llama_model_default_params()
        )
        assert self.model, f"llama.cpp could not load {spec.model_path}"
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        params = lc.llama_context_default_params()
        params.n_ctx = spec.max_batch * spec.max_seq_tokens + 64
        params.n_batch = params.n_ubatch = max(512, spec.max_step_tokens)
        params.n_seq_max = spec.max_batch
        params.n_threads = params.n_threads_batch = spec.threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        assert self.ctx, "llama.cpp could not create a context"
        self.batch = lc.llama_batch_init(params.n_batch, 0, 1)
        self.dtype = "gguf-" + Path(spec.model_path).stem.rsplit(".", 1)[-1].lower()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants_logits) rows."""
        b = self.batch
        for k, (token, pos, seq, logits) in enumerate(items):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
            b.seq_id[k][0] = seq
        b.n_tokens = len(items)
        rc = self.lc.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode failed: {rc}"

    def _argmax(self, row: int) -> int:
        logits = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def generate_s(self, prompts: Sequence[list[int]], new_tokens: int) -> float:
        start = time.perf_counter()
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        self._decode(items)
        last = [self._argmax(k) for k, item in enumerate(items) if item[3]]
        for step in range(new_tokens - 1):
            self._decode(
                [
                    (t, len(p) + step, s, True)
                    for s, (t, p) in enumerate(zip(last, prompts, strict=True))
                ]
            )
            last = [self._argmax(s) for s in range(len(prompts))]
        return time.perf_counter() - start

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def _drop_log(level: int, text: bytes, user_data: object) -> None:
    """llama.cpp log callback that prints nothing (the model loader is very chatty)."""


@functools.cache
def _silent_log_callback():
    """The ctypes callback object; cached so that it stays alive as long as the process."""
    import llama_cpp

    return llama_cpp.llama_log_callback(_drop_log)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def make_runner(name: str, spec: RunnerSpec, dtype: str):
    """``name`` in ``ENGINES``; llama.cpp ignores ``dtype`` (it runs the GGUF's weights)."""
    runners = {"scission": ScissionRunner, "hf": HFRunner, "llama.cpp": LlamaCppRunner}
    return runners[name](spec, dtype)
