"""Engine speed against the roofline (W0 micro) and against Hugging Face (W1 offline), one run.

    python bench/engine.py --device cuda                       # micro: 1B and 8B shapes
    python bench/engine.py --device cuda --section offline --shapes qwen3-0.6b llama-3.2-1b
    python bench/engine.py --shapes tiny                       # the code path on CPU, tiny shape

micro: one decode step (the runner's step: inputs, forward, sampling; a CUDA graph where the
engine would use one) at batch {1, 8, 32, 128, 256} x context {1k, 4k} on fragmented block
tables, one prefill of {1k, 8k, 32k} tokens, and a 2k chunk after {6k, 30k} cached tokens
(``--prefill-after``), each with its floor and the fraction reached.
Then the engine loop: ``engine.step()`` while a batch of {1, 256} requests decodes at 1k context
(scheduler, runner and outputs: the time per output token a user sees), synchronous and with
async scheduling, which overlaps the host's part of a step with the device's next step.
Floors use the copy bandwidth and bf16 matmul rate measured at the start of the same run:
decode >= (weights read + batch x context x KV bytes/token) / bandwidth; prefill of N tokens
after C cached >= (2 x linear params x N + 4 x (N x C + N^2 / 2) x q_heads x head_dim x layers)
/ matmul rate. Weights are random
(``load_format="dummy"``): speed does not depend on their values.

offline: nano-vllm's protocol (W1: 256 requests, input and output lengths uniform in [100,
1024], seed 0, EOS ignored), or ``--workload w4`` (ShareGPT-shaped lognormal lengths, means
about 211 in / 202 out: ``--num-requests 1000 --hf-modes``), on the same random weights through
Tandem (once per ``--async`` mode; the engine's batch defaults unless ``--max-num-seqs`` /
``--max-num-batched-tokens``) and through transformers:
batched ``generate`` (static batches) and ``generate_batch`` (continuous batching, paged
attention) when the installed version has it. Ratios printed last.
Each Tandem run is also set against its per-step roofline (bench/roofline.py): every step that
ran (its rows' cached and new tokens; device time from CUDA events) gets the floor max(bytes /
copy rate, FLOPs / matmul rate), both rates measured at the start; printed and written
(``tandem_roofline``) per group of steps (prefill-containing, decode > 256 / 65-256 / <= 64
sequences), with the summed floor against the wall time and the output tok/s that floor implies.

Prints tables and writes JSON under bench/results/ (or --out-dir).
"""

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table, write_result  # noqa: E402
from roofline import ModelCost, StepRecord, format_summary, summarize  # noqa: E402
from shapes import shape_dir  # noqa: E402
from workloads import w4_requests  # noqa: E402

NOMINAL_BANDWIDTH = 3.0e12
NOMINAL_FLOPS = 790e12
"""The issue's H100 80GB figures (../shared/BENCHMARKS.md): floors against them are comparable
across runs; floors against this run's own measurements show what is left on this GPU."""


