"""Tensor parallelism of the model layer on CPU: two gloo ranks against the one-device model.

Each rank holds its shard (q/kv heads, MLP columns), runs a prefill of two prompts and one
decode step through its own paged KV cache with the torch attention backend in float32; its
hidden states and logits must match the one-device model's within float32 tolerance (the
row-parallel layers sum two partial products where one device sums one: a reduction-order
difference, not the same bits), and the greedy next tokens must be identical.
"""

import contextlib
import functools
import json
import queue
import shutil
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tandem.api.errors import ModelLoadError
from tandem.engine.attention import AttentionMetadata
from tandem.engine.attention.torch_backend import TorchAttentionBackend
from tandem.engine.kv_cache import KVCacheSpec, PagedKVCache
from tandem.engine.models import load_model
from tandem.engine.models.llama import RowParallelLinear
from tandem.engine.parallel import (
    ShardingError,
    TPConfig,
    TPGroup,
    TPInitError,
    init_tp_group,
    shard_of,
)
from tandem.engine.parallel.sharding import intermediate_cols, kv_heads, q_heads
from tandem.model_dir import load_model_config

BLOCK_SIZE = 4
PROMPTS = ([5, 9, 13, 2, 77, 31, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
ATOL, RTOL = 1e-5, 1e-4
"""float32 tolerance of TP=2 against TP=1 (seen: max abs difference ~1e-6 on these models)."""
TIMEOUT_S = 300
"""How long the test waits for its ranks (the 2-core CI box runs other test files beside it)."""
JOIN_TIMEOUT_S = 60.0
"""How long a rank waits for its peers (and any collective): well under ``TIMEOUT_S``, so a rank
that never comes fails the others with their own error before the test gives up on them."""
REPO_ROOT = Path(__file__).resolve().parents[3]


def _meta(tables, seq_lens, query_lens, num_decodes) -> AttentionMetadata:
    """Metadata of a flat batch: sequence i's new tokens are its last ``query_lens[i]``."""
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
    slots, qsl = [], [0]
    for table, n, q in zip(tables, seq_lens, query_lens, strict=True):
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n - q, n)]
        qsl.append(qsl[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64),
        num_decodes=num_decodes,
        seq_lens_cpu=list(seq_lens),
        query_start_loc_cpu=qsl,
        block_size=BLOCK_SIZE,
    )


