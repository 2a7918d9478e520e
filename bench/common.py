"""Helpers shared by the benchmarks: result files and table printing."""

import datetime as _dt
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def write_result(workload: str, device: str, payload: dict, out_dir: Path | None = None) -> Path:
    """Write ``payload`` as JSON under bench/results/<date>_<device>_<workload>.json."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.date.today().isoformat()
    path = out_dir / f"{stamp}_{device_name(device)}_{workload}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
