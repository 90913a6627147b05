"""Training-step time of candidate timm classifiers at the demo's size, measured side by side.

    python benchmarks/classifier_speed.py [--size 32] [--batch 32] [--reps 7]

Interleaves the architectures rep by rep (so a busy machine slows them alike) and prints the median
milliseconds per optimizer step and the ratio to resnet18. Used to choose `configs/demo.yaml`'s arch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

ARCHS = ["test_resnet", "resnet10t", "resnet18", "mobilenetv3_small_050"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randint(0, 4, (args.batch,))
    models = {a: timm.create_model(a, num_classes=4, in_chans=1) for a in ARCHS}
    opts = {a: torch.optim.AdamW(m.parameters()) for a, m in models.items()}
    times: dict[str, list[float]] = {a: [] for a in ARCHS}
    for _ in range(args.reps + 1):  # the first rep warms up and is dropped
        for a in ARCHS:
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(models[a](x), y)
            opts[a].zero_grad()
            loss.backward()
            opts[a].step()
            times[a].append(time.perf_counter() - start)
    base = statistics.median(times["resnet18"][1:])
    rows = []
    for a in ARCHS:
        med = statistics.median(times[a][1:])
        params = sum(p.numel() for p in models[a].parameters()) / 1e6
        rows.append({"arch": a, "params_m": round(params, 2), "ms_per_step": round(med * 1000, 1),
                     "ratio_to_resnet18": round(med / base, 2)})
        print(f"{a:24s} {params:6.2f}M {med * 1000:8.1f} ms/step  ratio to resnet18 {med / base:.2f}")
    out = Path(__file__).parent / "results" / "classifier_speed.json"
    out.write_text(json.dumps({"size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