def _load_model(model_dir, tp: TPGroup, dummy: bool = False):
    """``(config, model)``: the directory's model as rank ``tp.rank`` of ``tp`` holds it, on CPU in
    float32. Loading runs no collective, so a ``TPGroup(n, r)`` never joined stands for rank r."""
    config = load_model_config(model_dir)
    model = load_model(
        model_dir,
        config,
        TorchAttentionBackend(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        dummy=dummy,
        tp=tp,
    )
    return config, model


@torch.inference_mode()
def run_model(model_dir, tp: TPGroup, dummy: bool = False) -> dict[str, np.ndarray]:
    """Prefill both prompts, then one greedy decode step; hidden states, logits and tokens."""
    config, model = _load_model(model_dir, tp, dummy)
    spec = KVCacheSpec.for_model(
        config, BLOCK_SIZE, torch.float32, num_kv_heads=model.shard.num_kv_heads
    )
    cache = PagedKVCache(spec, 16, torch.device("cpu"))
    tables = [[7, 2], [0, 11, 5, 9]]  # fragmented pages; room for one decoded token each
    lens = [len(p) for p in PROMPTS]
    ids = torch.tensor([t for p in PROMPTS for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    hidden = model(ids, positions, cache.tensor, _meta(tables, lens, lens, 0))
    last = torch.tensor([lens[0] - 1, sum(lens) - 1])
    # Vocabulary-parallel head: every rank computes its rows, rank 0 alone gets the logits and
    # samples; the tokens reach the other ranks as rank 0's engine sends them (broadcast).
    logits = model.compute_logits(hidden[last])
    tokens = logits.argmax(-1) if logits is not None else torch.empty(2, dtype=torch.long)
    tp.broadcast(tokens)
    decode_hidden = model(
        tokens, torch.tensor(lens), cache.tensor, _meta(tables, [n + 1 for n in lens], [1, 1], 2)
    )
    decode_logits = model.compute_logits(decode_hidden)
    out = {"hidden": hidden.numpy(), "decode_hidden": decode_hidden.numpy()}
    if logits is not None:
        out["logits"] = logits.numpy()
        out["tokens"] = tokens.numpy()
        out["decode_logits"] = decode_logits.numpy()
        out["decode_tokens"] = decode_logits.argmax(-1).numpy()
    else:
        assert decode_logits is None, "only rank 0 gets the gathered logits"
    return out


def _rank_main(rank, world_size, init_method, jobs, results, timeout_s):
    """One spawned rank: join the group, run every (name, dir, dummy) job, report each."""
    torch.set_num_threads(1)  # two ranks (and maybe another test file) share a 2-core box
    try:
        cfg = TPConfig(world_size, rank, init_method=init_method, timeout_s=timeout_s)
        tp = init_tp_group(cfg, device="cpu")
        try:
            mine = torch.tensor([10.0 * rank, 10.0 * rank + 1])
            results.put((rank, "gather", tp.all_gather(mine, dim=0).numpy()))
            results.put((rank, "broadcast", tp.broadcast(mine.clone(), src=1).numpy()))
            for name, model_dir, dummy in jobs:
                results.put((rank, name, run_model(model_dir, tp, dummy)))
        finally:
            tp.destroy()
        results.put((rank, "done", None))
    except BaseException as exc:  # the parent must hear of it, not wait for it
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


@contextlib.contextmanager
def _importable_tests():
    """Spawned ranks unpickle ``_rank_main`` by its module, ``tests.unit.engine...``: they take
    this process's ``sys.path`` when started, which lacks the repository root when pytest runs
    as ``.venv/bin/pytest`` (not ``python -m pytest``)."""
    added = str(REPO_ROOT) not in sys.path
    if added:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(REPO_ROOT))


def _spawn(world_size, ranks, jobs, rendezvous: Path, timeout_s=JOIN_TIMEOUT_S) -> dict:
    """Start ``ranks`` of a ``world_size`` group; (rank, job name) -> result; errors raise.

    ``rendezvous``: a file that does not exist yet, the group's ``file://`` store (no port to
    pick, so none another process can take first)."""
    assert not rendezvous.exists()
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = rendezvous.as_uri()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, init_method, jobs, results, timeout_s))
        for r in ranks
    ]
    with _importable_tests():
        for p in procs:
            p.start()
    out, errors, done = {}, [], 0
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while done < len(procs):
            try:
                rank, name, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if not p.is_alive()]
                if len(dead) == len(procs) or time.monotonic() > deadline:
                    raise AssertionError(f"ranks died or hung (exit codes {dead})") from None
                continue
            if name == "error":
                errors.append((rank, value))
                done += 1
            elif name == "done":
                done += 1
            else:
                out[(rank, name)] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("; ".join(f"rank {r}: {e}" for r, e in errors))
    return out


@pytest.fixture(scope="module")
def one_kv_head_dir(tmp_path_factory):
    """Qwen2 (q/k/v biases) with 4 q heads and ONE kv head: at TP=2 each rank replicates it. Its
    odd vocabulary (333) leaves the last rank's vocabulary-parallel rows one short (padded)."""
    from tandem.model_gen import ModelGenOptions, generate_model_dir

    out = tmp_path_factory.mktemp("tp") / "qwen2-1kv"
    return generate_model_dir(ModelGenOptions(arch="qwen2", out=out, kv_heads=1, seed=5, vocab=333))


@pytest.fixture(scope="module")
def biased_dir(llama_dir, tmp_path_factory):
    """A Llama config with every bias (o_proj and down_proj too): shape only, for dummy weights."""
    out = tmp_path_factory.mktemp("tp") / "llama-biases"
    out.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    (out / "config.json").write_text(
        json.dumps({**config, "attention_bias": True, "mlp_bias": True})
    )
    return out


def _assert_close(want, got, what):
    err = float(np.abs(want - got).max())
    assert np.allclose(got, want, atol=ATOL, rtol=RTOL), f"{what}: max abs difference {err}"
    return err


