"""``--worker-resource ROLE=NAME[:N]``: parsing into ``ClusterConfig.worker_resources`` (the
placement itself runs for real on two Ray nodes in ``test_multinode.py``)."""

from __future__ import annotations

import pytest

from scission.cluster.cli import build_parser
from scission.cluster.commands import cluster_config, worker_resources
from scission.cluster.launcher import ClusterConfig
from scission.registry.workers import WorkerRole


def test_items_parse_per_role_with_default_amount_one():
    """Invariant: each item adds NAME: N (default 1.0) to its role; roles accumulate."""
    assert worker_resources(["decode=big_mem", "prefill=fast:0.5", "decode=gpu_a:2"]) == {
        WorkerRole.DECODE: {"big_mem": 1.0, "gpu_a": 2.0}, WorkerRole.PREFILL: {"fast": 0.5}}
    assert worker_resources([]) == {}


@pytest.mark.parametrize("item", ["decode", "router=x", "decode=", "decode=:1", "decode=x:0",
                                  "decode=x:-1", "decode=x:many", "decode=x:nan"])
def test_bad_items_raise_value_error_naming_the_item(item):
    """Invariant: an unknown role, a missing name or an amount that is not a number > 0 is
    refused with the item in the message (``scission up`` prints it and exits 2)."""
    with pytest.raises(ValueError, match="--worker-resource"):
        worker_resources([item])


def test_up_flags_reach_the_cluster_config():
    """Invariant: repeated ``--worker-resource`` flags of ``scission up`` end up in
    ``ClusterConfig.worker_resources``; without the flag it is empty (Ray places freely)."""
    parser = build_parser()
    args = parser.parse_args(["up", "--worker-resource", "prefill=sc_prefill",
                              "--worker-resource", "decode=sc_decode:0.25"])
    assert cluster_config(args).worker_resources == {
        WorkerRole.PREFILL: {"sc_prefill": 1.0}, WorkerRole.DECODE: {"sc_decode": 0.25}}
    assert cluster_config(parser.parse_args(["up"])).worker_resources == {}


def test_cluster_config_refuses_non_positive_amounts():
    """Invariant: ``ClusterConfig`` itself refuses an amount <= 0 (Ray would reject it at
    the first spawn, long after start)."""
    with pytest.raises(ValueError, match="must be > 0"):
        ClusterConfig(worker_resources={WorkerRole.DECODE: {"x": 0.0}})
