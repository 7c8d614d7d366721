"""Dense (unquantized) linears through oneDNN with the weight reordered once at load.

``F.linear`` on this CPU build calls MKL's GEMM on the row-major ``[N, K]`` weight each step.
For a decode step's few rows that path streams the weight at ~10 GB/s and does not scale past
one thread; oneDNN's matmul on a weight reordered ahead of time into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, the packing inductor's ``freezing`` applies to
CPU linears) reads it at 19-26 GB/s on 2 threads. Measured here (2 vCPU AMD EPYC, AVX-512
with bf16; distinct weights per call so every call reads DRAM; ``bench/README.md``): ``gate_up``
``[3072 x 576]`` float32 at 1 / 8 / 32 / 512 rows 2.3x / 1.7x / 1.6x / 1.2x faster, the LM
head ``[49152 x 576]`` 2.5x at 1 row; bfloat16 2.1x at 1 row and 2.0x over float32 at 512 rows
(the AVX-512 bf16 dot-product path, which ``F.linear`` in bfloat16 does not reach).

The result is the same product in another summation order (float32: max abs difference ~1e-4
on unit-scale inputs, as between any two BLAS libraries); the float32 engine stays token-exact
against HF transformers (``tests/engine/test_engine_vs_hf.py``).

``EngineConfig.linear_backend`` picks it: ``"auto"`` (default) = oneDNN for float32 and
bfloat16 models on CPU when torch has oneDNN, eager and graph mode; ``"torch"`` = plain
``F.linear``. Quantized modes (``engine/quant.py``) keep their own kernels for the layers they
replace.

In graph mode (``engine/compile.py``) the packed weight cannot be a graph argument: it is an
opaque oneDNN tensor (``layout=torch._mkldnn``) that fake tensors do not model, and inductor's
own lowering of ``mkldnn._linear_pointwise`` accepts it only as a constant frozen into the
graph, while our graphs take the weights as arguments (one graph serves every layer). So the
graphs call the opaque custom op ``scission::onednn_linear(x, handle, out_features, bias)``:
``handle`` is a one-element int64 tensor naming the layer's packed weight in a process-wide
registry (weak references: an entry lives as long as its module). Inductor runs the op as an
extern call between its fused kernels; every layer passes the same shapes, so one graph still
serves all of them.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
LINEAR_BACKENDS = ("auto", "onednn", "torch")
DECODER_LINEARS = ("qkv", "o_proj", "gate_up", "down")


# handle -> packed weight, for the graph-mode op; entries die with their OneDNNLinear.
_PACKED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count(1)


# A torch.library.Library op rather than torch.library.custom_op: the latter's Python
# wrappers cost ~20 us a call against ~5 us here, and a decode step makes 121 calls
# (kernels/w4a8.py registers its op the same way).
_LIBRARY = torch.library.Library("scission", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor handle, int out_features, Tensor? bias) -> Tensor")


def onednn_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with ``W`` the packed weight registered under ``handle``; the op
    ``torch.ops.scission.onednn_linear``.

    Args:
        x: ``[M, K]`` in the weight's dtype.
        handle: ``[1]`` int64, ``OneDNNLinear.handle``.
        out_features: ``N`` (the fake implementation's output width).
        bias: ``[N]`` or None.
    Returns: ``[M, N]``, x's dtype.
    Raises:
        KeyError: no live ``OneDNNLinear`` holds ``handle``.
    """
    return _packed_linear(x, _PACKED[int(handle)], bias)


_LIBRARY.impl("onednn_linear", onednn_linear, "CPU")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """oneDNN's matmul of ``x`` ``[M, K]`` by a packed ``[N, K]`` weight: ``[M, N]``."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


@torch.library.register_fake("scission::onednn_linear", lib=_LIBRARY)
def _(x, handle, out_features, bias):
    return x.new_empty(x.shape[0], out_features)


_BF16_HINT = " (bfloat16 needs a CPU with AVX512-BW/VL/DQ or AVX-NE-CONVERT)"


def onednn_available(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether ``OneDNNLinear`` can run a ``dtype`` model on ``device``: CPU, torch built with
    oneDNN, and for bfloat16 a CPU with oneDNN's bf16 path (AVX512-BW/VL/DQ or AVX-NE-CONVERT;
    torch's ``mkldnn._is_mkldnn_bf16_supported``). On an AVX2-only CPU packing a bfloat16
    weight raises inside oneDNN, so ``"auto"`` leaves bfloat16 linears on ``F.linear`` there
    and ``"onednn"`` refuses the model."""
    if not (torch.device(device).type == "cpu" and dtype in ONEDNN_DTYPES
            and torch.backends.mkldnn.is_available()):
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class OneDNNLinear(nn.Module):
    """``y = x @ W^T (+ bias)`` with ``W`` held in oneDNN's blocked layout (module docstring).

    Input ``[..., in_features]`` in the weight's dtype; output ``[..., out_features]``, same
    dtype. The dense ``[N, K]`` weight is not kept (the packed copy replaces it); ``weight``
    unpacks it on demand (tests, inspection: not the hot path).

    Raises:
        ValueError: the weight's dtype or device has no oneDNN path (``onednn_available``).
    """

    def __init__(self, linear: nn.Linear, batch_size_hint: int = 64) -> None:
        super().__init__()
        w = linear.weight.detach()
        if not onednn_available(w.dtype, w.device):
            raise ValueError(f"no oneDNN linear for {w.dtype} on {w.device}"
                             + _BF16_HINT * (w.dtype == torch.bfloat16))
        self.out_features, self.in_features = w.shape
        # batch_size_hint only guides oneDNN's choice of blocked layout; any row count runs.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_size_hint)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        key = next(_NEXT_HANDLE)
        _PACKED[key] = self.packed
        self.handle = torch.tensor([key], dtype=torch.int64)  # graph mode's name for `packed`

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight, unpacked (a copy)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = _packed_linear(flat, self.packed, self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def graph_args(self) -> tuple:
        """Graph mode's arguments for this layer (``engine/compile.py``)."""
        return self.handle, self.out_features, self.bias

    @staticmethod
    def graph_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """``forward`` as a pure function of ``graph_args``, for ``torch.compile``: x
        ``[M, in_features]`` -> ``[M, out_features]``."""
        return torch.ops.scission.onednn_linear(x, handle, out_features, bias)

    def decode_read_bytes(self) -> int:
        return self.out_features * self.in_features * self.packed.element_size()


def pack_dense_linears(model: nn.Module, layer_attrs: tuple[str, ...] = DECODER_LINEARS,
                       head_attr: str = "lm_head") -> int:
    """Replace each decoder layer's ``layer_attrs`` and ``model.<head_attr>`` that are plain
    ``nn.Linear`` by ``OneDNNLinear``, in place. Returns how many were replaced (0 when the
    model's dtype/device has no oneDNN path: it stays on ``F.linear``)."""
    owners = [(layer, a) for layer in model.layers for a in layer_attrs] + [(model, head_attr)]
    replaced = 0
    for owner, attr in owners:
        lin = getattr(owner, attr)
        if type(lin) is nn.Linear and onednn_available(lin.weight.dtype, lin.weight.device):
            setattr(owner, attr, OneDNNLinear(lin))
            replaced += 1
    return replaced
