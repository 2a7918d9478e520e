"""Where a step's time goes: torch.profiler over the runner's decode and prefill steps.

    python bench/profile_engine.py --device cuda --shape llama-3.2-1b --batch 1 --context 1024 \
--prefill 1024

Prints the top kernels by device time and the top operators by host time for each step kind.
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import synthetic_step  # noqa: E402
from shapes import shape_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    from tandem.engine.config import EngineConfig
    from tandem.engine.llm_engine import LLMEngine

    model = shape_dir(args.shape, Path(tempfile.gettempdir()) / "tandem-bench-models")
    engine = LLMEngine(
        EngineConfig(
            model=str(model),
            device=args.device,
            load_format="dummy",
            max_num_seqs=max(args.batch, 8),
            max_num_batched_tokens=max(args.prefill, 8192),
            max_model_len=max(args.context, args.prefill) + 64,
            enable_prefix_caching=False,
        )
    )
    rng = random.Random(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for label, steps in (
        ("decode", synthetic_step(engine, args.batch, args.context, 1, rng)),
        ("prefill", synthetic_step(engine, 1, 0, args.prefill, rng)),
    ):
        for _ in range(3):
            engine.runner.execute(steps)
        with profile(activities=activities) as prof:
            for _ in range(5):
                engine.runner.execute(steps)
        print(f"==== {label} (5 steps) ====")
        key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60
            )
        )


if __name__ == "__main__":
    main()
