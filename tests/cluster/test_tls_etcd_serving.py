"""A real cluster on the embedded etcd with TLS (``ClusterConfig.embedded_etcd_tls``, what
``scission up --embedded-etcd-tls`` runs): the controller, a worker and the router reach
etcd with the generated client certificate, a request is served with the engine's own greedy
tokens, plaintext gets nothing, and a CLI command finds the certificate through the state."""

from __future__ import annotations

import argparse

import pytest
from serving_helpers import running_cluster, token_request

from scission.cluster.client import connect, generate
from scission.cluster.commands import _state
from scission.cluster.launcher import ClusterConfig
from scission.cluster.state import etcd_client_config
from scission.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from scission.engine.llm_engine import LLMEngine
from scission.engine.request import SamplingParams
from scission.registry.etcd_watch import ETCD_ERRORS
from scission.registry.workers import EtcdClientConfig
from scission.registry.workers import connect as etcd_connect

NEW_TOKENS = 16


def _engine_tokens(tokenizer, ids: list[int]) -> list[int]:
    engine = LLMEngine(EngineConfig(num_threads=2, cache=CacheConfig(num_blocks=64),
                                    scheduler=SchedulerConfig(max_num_batched_tokens=512)),
                       tokenizer=tokenizer)
    engine.add_request("r", ids, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    return out


@pytest.mark.slow
def test_a_cluster_serves_on_the_tls_etcd(tokenizer, chat_prompt_ids):
    ids = chat_prompt_ids[0]
    expected = _engine_tokens(tokenizer, ids)
    config = ClusterConfig(embedded_etcd_tls=True, num_colocated=1, threads_per_worker=1,
                           engine=EngineConfig(cache=CacheConfig(num_blocks=128)))
    with running_cluster(config) as cluster:
        assert cluster.etcd.client_url.startswith("https://")
        result = generate(connect(cluster.router_address), token_request(ids, NEW_TOKENS))
        assert result.error == "" and result.token_ids == expected
        plain = etcd_connect(EtcdClientConfig(endpoints=(cluster.etcd.endpoint,),
                                              timeout_s=2.0))
        with pytest.raises(ETCD_ERRORS):
            plain.get_prefix(config.registry_prefix)
        plain.close()
        args = argparse.Namespace(etcd_user=None, etcd_password_file=None)
        state = _state(args, config, cluster)
        assert state.etcd_tls_files == cluster.etcd.tls_files.client_files()
        client = etcd_connect(etcd_client_config(argparse.Namespace(), state.etcd_endpoints,
                                                 state))
        workers = list(client.get_prefix(f"{config.registry_prefix}/workers/"))
        assert len(workers) == 1  # the worker registered over TLS
        client.close()