def test_tp2_matches_tp1_for_every_architecture(tiny_model, one_kv_head_dir, biased_dir, tmp_path):
    from tests.conftest import TINY_MODELS

    jobs = [(name, tiny_model(name), False) for name in TINY_MODELS]
    jobs += [("qwen2-1kv", one_kv_head_dir, False), ("llama-biases-dummy", biased_dir, True)]
    jobs += [("qwen3-dummy", tiny_model("qwen3"), True)]
    got = _spawn(2, [0, 1], jobs, tmp_path / "rendezvous")
    for rank in range(2):
        np.testing.assert_array_equal(got[(rank, "gather")], [0.0, 1.0, 10.0, 11.0])
        np.testing.assert_array_equal(got[(rank, "broadcast")], [10.0, 11.0])
    worst = 0.0
    for name, model_dir, dummy in jobs:
        want = run_model(model_dir, TPGroup.single(), dummy)
        rank0, rank1 = got[(0, name)], got[(1, name)]
        assert set(rank0) == set(want) and set(rank1) == {"hidden", "decode_hidden"}
        for key in want:
            if key in rank1:
                # Both ranks hold the same full activations (the all-reduce gives both the sum).
                np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=f"{name} {key}")
            if "tokens" in key:
                np.testing.assert_array_equal(rank0[key], want[key], err_msg=f"{name} {key}")
            else:
                worst = max(worst, _assert_close(want[key], rank0[key], f"{name} {key}"))
    print(f"max abs difference TP=2 vs TP=1: {worst:.3g}")


def test_tp_init_fails_clearly_when_a_rank_never_comes(tmp_path):
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 could not join its group") as info:
        _spawn(2, [0], [], tmp_path / "rendezvous", timeout_s=3.0)
    assert "TPInitError" in str(info.value)


def test_sharding_pure_functions():
    assert list(q_heads(8, 2, 1)) == [4, 5, 6, 7]
    assert list(kv_heads(4, 2, 1)) == [2, 3]
    assert [list(kv_heads(1, 2, r)) for r in range(2)] == [[0], [0]]  # replicated
    assert [kv_heads(2, 4, r).start for r in range(4)] == [0, 0, 1, 1]
    assert list(intermediate_cols(12, 3, 2)) == list(range(8, 12))
    shard = shard_of(32, 8, 14336, 4, 3)
    assert (shard.num_heads, shard.num_kv_heads, shard.intermediate_size) == (8, 2, 3584)
    assert shard.q_heads.start == 24 and shard.kv_heads.start == 6
    with pytest.raises(ShardingError, match="6 attention heads cannot be split over .* 4"):
        q_heads(6, 4, 0)
    with pytest.raises(ShardingError, match="3 key/value heads cannot be split over .* 2"):
        kv_heads(3, 2, 0)
    with pytest.raises(ShardingError, match="2 key/value heads cannot be replicated over .* 3"):
        kv_heads(2, 3, 0)
    with pytest.raises(ShardingError, match="intermediate size 10 cannot be split .* 4"):
        intermediate_cols(10, 4, 0)
    with pytest.raises(ShardingError, match="rank 2 is outside"):
        q_heads(4, 2, 2)


