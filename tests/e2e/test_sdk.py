"""The gRPC client SDK against the real router (sync and asyncio)."""

import asyncio
import time

import pytest

from tandem.api.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    RequestTooLarge,
    UpstreamUnavailable,
)
from tandem.engine import SamplingParams
from tandem.sdk import AsyncClient, Client

from .conftest import wait_idle

pytestmark = pytest.mark.integration


def test_generate_and_stream_match_the_offline_engine_and_transformers(
    cluster, reference, e2e_model, hf_reference
):
    prompts = [
        "sdk prompt one",
        [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 222, 333, 444, 555, 666, 777, 888],
    ]
    want = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=2))
    hf = hf_reference(e2e_model, 10)
    with Client(cluster.router_grpc, timeout=60) as client:
        for prompt, w in zip(prompts, want, strict=True):
            result = client.generate(prompt, max_tokens=10, temperature=0, logprobs=2)
            assert (
                list(result.token_ids) == w.outputs[0].token_ids == hf.generate(w.prompt_token_ids)
            )
            assert result.text == w.outputs[0].text
            assert result.finish_reason == w.outputs[0].finish_reason
            assert result.usage.prompt_tokens == len(w.prompt_token_ids)
            assert result.usage.completion_tokens == len(w.outputs[0].token_ids)
            assert [lp.token_id for lp in result.logprobs] == w.outputs[0].token_ids
            assert [lp.logprob for lp in result.logprobs] == pytest.approx(
                [lp.logprob for lp in w.outputs[0].logprobs], abs=1e-4
            )
        chunks = list(client.stream(prompts[0], max_tokens=10, temperature=0))
        assert (
            len(chunks) >= 2
            and chunks[-1].finish_reason is not None
            and chunks[-1].usage is not None
        )
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert "".join(c.text for c in chunks) == want[0].outputs[0].text
        assert [m.id for m in client.models()] == ["llama"]


def test_seeded_sampling_is_the_same_disaggregated_and_offline(cluster, reference):
    """The prefill pod samples the first token, the decode pod the rest, from one seed."""
    params = dict(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    want = reference.generate(["seeded sampling"], SamplingParams(**params))[0].outputs[0].token_ids
    with Client(cluster.router_grpc, timeout=60) as client:
        assert list(client.generate("seeded sampling", **params).token_ids) == want


def test_async_client(cluster, reference):
    want = reference.generate(
        ["async one", "async two"], SamplingParams(temperature=0, max_tokens=8)
    )

    async def main():
        async with AsyncClient(cluster.router_grpc, timeout=60) as client:
            results = await asyncio.gather(
                client.generate("async one", max_tokens=8, temperature=0),
                client.generate("async two", max_tokens=8, temperature=0),
            )
            streamed = [c async for c in client.stream("async one", max_tokens=8, temperature=0)]
            return results, streamed

    results, streamed = asyncio.run(main())
    assert [list(r.token_ids) for r in results] == [w.outputs[0].token_ids for w in want]
    assert "".join(c.text for c in streamed) == want[0].outputs[0].text


def test_typed_errors(cluster):
    with Client(cluster.router_grpc, timeout=30) as client:
        with pytest.raises(InvalidRequest) as e:
            client.generate("x", temperature=-1)
        assert e.value.param == "temperature"
        with pytest.raises(InvalidRequest, match="unknown sampling option"):
            client.generate("x", temperatur=1)
        with pytest.raises(ModelNotFound):
            client.generate("x", model="other-model")
        with pytest.raises(RequestTooLarge) as e:
            client.generate("x", max_tokens=4000)
        assert e.value.param == "max_tokens"
        with pytest.raises(InvalidRequest):
            client.generate([], max_tokens=3)
        start = time.monotonic()
        client.generate("speed", max_tokens=200, ignore_eos=True)
        per_token = (time.monotonic() - start) / 200
        with pytest.raises(DeadlineExceeded):
            client.generate("slow", max_tokens=2000, ignore_eos=True, timeout=0.5)
    start = time.monotonic()
    wait_idle(cluster, timeout=60)
    assert time.monotonic() - start < (2000 * per_token - 0.5) / 3  # cancelled, not run to the end


def test_unreachable_router_is_retried_then_unavailable():
    with Client("127.0.0.1:1", timeout=5, max_retries=2) as client:
        with pytest.raises(UpstreamUnavailable):
            client.generate("nobody home", max_tokens=2)
