"""``scission up`` engine flags (``--linear-backend``, ``--graph-mode``,
``--weight-quantization``) reach every worker's ``EngineConfig``; a contradictory pair is
refused before anything starts."""

from __future__ import annotations

import pytest

from scission.cluster.cli import build_parser
from scission.cluster.commands import cluster_config


def test_defaults_are_eager_with_onednn_linears():
    engine = cluster_config(build_parser().parse_args(["up"])).engine
    assert (engine.linear_backend, engine.enforce_eager, engine.weight_quantization,
            engine.native_decode) == ("auto", True, "none", True)


def test_no_native_decode_reaches_the_engine_config():
    args = build_parser().parse_args(["up", "--weight-quantization", "w4a8",
                                      "--no-native-decode"])
    assert cluster_config(args).engine.native_decode is False


@pytest.mark.parametrize("mode", ["int4", "w4a8"])
def test_flags_reach_the_engine_config(mode):
    args = build_parser().parse_args(["up", "--graph-mode", "--weight-quantization", mode,
                                      "--linear-backend", "torch"])
    engine = cluster_config(args).engine
    assert (engine.linear_backend, engine.enforce_eager, engine.weight_quantization) == (
        "torch", False, mode)


def test_onednn_with_graph_mode_is_accepted():
    """``--linear-backend onednn --graph-mode``: graph mode calls the packed oneDNN linears
    through its opaque op (engine/dense_linear.py), so the pair is a valid config."""
    args = build_parser().parse_args(["up", "--linear-backend", "onednn", "--graph-mode"])
    engine = cluster_config(args).engine
    assert (engine.linear_backend, engine.enforce_eager) == ("onednn", False)


def test_unknown_backend_is_an_argparse_error():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["up", "--linear-backend", "mkl"])
