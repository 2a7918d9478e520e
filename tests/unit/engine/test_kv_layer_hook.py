"""Prefill pods stream KV while the forward is still running: the engine shows each layer's KV to
its layer hook as soon as that layer is written, before the later layers are computed."""

import torch

from tandem.engine import LLM, SamplingParams
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.sender import KVSender


class LayerRecorder:
    """Per call: (layers done, the just-written layer holds the prompt's KV, later layers are
    still empty) for the prompt's blocks."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, bool]] = []

    def on_layers_computed(self, scheduled, num_layers_done: int, kv_cache: torch.Tensor) -> None:
        blocks = torch.tensor(scheduled[0].block_ids)
        pages = kv_cache[:, :, blocks]
        self.calls.append(
            (
                num_layers_done,
                bool(pages[num_layers_done - 1].any()),
                not pages[num_layers_done:].any(),
            )
        )


def test_each_layers_kv_is_visible_before_the_next_layer_runs(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=64)
    layers = llm.engine.model_config.num_layers
    recorder = LayerRecorder()
    llm.engine.set_kv_layer_hook(recorder)
    llm.generate([list(range(3, 40))], SamplingParams(temperature=0, max_tokens=1))
    assert [n for n, _, _ in recorder.calls] == list(
        range(1, layers + 1)
    )  # one call per layer, in order
    assert all(written for _, written, _ in recorder.calls)
    assert all(later_empty for _, _, later_empty in recorder.calls), (
        "a later layer was written before its turn"
    )


def test_the_sender_queues_a_layer_groups_pages_before_the_last_layer(llama_dir):
    llm = LLM(llama_dir, num_kv_blocks=64)
    engine = llm.engine
    layers = engine.model_config.num_layers
    assert layers >= 2
    sender = KVSender(
        engine.runner.kv_spec,
        engine.fingerprint.digest(),
        layers_per_group=1,
        device=engine.runner.device,
    )
    queued_at: list[tuple[int, int]] = []

    class Watch:
        def on_layers_computed(self, scheduled, num_layers_done, kv_cache):
            sender.on_layers_computed(scheduled, num_layers_done, kv_cache)
            queued_at.append((num_layers_done, sender._transfers["r"].chunks))

    # No decode pod listens: the chunks only need to be queued (their streams then fail).
    sender.start("r", KVTarget("127.0.0.1:1", "r", 0, engine.fingerprint.digest()), 37)
    engine.set_kv_layer_hook(Watch())
    try:
        engine.add_request("r", list(range(3, 40)), SamplingParams(temperature=0, max_tokens=1))
        engine.step()
    finally:
        sender.close()
    first_layer, chunks = queued_at[0]
    assert first_layer == 1 and chunks > 0, queued_at  # pages left after layer 1 of the forward
    assert [c for _, c in queued_at] == sorted(c for _, c in queued_at)
