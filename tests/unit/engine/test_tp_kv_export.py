"""A tensor-parallel prefill engine's KV export (CPU, gloo, a real follower process): at each
layer-group boundary every rank sends its heads of the step's exported blocks to rank 0
(``kv_pages.gather_pages``), and the KV sender streams them, every kv head, over real gRPC into a
decode pod's receiver.

The pages that land must be the one-rank engine's (up to the float32 rounding of row-parallel
sums), for an even head split and for a single kv head replicated on both ranks, through chunked
prefill and layer groups smaller and larger than the model; and a transfer that fails midway
must leave the ranks in step for the next one.
"""

import contextlib

import numpy as np
import pytest
import torch

from tandem.api.sampling_params import SamplingParams
from tandem.engine import LLM
from tandem.proto.common.v1 import common_pb2
from tandem.transfer.push_streams import KVTarget
from tandem.transfer.sender import KVSender
from tests.unit.transfer.grpc_kv_receiver import GrpcKVReceiver

from .test_hf_parity import random_prompts

CHUNK = 1 << 16
OPTIONS = dict(num_kv_blocks=64, max_num_batched_tokens=24, max_num_seqs=4)
PREFILL = SamplingParams(temperature=0, max_tokens=1)


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory):
    """One kv head: at TP=2 both ranks hold (and cache) it."""
    from tandem.model_gen import ModelGenOptions, generate_model_dir

    out = tmp_path_factory.mktemp("models") / "llama-mqa"
    return generate_model_dir(ModelGenOptions(out=out, arch="llama", kv_heads=1, seed=8))


