"""Routing policy: prefix vs load cost, the hot-spot guard, stable tie-breaking, decode choice."""

import logging

from services.router.pods import Pod
from services.router.routing import PrefixLoadScorer, pick_decode
from tandem.proto.common.v1 import common_pb2


def pod(name: str, queued: int = 0, free: int = 100) -> Pod:
    p = Pod(f"{name}:1", "prefill", channel=None, stub=None, healthy=True)
    p.stats = common_pb2.PodStats(
        pod_id=name, num_queued_prefill_tokens=queued, num_free_blocks=free
    )
    return p


def best(scorer, pods, prompt, cached, key=b"k"):
    return scorer.rank(pods, prompt, cached, key)[0]


def test_the_cached_prefix_wins_when_loads_are_equal():
    a, b = pod("a"), pod("b")
    choice = best(PrefixLoadScorer(), [a, b], 1000, {"b": 800})
    assert choice.pod is b and choice.cached_tokens == 800 and choice.cost == 200


def test_load_outweighs_a_small_prefix():
    a, b = pod("a", queued=0), pod("b", queued=600)
    assert best(PrefixLoadScorer(), [a, b], 1000, {"b": 500}).pod is a  # 1000 < 600 + 500
    assert best(PrefixLoadScorer(), [a, b], 1000, {"b": 900}).pod is b  # 1000 > 600 + 100
    # Weights shift the balance.
    assert best(PrefixLoadScorer(load_weight=0.1), [a, b], 1000, {"b": 500}).pod is b


def test_a_hot_pod_gets_no_credit_for_its_cache():
    a, b = pod("a", queued=100), pod("b", queued=9000)
    scorer = PrefixLoadScorer(load_weight=0.0, hotspot_ratio=2.0, hotspot_min_tokens=4096)
    ranked = scorer.rank([a, b], 1000, {"b": 1000}, b"k")
    assert ranked[0].pod is a
    assert [c.hot for c in ranked] == [False, True] and ranked[1].cached_tokens == 0


def test_ties_break_the_same_way_for_every_replica():
    pods = [pod(n) for n in "abcdef"]
    scorer = PrefixLoadScorer()
    choices = {best(scorer, pods, 100, {}, key=bytes([i])).pod.address for i in range(64)}
    assert len(choices) > 1  # different prompts spread over pods
    for i in range(64):  # ...but a given prompt always lands on the same one, whatever the order
        first = best(scorer, pods, 100, {}, key=bytes([i])).pod
        assert best(scorer, list(reversed(pods)), 100, {}, key=bytes([i])).pod is first


def test_decode_pick_prefers_free_blocks_and_skips_tried_pods():
    a, b, c = pod("a", free=10), pod("b", free=50), pod("c", free=30)
    assert pick_decode([a, b, c], set()) is b
    assert pick_decode([a, b, c], {"b:1"}) is c
    assert pick_decode([a], {"a:1"}) is None


class OnePoolRegistry:
    """The registry surface the prefill choice reads (pods by role)."""

    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods

    def by_role(self, role: str, healthy: bool = True) -> list[Pod]:
        return self.pods if role == "prefill" else []


def test_the_choice_and_its_breakdown_are_logged_at_debug_and_exported(caplog):
    from prometheus_client import generate_latest

    from services.router.flow import Dispatcher, Route
    from services.router.metrics import RouterMetrics
    from services.router.settings import RouterSettings
    from tandem.api.requests import Job
    from tandem.api.sampling_params import SamplingParams

    a, b = pod("a", queued=300), pod("b", queued=0)
    dispatcher = Dispatcher(
        OnePoolRegistry([a, b]), RouterSettings(model="m"), prefix_index=object()
    )
    job = Job("req-1", list(range(1000)), SamplingParams(max_tokens=1))
    route = Route()
    with caplog.at_level(logging.DEBUG, logger="services.router.flow"):
        chosen = dispatcher._choose_prefill(job, route, {"a": 800})
    assert chosen is a and route.prefill_reason == "prefix"
    (line,) = [r.getMessage() for r in caplog.records if "req-1" in r.getMessage()]
    assert (
        line
        == "request req-1 -> prefill a:1 (prefix); candidates: a:1 cached=800 queued=300 cost=500; "
        "b:1 cached=0 queued=0 cost=1000"
    )

    metrics = RouterMetrics()
    route.mode, route.prefill, route.attempts = "disaggregated", chosen.address, 1
    metrics.observe_route(route, len(job.prompt_token_ids))
    text = generate_latest(metrics.registry).decode()
    assert 'tandem_router_prefill_choices_total{reason="prefix"} 1.0' in text
    assert (
        'tandem_router_prefill_cached_fraction_bucket{le="0.75"} 0.0' in text
    )  # 0.8 of the prompt
    assert 'tandem_router_prefill_cached_fraction_bucket{le="0.9"} 1.0' in text
    assert "tandem_router_prefill_queued_tokens_sum 300.0" in text
    assert "tandem_router_prefill_hotspot_choices_total 0.0" in text