def test_every_shape_that_divides_gives_each_rank_the_kv_heads_its_q_heads_read():
    """The GQA invariant of ``shard_of`` holds for every small shape the divisibility rules let
    through: its error is unreachable from input (see the next test for what it guards)."""
    for heads in range(1, 17):
        for kv in (k for k in range(1, heads + 1) if heads % k == 0):
            for tp in range(1, 9):
                for rank in range(tp):
                    try:
                        shard = shard_of(heads, kv, 8 * tp, tp, rank)
                    except ShardingError as exc:
                        assert "cannot be" in str(exc), (heads, kv, tp, exc)
                        continue
                    group = heads // kv
                    assert {h // group for h in shard.q_heads} <= set(shard.kv_heads)


def test_a_rank_holding_other_kv_heads_than_its_q_heads_read_is_refused(monkeypatch):
    from tandem.engine.parallel import sharding

    monkeypatch.setattr(sharding, "kv_heads", lambda n, tp, rank: range(3, 4))  # a broken rule
    with pytest.raises(ShardingError, match=r"rank 0 of 2 would compute q heads \[0, 1, 2, 3\], "
                       r"which read kv heads \[0, 1\], but holds kv heads \[3\]"):  # fmt: skip
        sharding.shard_of(8, 4, 16, 2, 0)


def test_indivisible_model_is_refused_at_load(llama_dir):
    # 4 heads, 2 kv heads
    with pytest.raises(ShardingError, match="4 attention heads cannot be split over .* 3"):
        _load_model(llama_dir, TPGroup(3, 0))


def _load(model_dir, tp, dummy=False):
    config, model = _load_model(model_dir, tp, dummy)
    return config, dict(model.named_parameters())


@pytest.mark.parametrize("dummy", [False, True], ids=["checkpoint", "dummy"])
def test_rank_shards_are_slices_of_the_one_device_weights(one_kv_head_dir, dummy):
    """4 q heads, 1 kv head at TP=2: rank r holds q heads 2r, 2r+1 and the one kv head; its MLP
    columns are the r-th half. No collective runs while loading, so no group is needed."""
    config, full = _load(one_kv_head_dir, TPGroup.single(), dummy)
    d, inter = config.head_dim, config.intermediate_size
    q, kv = 4 * d, d
    for rank in range(2):
        _, part = _load(one_kv_head_dir, TPGroup(2, rank), dummy)
        assert full.keys() == part.keys()
        heads = slice(rank * 2 * d, (rank + 1) * 2 * d)
        cols = slice(rank * inter // 2, (rank + 1) * inter // 2)
        for name, p in part.items():
            w = full[name]
            if ".qkv_proj." in name:
                want = torch.cat([w[:q][heads], w[q : q + kv], w[q + kv :]])
            elif ".gate_up_proj." in name:
                want = torch.cat([w[:inter][cols], w[inter:][cols]])
            elif name.endswith("o_proj.weight"):
                want = w[:, heads]
            elif name.endswith("down_proj.weight"):
                want = w[:, cols]
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                want = _vocab_part(w, rank, 2)
            else:
                want = w
            assert torch.equal(p, want), name


def _vocab_part(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a vocabulary-parallel weight: ``ceil(vocab / tp)`` rows, those past
    the vocabulary (the last rank's padding) zero."""
    per = -(-full.shape[0] // tp)
    rows = full[rank * per : (rank + 1) * per]
    return torch.cat([rows, rows.new_zeros(per - rows.shape[0], full.shape[1])])


def test_kv_heads_replicated_in_groups_of_two_ranks_are_the_right_slices(tiny_model):
    """4 q heads, 2 kv heads at TP=4 (qwen2: q/k/v biases too): each kv head is replicated on 2
    ranks; rank r holds q head r, kv head r*Hkv//tp (0, 0, 1, 1), MLP columns r*I/4..; o_proj's
    input columns r*d:(r+1)*d, d = heads per rank * head_dim. Compared against the checkpoint."""
    from safetensors.torch import load_file

    model_dir = tiny_model("qwen2")
    config = load_model_config(model_dir)
    assert (config.num_heads, config.num_kv_heads) == (4, 2)
    ckpt = load_file(model_dir / "model.safetensors")
    hd, inter, tp = config.head_dim, config.intermediate_size, 4
    for rank in range(tp):
        _, part = _load(model_dir, TPGroup(tp, rank))
        q = slice(rank * hd, (rank + 1) * hd)  # one q head per rank
        kv_head = rank * config.num_kv_heads // tp
        kv = slice(kv_head * hd, (kv_head + 1) * hd)
        cols = slice(rank * inter // tp, (rank + 1) * inter // tp)
        for layer in range(config.num_layers):
            pre = f"model.layers.{layer}"
            qkv = part[f"{pre}.self_attn.qkv_proj.weight"]
            assert qkv.shape == (3 * hd, config.hidden_size)
            for leaf in ("weight", "bias"):
                want = torch.cat(
                    [
                        ckpt[f"{pre}.self_attn.q_proj.{leaf}"][q],
                        ckpt[f"{pre}.self_attn.k_proj.{leaf}"][kv],
                        ckpt[f"{pre}.self_attn.v_proj.{leaf}"][kv],
                    ]
                )
                assert torch.equal(part[f"{pre}.self_attn.qkv_proj.{leaf}"], want), (rank, leaf)
            o_proj = part[f"{pre}.self_attn.o_proj.weight"]
            assert torch.equal(o_proj, ckpt[f"{pre}.self_attn.o_proj.weight"][:, q]), rank
            gate_up = torch.cat(
                [ckpt[f"{pre}.mlp.gate_proj.weight"][cols], ckpt[f"{pre}.mlp.up_proj.weight"][cols]]
            )
            assert torch.equal(part[f"{pre}.mlp.gate_up_proj.weight"], gate_up), rank
            down = ckpt[f"{pre}.mlp.down_proj.weight"][:, cols]
            assert torch.equal(part[f"{pre}.mlp.down_proj.weight"], down), rank
        embed = part["model.embed_tokens.weight"]
        assert torch.equal(embed, _vocab_part(ckpt["model.embed_tokens.weight"], rank, tp))


def test_checkpoint_keys_match_whole_module_names_not_substrings():
    from tandem.engine.models import loader

    config = SimpleNamespace(num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128)
    shard = shard_of(4, 2, 128, 2, 1)
    part = functools.partial(loader._rank_part, config, shard)
    assert part("model.layers.0.self_attn.o_proj.weight") == (1, slice(32, 64), 64)
    assert part("model.layers.0.self_attn.k_proj.bias") == (0, slice(16, 32), 32)
    assert part("model.layers.0.mlp.down_proj.weight") == (1, slice(64, 128), 128)
    # FP8 scales, adapters, look-alike names: none is a part (a substring match took them).
    assert part("model.layers.0.self_attn.o_proj.weight_scale_inv") is None
    assert part("model.layers.0.mlp.down_proj.weight_scale") is None
    assert part("model.layers.0.self_attn.o_proj_extra.weight") is None
    assert part("model.layers.0.self_attn.q_proj.lora_A.weight") is None
    assert part("model.layers.0.self_attn.o_proj.bias") is None  # row-parallel bias: whole
    assert loader._fused_of("model.layers.0.self_attn.q_proj.weight") == (
        "model.layers.0.self_attn.qkv_proj.weight",
        0,
    )
    assert loader._fused_of("model.layers.0.mlp.up_proj_extra.weight") is None
    assert loader._fused_of("model.layers.0.mlp.up_proj.weight_scale") is None


def test_a_look_alike_checkpoint_key_is_refused_as_unexpected(llama_dir, tmp_path):
    """``o_proj.weight_scale_inv`` contains ``.self_attn.o_proj.weight``: it must be refused by
    name, not sliced as o_proj's input columns (which failed with a misleading shape error)."""
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(llama_dir, extra)
    tensors = load_file(extra / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(2, 2)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    for tp in (TPGroup.single(), TPGroup(2, 1)):
        with pytest.raises(
            ModelLoadError,
            match=r"unexpected weight 'model\.layers\.0\.self_attn\.o_proj\.weight_s",
        ):
            _load(extra, tp)


def test_tp_loader_still_requires_every_weight(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing weights: model\.layers\.1\.self_attn\.k"):
        _load(broken, TPGroup(2, 1))


def test_tp1_builds_exactly_the_one_device_modules(llama_dir, biased_dir):
    for model_dir, dummy in ((llama_dir, False), (biased_dir, True)):
        _, model = _load_model(model_dir, TPGroup.single(), dummy)
        assert not any(isinstance(m, RowParallelLinear) for m in model.modules())
        assert model.model.layers[0].self_attn.o_proj.__class__ is torch.nn.Linear


def test_tp_config_from_env():
    cfg = TPConfig.from_env(
        {"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"}
    )
    assert (cfg.world_size, cfg.rank, cfg.master_addr, cfg.master_port) == (4, 3, "10.0.0.2", 1234)
    assert init_tp_group(TPConfig(1, 0)).world_size == 1  # no torch.distributed at all
    assert not torch.distributed.is_initialized()
    with pytest.raises(TPInitError, match="rank 2 is outside a tensor-parallel group of 2"):
        init_tp_group(TPConfig(2, 2))
