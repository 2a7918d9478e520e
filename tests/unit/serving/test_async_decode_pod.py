"""A decode pod with async scheduling and async outputs (a GPU pod's default), on CPU.

Reservations, pushed KV and remote first tokens arrive while the pod's engine has a decode step
launched ahead; every request must still get the offline engine's tokens.
"""

import asyncio
import random

from tandem.engine import LLM, SamplingParams


def test_disaggregated_requests_on_an_async_decode_pod_get_the_offline_tokens(tiny_model):
    from services.decode import server as decode_server
    from services.decode.settings import DecodeSettings
    from services.prefill import server as prefill_server
    from services.prefill.settings import PrefillSettings
    from services.router.discovery import StaticDiscovery
    from services.router.flow import Dispatcher, Job, Route
    from services.router.pods import PodRegistry
    from services.router.settings import RouterSettings

    model_dir = tiny_model("llama")
    rng = random.Random(5)
    batch = [[rng.randrange(3, 1000) for _ in range(n)] for n in (9, 40, 17, 70, 5, 33)]
    lengths = [24, 6, 30, 12, 20, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    offline = LLM(model_dir, num_kv_blocks=256)
    want = [o.outputs[0].token_ids for o in offline.generate(batch, params)]

    async def main():
        common = dict(model=model_dir, host="127.0.0.1", port=0, num_kv_blocks=256)
        p = await prefill_server.start(PrefillSettings(**common))
        d = await decode_server.start(DecodeSettings(**common, async_scheduling="on", async_output_processing="on"))
        assert d.parts["engine"].async_scheduling
        pa, da = f"127.0.0.1:{p.port}", f"127.0.0.1:{d.port}"
        registry = PodRegistry(StaticDiscovery([pa], [da]), interval_s=60, timeout_s=5)
        await registry.start()
        try:
            dispatcher = Dispatcher(registry, RouterSettings(model=model_dir, prefill=[pa], decode=[da]))

            async def one(i):
                await asyncio.sleep(0.05 * i)  # arrivals while the others decode
                route = Route()
                events = [e async for e in dispatcher.generate(Job(f"a{i}", batch[i], params[i]), route)]
                assert route.mode == "disaggregated"
                return [t for e in events for t in e.token_ids]

            got = await asyncio.gather(*(one(i) for i in range(len(batch))))
            stats = d.parts["engine"].get_stats()
            assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
            return got
        finally:
            await registry.close()
            await p.stop()
            await d.stop()

    assert asyncio.run(main()) == want