class Exporter:
    """An engine with a KV sender as its layer hook, and a gRPC receiver per transfer."""

    def __init__(self, llm: LLM, layers_per_group: int):
        self.engine = llm.engine
        self.spec = self.engine.runner.kv_wire_spec
        self.sender = KVSender(
            self.spec,
            "fp",
            layers_per_group=layers_per_group,
            max_chunk_bytes=CHUNK,
            device=torch.device("cpu"),
            memory_transports=self.engine.runner.tp.world_size == 1,
        )
        self.sender.attach_pool(self.engine.runner.kv_cache.tensor)
        self.engine.set_kv_layer_hook(self.sender)

    def export(self, rid: str, prompt: list[int], fingerprint: str = "fp"):
        """Prefill ``prompt`` with its KV pushed to a fresh receiver: (the transfer's result or
        error, the received pages of its blocks)."""
        return self.export_together({rid: prompt}, fingerprint)[rid]

    def export_together(self, prompts: dict[str, list[int]], fingerprint: str = "fp"):
        """Prefill every prompt in the same steps, each pushing to a receiver of its own:
        request id -> (the transfer's result or error, the received pages of its blocks)."""
        receivers, tokens, first = {}, {}, {}
        try:
            for rid, prompt in prompts.items():
                n = -(-len(prompt) // self.spec.block_size)
                r = receivers[rid] = GrpcKVReceiver(
                    self.spec, fingerprint, max_chunk_bytes=CHUNK, num_blocks=n
                )
                tokens[rid] = r.receiver.expect(rid, list(range(n)), 0).token
                target = KVTarget(f"127.0.0.1:{r.port}", rid, 0, "fp", tokens[rid])
                self.sender.start(rid, target, len(prompt))
                self.engine.add_request(rid, prompt, PREFILL)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        first[out.request_id] = out.outputs[0].token_ids[0]
            results = {}
            for rid, prompt in prompts.items():
                end = common_pb2.KVTransferEnd(
                    request_id=rid,
                    model_fingerprint="fp",
                    first_token_id=first[rid],
                    transfer_token=tokens[rid],
                )
                try:
                    result = self.sender.finish(rid, end).result(30)
                except Exception as exc:  # noqa: BLE001 - the test looks at it
                    result = exc
                n = -(-len(prompt) // self.spec.block_size)
                results[rid] = result, receivers[rid].pool[:, :, :n].clone()
            return results
        finally:
            for r in receivers.values():
                r.stop()

    def close(self):
        self.sender.close()


@contextlib.contextmanager
def exporter_of(model, tp: int, layers_per_group: int = 1):
    """An ``Exporter`` over a fresh engine of ``tp`` ranks; both closed after."""
    with LLM(model, tensor_parallel_size=tp, **OPTIONS) as llm:
        exporter = Exporter(llm, layers_per_group)
        try:
            yield exporter
        finally:
            exporter.close()


def exported_pages(model, tp: int, prompts, layers_per_group: int) -> list[torch.Tensor]:
    with exporter_of(model, tp, layers_per_group) as exporter:
        pages = []
        for i, prompt in enumerate(prompts):
            result, got = exporter.export(f"r{i}", prompt)
            assert not isinstance(result, Exception), result
            pages.append(got)
        return pages


@pytest.mark.parametrize("layers_per_group", [1, 8])
@pytest.mark.parametrize("model_name", ["llama", "mqa"])
def test_tp2_exports_the_one_rank_engines_pages(model_name, layers_per_group, llama_dir, mqa_dir):
    model = llama_dir if model_name == "llama" else mqa_dir
    # 90 tokens: 4 chunks of at most 24, 6 blocks, the last one partial; 16: one block.
    prompts = random_prompts(200, [90, 16], seed=3)
    expected = exported_pages(model, 1, prompts, layers_per_group)
    got = exported_pages(model, 2, prompts, layers_per_group)
    for want, have in zip(expected, got, strict=True):
        assert have.shape == want.shape and have.abs().sum() > 0
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_a_failed_transfer_leaves_the_ranks_in_step(llama_dir):
    prompts = random_prompts(200, [70, 40], seed=4)
    expected = exported_pages(llama_dir, 1, prompts[1:], 1)[0]
    with exporter_of(llama_dir, 2) as exporter:
        # The decode pod refuses every chunk (another model): the transfer fails midway, while
        # the ranks keep gathering the blocks rank 0 planned for the step.
        result, _ = exporter.export("bad", prompts[0], fingerprint="another-model")
        assert isinstance(result, Exception)
        result, got = exporter.export("good", prompts[1])
        assert not isinstance(result, Exception), result
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert exporter.engine.rank_failure() is None


def test_requests_exported_in_the_same_steps_get_their_own_pages(llama_dir):
    """Two prompts sharing a 32-token prefix, prefilled together: the step's gathered blocks
    serve both transfers (a shared block once), each renumbered into its own block table."""
    shared = random_prompts(200, [32], seed=6)[0]
    a, b = random_prompts(200, [50, 21], seed=7, prefix=shared)
    expected = exported_pages(llama_dir, 1, [a, b], 1)
    with exporter_of(llama_dir, 2) as exporter:
        got = exporter.export_together({"a": a, "b": b})
    for rid, want in zip("ab", expected, strict=True):
        result, pages = got[rid]
        assert not isinstance(result, Exception), result
        torch.testing.assert_close(pages, want, rtol=1e-5, atol=1e-5)


def test_a_kv_sender_error_fails_the_step_and_leaves_the_ranks_in_step(llama_dir, monkeypatch):
    """The sender raising inside rank 0's layer hook (the gathers are collectives the follower
    runs anyway): the step fails as on one rank, once its collectives are done; the group is
    not broken and the next export is exact."""
    from tandem.api.errors import TandemError

    prompts = random_prompts(200, [40, 40], seed=8)
    expected = exported_pages(llama_dir, 1, prompts[1:], 1)[0]
    with exporter_of(llama_dir, 2) as exporter:
        real = exporter.sender._send

        def broken(*args, **kwargs):
            raise RuntimeError("injected sender failure")

        monkeypatch.setattr(exporter.sender, "_send", broken)
        with pytest.raises(TandemError, match="injected sender failure"):
            exporter.export("bad", prompts[0])
        exporter.sender.abort("bad")
        exporter.engine.abort_request("bad")
        monkeypatch.setattr(exporter.sender, "_send", real)
        result, got = exporter.export("good", prompts[1])
        assert not isinstance(result, Exception), result
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert exporter.engine.rank_failure() is None


def test_block_tables_are_renumbered_to_the_gathered_blocks():
    from tandem.engine.runner import _renumbered

    exported = np.array([3, 8, 11])
    got = _renumbered(np.array([11, 3, 5, 8, 40]), exported)
    assert got.tolist() == [2, 0, -1, 1, -1]  # blocks not gathered read -1, never a neighbour
