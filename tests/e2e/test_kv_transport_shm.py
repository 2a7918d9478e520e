"""``tandem up --kv-transport shm`` end to end: real router, prefill and decode processes on
CPU; the prefill pod writes KV pages straight into the decode pod's shared-memory pool."""

import random

import pytest

from .conftest import greedy_token_ids, start_cluster, wait_idle
from .test_metrics import scrape, value

pytestmark = pytest.mark.integration

MAX_NEW = 12


@pytest.fixture(scope="module")
def shm_cluster(e2e_model):
    c = start_cluster(e2e_model, prefill=1, decode=1, kv_transport="shm", kv_transport_strict=True)
    yield c
    c.stop()


def test_shm_transport_serves_greedy_output_token_identical_to_transformers(
    shm_cluster, e2e_model, hf_reference
):
    hf = hf_reference(e2e_model, MAX_NEW)
    rng = random.Random(3)
    batch = [[rng.randrange(3, 1000) for _ in range(rng.randint(20, 100))] for _ in range(4)]
    pods = shm_cluster.pods("prefill") + shm_cluster.pods("decode")
    before = {p.name: scrape(p.metrics_url) for p in pods}
    for prompt in batch:
        assert greedy_token_ids(shm_cluster.router_url, prompt, MAX_NEW) == hf.generate(prompt)
    after = {p.name: scrape(p.metrics_url) for p in pods}

    def moved(pod, transport):
        return value(after[pod], "tandem_kv_transfer_bytes", "_total", transport=transport) - value(
            before[pod], "tandem_kv_transfer_bytes", "_total", transport=transport
        )

    prefill, decode = shm_cluster.pods("prefill")[0].name, shm_cluster.pods("decode")[0].name
    assert moved(prefill, "shm") > 0 and moved(decode, "shm") == moved(prefill, "shm")
    assert moved(prefill, "grpc") == 0 and moved(decode, "grpc") == 0
    assert value(after[prefill], "tandem_kv_transfer_fallbacks", "_total") == 0
    wait_idle(shm_cluster)