def measure_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth (bytes read + written per second), median of 10 copies of 1 GiB."""
    if device.type != "cuda":
        return 20e9
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / statistics.median(times[2:])


def measure_matmul(device: torch.device) -> float:
    """bf16 matmul rate (FLOP/s) of an 8192^3 product, median of 10."""
    if device.type != "cuda":
        return 50e9
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times[2:])


class Shape:
    """Byte and FLOP counts of a loaded model, for the floors."""

    def __init__(self, engine) -> None:
        mc = engine.model_config
        model = engine.runner.model
        itemsize = engine.runner.kv_spec.dtype.itemsize
        params = sum(p.numel() for p in model.parameters())
        embed = model.model.embed_tokens.weight.numel()
        # Decode reads every weight but the embedding table (only the batch's rows), unless the
        # LM head is that same table.
        self.weight_bytes = (params - (0 if mc.tie_word_embeddings else embed)) * itemsize
        lm_head = 0 if mc.tie_word_embeddings else embed
        self.linear_params = params - embed - lm_head
        self.kv_bytes_per_token = engine.runner.kv_spec.bytes_per_block // engine.config.block_size
        self.q_heads, self.head_dim, self.layers = mc.num_heads, mc.head_dim, mc.num_layers

    def decode_floor(self, batch: int, context: int, bandwidth: float) -> float:
        return (self.weight_bytes + batch * context * self.kv_bytes_per_token) / bandwidth

    def prefill_floor(self, tokens: int, flops: float, context: int = 0) -> float:
        """A chunk of ``tokens`` after ``context`` cached ones: the linear layers, and causal
        attention (QK and PV: 4 x head_dim FLOPs per query head and visible key)."""
        visible = tokens * context + tokens**2 / 2
        work = (
            2 * self.linear_params * tokens
            + 4 * visible * self.q_heads * self.head_dim * self.layers
        )
        return work / flops


def synthetic_step(engine, batch: int, context: int, new_tokens: int, rng: random.Random):
    """``batch`` sequences whose first ``context`` tokens are in the cache, on shuffled blocks."""
    from tandem.api.sampling_params import SamplingParams
    from tandem.engine.scheduler import ScheduledSequence
    from tandem.engine.sequence import Sequence

    bs = engine.config.block_size
    total = context + new_tokens
    per_seq = -(-total // bs)
    pool = list(range(engine.runner.kv_cache.num_blocks))
    if batch * per_seq > len(pool):
        return None
    rng.shuffle(pool)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    steps = []
    for i in range(batch):
        seq = Sequence(
            f"bench-{i}",
            [rng.randrange(3, vocab) for _ in range(total)],
            params,
            arrival_time=0.0,
            arrival_index=i,
        )
        # A read-only int64 array, as the block manager hands out tables (the runner's fast path).
        blocks = np.array(pool[i * per_seq : (i + 1) * per_seq], dtype=np.int64)
        blocks.flags.writeable = False
        steps.append(
            ScheduledSequence(
                seq, start=context, num_new_tokens=new_tokens, block_ids=blocks, samples=True
            )
        )
    return steps


def time_steps(engine, steps, warmup: int, iters: int) -> float:
    runner = engine.runner
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        runner.execute(steps)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        runner.execute(steps)  # ends by reading the sampled tokens: a device sync
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loop_decode(
    engine, batch: int, context: int, steps: int, async_mode: str, rng: random.Random
) -> float | None:
    """Seconds per ``engine.step()`` while ``batch`` requests decode at ``context`` tokens: the
    engine's whole step (scheduler, runner, outputs), i.e. the time per output token a user sees,
    under one async mode. None when the KV pool cannot hold the batch."""
    from tandem.api.sampling_params import SamplingParams

    bs = engine.config.block_size
    if batch * -(-(context + steps + 16) // bs) > engine.block_manager.num_free_blocks:
        return None
    engine.config = engine.config.model_copy(update=ASYNC_MODES[async_mode])  # read at every step
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"loop-{async_mode}-{batch}-{i}",
            [rng.randrange(3, vocab) for _ in range(context)],
            params,
        )
    sched = engine.scheduler
    while len(sched.waiting) or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in sched.running
    ):
        engine.step()  # the prefills
    for _ in range(4):
        engine.step()
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = (time.perf_counter() - t0) / steps
    for rid in engine.request_ids():
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return seconds


def micro(args, device: torch.device, out: Path) -> dict:
    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine

    bandwidth, flops = measure_bandwidth(device), measure_matmul(device)
    print(f"measured: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    rows, records = [], []
    rng = random.Random(0)
    for name in args.shapes:
        model = shape_dir(name, out)
        after = [tuple(map(int, spec.split(":"))) for spec in args.prefill_after]
        longest = max(
            max(args.prefill),
            max(args.contexts) + 1,
            args.loop_context + args.loop_steps + 16,
            *(c + n for c, n in after),
        )
        engine = LLMEngine(
            EngineConfig(
                model=str(model),
                device=args.device,
                dtype=args.dtype,
                load_format="dummy",
                max_num_seqs=max(args.batches),
                max_num_batched_tokens=max(args.prefill + [n for _, n in after]),
                max_model_len=longest + 16,
                enable_prefix_caching=False,
            )
        )
        shape = Shape(engine)
        backend = f"{engine.runner.backend_name}{'+graphs' if engine.runner.graphs else ''}"
        for context in args.contexts:
            for batch in args.batches:
                steps = synthetic_step(engine, batch, context, 1, rng)
                floor = shape.decode_floor(batch, context, bandwidth)
                nominal = shape.decode_floor(batch, context, NOMINAL_BANDWIDTH)
                if steps is None:
                    rows.append(
                        [
                            name,
                            "decode",
                            batch,
                            context,
                            "KV does not fit",
                            floor * 1e3,
                            "",
                            "",
                            backend,
                        ]
                    )
                    continue
                t = time_steps(engine, steps, args.warmup, args.iters)
                rows.append(
                    [
                        name,
                        "decode",
                        batch,
                        context,
                        t * 1e3,
                        floor * 1e3,
                        floor / t,
                        nominal / t,
                        backend,
                    ]
                )
                records.append(
                    dict(
                        shape=name,
                        kind="decode",
                        batch=batch,
                        context=context,
                        seconds=t,
                        floor_seconds=floor,
                        fraction_of_floor=floor / t,
                        nominal_floor_seconds=nominal,
                        fraction_of_nominal_floor=nominal / t,
                        backend=backend,
                    )
                )
        for batch in args.loop_batches:
            context = args.loop_context
            floor = shape.decode_floor(batch, context, bandwidth)
            nominal = shape.decode_floor(batch, context, NOMINAL_BANDWIDTH)
            for mode in args.loop_async:
                t = loop_decode(engine, batch, context, args.loop_steps, mode, rng)
                if t is None:
                    rows.append(
                        [
                            name,
                            f"engine loop ({mode})",
                            batch,
                            context,
                            "KV does not fit",
                            floor * 1e3,
                            "",
                            "",
                            backend,
                        ]
                    )
                    continue
                rows.append(
                    [
                        name,
                        f"engine loop ({mode})",
                        batch,
                        context,
                        t * 1e3,
                        floor * 1e3,
                        floor / t,
                        nominal / t,
                        backend,
                    ]
                )
                records.append(
                    dict(
                        shape=name,
                        kind="engine-loop",
                        async_mode=mode,
                        batch=batch,
                        context=context,
                        seconds=t,
                        floor_seconds=floor,
                        fraction_of_floor=floor / t,
                        nominal_floor_seconds=nominal,
                        fraction_of_nominal_floor=nominal / t,
                        backend=backend,
                    )
                )
        for context, tokens in [(0, n) for n in args.prefill] + after:
            steps = synthetic_step(engine, 1, context, tokens, rng)
            floor = shape.prefill_floor(tokens, flops, context)
            nominal = shape.prefill_floor(tokens, NOMINAL_FLOPS, context)
            t = time_steps(engine, steps, 1, max(3, args.iters // 4))
            achieved = shape.prefill_floor(tokens, 1.0, context) / t
            rows.append(
                [
                    name,
                    f"prefill after {context}" if context else "prefill",
                    1,
                    tokens,
                    t * 1e3,
                    floor * 1e3,
                    floor / t,
                    nominal / t,
                    f"{backend} {achieved / 1e12:.0f} TFLOP/s",
                ]
            )
            records.append(
                dict(
                    shape=name,
                    kind="prefill",
                    context=context,
                    tokens=tokens,
                    seconds=t,
                    floor_seconds=floor,
                    fraction_of_floor=floor / t,
                    nominal_floor_seconds=nominal,
                    fraction_of_nominal_floor=nominal / t,
                    tflops=achieved / 1e12,
                    backend=backend,
                )
            )
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(
        [
            "shape",
            "step",
            "batch",
            "context/tokens",
            "ms",
            "floor ms",
            "of floor",
            "of H100 floor",
            "backend",
        ],
        rows,
    )
    return {"bandwidth_Bps": bandwidth, "matmul_flops": flops, "results": records}


def nano_vllm_requests(n: int, lo: int, hi: int, vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    return prompts, [rng.randint(lo, hi) for _ in range(n)]


ASYNC_MODES = {  # --async: the engine's async_output_processing and async_scheduling
    "auto": dict(async_output_processing="auto", async_scheduling="auto"),
    "off": dict(async_output_processing="off", async_scheduling="off"),
    "outputs": dict(async_output_processing="on", async_scheduling="off"),
    "scheduling": dict(async_output_processing="on", async_scheduling="on"),
}


def model_cost(engine) -> ModelCost:
    """The roofline's per-token costs of the engine's loaded model (``Shape`` plus the LM head
    and the layers' windows)."""
    shape, mc = Shape(engine), engine.model_config
    return ModelCost(
        weight_bytes=shape.weight_bytes,
        linear_params=shape.linear_params,
        lm_head_params=engine.runner.model.model.embed_tokens.weight.numel(),
        kv_bytes_per_token=shape.kv_bytes_per_token,
        q_heads=shape.q_heads,
        head_dim=shape.head_dim,
        windows=tuple(mc.sliding_windows),
    )


def tandem_offline(
    model: Path,
    args,
    prompts,
    out_lens,
    async_mode: str,
    rates: tuple[float, float],
    timed: bool = True,
) -> dict:
    """One Tandem run of the offline protocol: seconds, tokens/s, where the steps' time went and
    the run against its per-step roofline floor (``rates``: copy bytes/s, matmul FLOP/s).
    ``timed=False``: no per-step timing (events, rows) at all, to show what it costs."""
    from tandem.engine import LLM, SamplingParams

    llm = LLM(
        model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        load_format="auto" if args.hf_modes else "dummy",
        tensor_parallel_size=args.tensor_parallel_size,
        **(
            {"max_cuda_graph_batch": args.max_cuda_graph_batch} if args.max_cuda_graph_batch else {}
        ),
        **ASYNC_MODES[async_mode],
    )
    print(
        f"engine: max_num_seqs {llm.engine.config.max_num_seqs}, max_num_batched_tokens "
        f"{llm.engine.config.max_num_batched_tokens}, {llm.engine.limits.num_kv_blocks} KV blocks",
        flush=True,
    )
    wanted = sum(out_lens)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    runner, timing = llm.engine.runner, {"steps": 0, "execute_s": 0.0}
    launch = runner.launch
    per_step: list[tuple[int, int, float]] = []
    # For the roofline: each step's rows, and its device span (events around what launch queues).
    on_cuda = runner.device.type == "cuda"
    ran: list[tuple[np.ndarray, np.ndarray, int, int, object, float, float]] = []

    class TimedStep:
        """A launched step whose ``result()`` records the time from launch to tokens read (with
        async output processing or scheduling this includes host work done meanwhile: the
        previous step's outputs)."""

        def __init__(self, scheduled, launched, t0, events):
            self.scheduled, self.launched, self.t0, self.events = scheduled, launched, t0, events
            # What the engine reads of a launched step besides result() (async scheduling's
            # tokens, the prompt logprobs it computed).
            self.sampled, self.tokens, self.prompt_logprobs = (
                launched.sampled,
                launched.tokens,
                launched.prompt_logprobs,
            )

        def result(self):
            try:
                return self.launched.result()
            finally:
                took = time.perf_counter() - self.t0
                timing["steps"] += 1
                timing["execute_s"] += took
                per_step.append(
                    (len(self.scheduled), sum(s.num_new_tokens for s in self.scheduled), took)
                )
                rows = self.scheduled
                ran.append(
                    (
                        np.fromiter((s.start for s in rows), np.int64, len(rows)),
                        np.fromiter((s.num_new_tokens for s in rows), np.int64, len(rows)),
                        len(self.sampled),
                        sum(s.start < s.seq.num_prompt_tokens for s in rows),
                        self.events,
                        self.t0,
                        self.t0 + took,
                    )
                )

    def timed_launch(scheduled, input_ids=None):
        t = time.perf_counter()
        events = None
        if on_cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        launched = launch(scheduled, input_ids)
        if events:
            events[1].record()
        return TimedStep(scheduled, launched, t, events)

    if timed:  # where the time goes: model steps vs the engine around them
        runner.launch = timed_launch
    replays = runner.graphs.replays if runner.graphs else 0
    t0 = time.perf_counter()
    outs = llm.generate(
        prompts, [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in out_lens]
    )
    seconds = time.perf_counter() - t0
    llm.close()  # a tensor-parallel engine's ranks (the next run starts its own)
    if not timed:
        print(f"tandem (async {async_mode}, untimed): {wanted} tokens in {seconds:.1f} s")
        return {"seconds": seconds, "tok_s": wanted / seconds, "timing": None, "roofline": None}
    timing["graph_steps"] = (runner.graphs.replays if runner.graphs else 0) - replays
    timing["async_output_processing"] = llm.engine.async_output_processing
    timing["async_scheduling"] = llm.engine.async_scheduling
    for lo, hi in ((1, 64), (65, 128), (129, 256), (257, 512), (513, 1024)):
        sel = [s for b, n, s in per_step if lo <= b <= hi and n == b]
        if sel:
            print(
                f"  decode steps of {lo}-{hi} sequences: {len(sel)}, "
                f"median {statistics.median(sel) * 1e3:.2f} ms,"
                f" total {sum(sel):.1f} s",
                flush=True,
            )
    mixed = [s for b, n, s in per_step if n != b]
    print(f"  steps with prompt tokens: {len(mixed)}, total {sum(mixed):.1f} s", flush=True)
    timing["mixed_steps"], timing["mixed_s"] = len(mixed), sum(mixed)
    timing["decode_steps"] = len(per_step) - len(mixed)
    timing["decode_s"] = sum(s for b, n, s in per_step if n == b)
    print(
        f"async {async_mode}: {timing['steps']} steps ({timing['graph_steps']} from CUDA graphs), "
        f"{timing['execute_s']:.1f} s launch to tokens, "
        f"{seconds - timing['execute_s']:.1f} s around it",
        flush=True,
    )
    assert sum(len(o.outputs[0].token_ids) for o in outs) == wanted
    if on_cuda:
        torch.cuda.synchronize()
    # A step's time: on CUDA its span on the stream, between events recorded before and after
    # its launch: device time plus any time the GPU sat waiting for the host to queue the
    # step's kernels (host work is not overlapped then: the floor cannot tell which). On the
    # CPU (where launch computes the step) the wall time from its launch, or the step before's
    # tokens, to its tokens.
    steps, last_end = [], 0.0
    for starts, new, sampled, prefill_rows, events, start, end in ran:
        took = events[0].elapsed_time(events[1]) / 1e3 if events else end - max(start, last_end)
        steps.append(StepRecord(starts, new, sampled, prefill_rows, took))
        last_end = end
    roofline = summarize(model_cost(llm.engine), steps, *rates, wanted, seconds)
    roofline["step_time"] = (
        "stream span around the launch (device time + GPU waiting on the host)"
        if on_cuda
        else "launch to tokens"
    )
    print("\n".join(format_summary(roofline)), flush=True)
    print(f"tandem (async {async_mode}): {wanted} tokens in {seconds:.1f} s", flush=True)
    return {"seconds": seconds, "tok_s": wanted / seconds, "timing": timing, "roofline": roofline}


def release_gpu_memory() -> None:
    """Collect a finished engine: its CUDA graphs and KV pool must be gone before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def offline(args, device: torch.device, out: Path) -> dict:
    rows, records = [], []
    rates = measure_bandwidth(device), measure_matmul(device)  # for the per-step roofline
    release_gpu_memory()
    print(f"measured: copy {rates[0] / 1e12:.3g} TB/s, matmul {rates[1] / 1e12:.3g} TFLOP/s")
    for name in args.shapes:
        # Weights on disk only for transformers to load; Tandem alone runs dummy weights.
        model = shape_dir(name, out, with_weights=bool(args.hf_modes), device=args.device)
        from tandem.model_dir import load_model_config

        vocab = load_model_config(model).vocab_size
        if args.workload == "w4":
            prompts, out_lens = w4_requests(args.num_requests, vocab, 0)
        else:
            prompts, out_lens = nano_vllm_requests(
                args.num_requests, args.min_len, args.max_len, vocab, 0
            )
        print(
            f"{name} {args.workload}: {len(prompts)} requests, mean "
            f"{statistics.mean(map(len, prompts)):.0f} in / {statistics.mean(out_lens):.0f} out",
            flush=True,
        )
        wanted = sum(out_lens)
        runs = {}
        for mode in args.async_modes:
            runs[mode] = tandem_offline(model, args, prompts, out_lens, mode, rates)
            release_gpu_memory()
            if args.untimed:
                untimed = tandem_offline(model, args, prompts, out_lens, mode, rates, timed=False)
                runs[f"{mode}, untimed"] = untimed
                release_gpu_memory()
        first = runs[args.async_modes[0]]
        tandem_s = first["seconds"]
        result = {
            "shape": name,
            "workload": args.workload,
            "mean_input_len": statistics.mean(map(len, prompts)),
            "mean_output_len": statistics.mean(out_lens),
            "requests": len(prompts),
            "output_tokens": wanted,
            "tandem_s": tandem_s,
            "tandem_tok_s": wanted / tandem_s,
            "tandem_timing": first["timing"],
            "tandem_roofline": first["roofline"],
            "tandem_by_async_mode": runs,
        }
        for mode, run in runs.items():
            rows.append(
                [
                    name,
                    f"tandem (async {mode})",
                    wanted,
                    run["seconds"],
                    run["tok_s"],
                    first["tok_s"] / run["tok_s"],
                ]
            )
        hf = hf_offline(model, prompts, out_lens, device, args.hf_modes) if args.hf_modes else {}
        for mode, measured in hf.items():
            if measured is None:
                rows.append([name, f"hf {mode}", "", "not available", "", ""])
                continue
            seconds, tokens = measured
            ratio = (wanted / tandem_s) / (tokens / seconds)
            result.update(
                {
                    f"hf_{mode}_s": seconds,
                    f"hf_{mode}_output_tokens": tokens,
                    f"tandem_over_hf_{mode}_tok_s": ratio,
                }
            )
            rows.append([name, f"hf {mode}", tokens, seconds, tokens / seconds, ratio])
        records.append(result)
    print_table(
        ["shape", "engine", "out tokens", "s", "out tok/s", "first tandem row's tok/s over this"],
        rows,
    )
    return {"bandwidth_Bps": rates[0], "matmul_flops": rates[1], "results": records}


def hf_offline(model_dir: Path, prompts, out_lens, device: torch.device, modes) -> dict:
    """(seconds, output tokens) for transformers on the same prompts (greedy, EOS ignored).

    transformers takes one ``max_new_tokens`` per call, so its requests generate the batch's
    longest output: compare output tokens per second, not wall time.
    """
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    results = {}
    if "generate" in modes:
        # Static batches of 64, padded on the left; each batch runs to its longest output.
        pad = hf.config.pad_token_id
        t0 = time.perf_counter()
        for i in range(0, len(prompts), 64):
            print(f"hf generate: batch {i // 64} at {time.perf_counter() - t0:.1f} s", flush=True)
            batch, lens = prompts[i : i + 64], out_lens[i : i + 64]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device
            )
            with torch.no_grad():
                hf.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max(lens),
                    min_new_tokens=max(lens),
                    do_sample=False,
                )
        print(f"hf generate: {time.perf_counter() - t0:.1f} s", flush=True)
        results["generate"] = (
            time.perf_counter() - t0,
            sum(
                len(prompts[i : i + 64]) * max(out_lens[i : i + 64])
                for i in range(0, len(prompts), 64)
            ),
        )
    if "generate_batch" in modes:
        if not hasattr(hf, "generate_batch"):
            results["generate_batch"] = None
        else:
            try:
                results["generate_batch"] = _hf_generate_batch(hf, prompts, out_lens)
            except Exception as e:  # noqa: BLE001 - an API change in transformers must not lose the run
                print(f"transformers generate_batch failed: {type(e).__name__}: {e}")
                results["generate_batch"] = None
    del hf
    return results


def _hf_generate_batch(hf, prompts, out_lens) -> tuple[float, int]:
    """transformers' continuous batching (paged attention), EOS suppressed up to the longest
    output."""
    from transformers import GenerationConfig

    n = max(out_lens)
    # No EOS at all (rather than min_new_tokens, a logits processor that continuous batching runs
    # per request or drops): every request generates exactly n tokens.
    config = GenerationConfig(
        max_new_tokens=n, do_sample=False, pad_token_id=hf.config.pad_token_id, eos_token_id=None
    )
    hf.generate_batch(
        inputs=[prompts[0][:16]], generation_config=config, progress_bar=False
    )  # warm-up
    t0 = time.perf_counter()
    out = hf.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(o.generated_tokens) for o in out.values())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--section", choices=["micro", "offline"], default="micro")
    ap.add_argument("--shapes", nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument(
        "--prefill-after",
        nargs="*",
        default=["6144:2048", "30720:2048"],
        metavar="CONTEXT:TOKENS",
        help="micro: a prompt chunk of TOKENS after CONTEXT cached tokens (chunked prefill, prefix "
        "hits): the paged prefill kernel",
    )
    ap.add_argument(
        "--loop-batches",
        type=int,
        nargs="*",
        default=[1, 256],
        help="micro: decode batches also timed through the whole engine loop (engine.step)",
    )
    ap.add_argument("--loop-context", type=int, default=1024)
    ap.add_argument("--loop-steps", type=int, default=50)
    ap.add_argument(
        "--loop-async", nargs="+", choices=list(ASYNC_MODES), default=["off", "scheduling"]
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--workload",
        choices=["w1", "w4"],
        default="w1",
        help="offline: w1 = nano-vllm's (--num-requests, lengths uniform in [--min-len, "
        "--max-len]); w4 = ShareGPT-shaped lognormal lengths (bench/workloads.py; use "
        "--num-requests 1000)",
    )
    ap.add_argument(
        "--max-num-seqs", type=int, default=None, help="offline: default the engine's own"
    )
    ap.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="offline: default the engine's"
    )
    ap.add_argument(
        "--max-cuda-graph-batch", type=int, default=None, help="offline: default the engine's"
    )
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hf-modes", nargs="*", default=["generate", "generate_batch"])
    ap.add_argument(
        "--async",
        dest="async_modes",
        nargs="+",
        choices=list(ASYNC_MODES),
        default=["auto"],
        help="offline: one Tandem run per mode (off, outputs: async output processing, scheduling: "
        "async scheduling too, auto: the engine's default); ratios against the first",
    )
    ap.add_argument(
        "--models-dir", type=Path, default=None, help="where shape directories are written"
    )
    ap.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="offline: ranks (GPUs) the Tandem engine is split over",
    )
    ap.add_argument(
        "--untimed",
        action="store_true",
        help="offline: after each mode's run, one more without per-step timing (its cost)",
    )
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.shapes is None:
        args.shapes = (
            ["llama-3.2-1b", "llama-3.1-8b"]
            if args.section == "micro"
            else ["qwen3-0.6b", "llama-3.2-1b"]
        )
    device = torch.device(args.device)
    out = args.models_dir or Path(tempfile.gettempdir()) / "tandem-bench-models"
    payload = micro(args, device, out) if args.section == "micro" else offline(args, device, out)
    payload.update(
        device=device_name(args.device), section=args.section, command=" ".join(sys.argv)
    )
    path = write_result(f"engine-{args.section}", args.device, payload, args.out_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
