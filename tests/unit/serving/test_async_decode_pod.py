"""A decode pod with async scheduling and async outputs (a GPU pod's default), on CPU.

Reservations, pushed KV and remote first tokens arrive while the pod's engine has a decode step
launched ahead; every request must still get the offline engine's tokens.
"""

import asyncio
import random

from tandem.engine import LLM, SamplingParams


def test_disaggregated_requests_on_an_async_decode_pod_get_the_offline_tokens(
    tiny_model, in_process_pods
):
    from services.router.flow import Route
    from tandem.api.requests import Job

    model_dir = tiny_model("llama")
    rng = random.Random(5)
    batch = [[rng.randrange(3, 1000) for _ in range(n)] for n in (9, 40, 17, 70, 5, 33)]
    lengths = [24, 6, 30, 12, 20, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    offline = LLM(model_dir, num_kv_blocks=256)
    want = [o.outputs[0].token_ids for o in offline.generate(batch, params)]

    async def main():
        decode = dict(async_scheduling="on", async_output_processing="on")
        async with in_process_pods(model_dir, decode=decode, num_kv_blocks=256) as (
            dispatcher,
            _,
            d,
        ):
            assert d.parts["core"].info.async_scheduling

            async def one(i):
                await asyncio.sleep(0.05 * i)  # arrivals while the others decode
                route = Route()
                events = [
                    e async for e in dispatcher.generate(Job(f"a{i}", batch[i], params[i]), route)
                ]
                assert route.mode == "disaggregated"
                return [t for e in events for t in e.token_ids]

            got = await asyncio.gather(*(one(i) for i in range(len(batch))))
            stats = d.parts["core"].stats
            assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
            return got

    assert asyncio.run(main()) == want
