"""Torch CPU threads on a shared machine: step time with 1 thread vs all cores, alone and beside another job.

    python benchmarks/threads.py [--arch resnet10t] [--size 32] [--batch 32] [--steps 40] [--reps 3]

Each measurement is a fresh subprocess that trains `--steps` optimizer steps of the demo's
classifier and reports the median seconds per step (after 5 warm-up steps). It runs with
`torch.set_num_threads(t)` for t in {1, all cores}, once alone and once while a competing process
(the same training loop, all cores, in an endless loop) keeps the machine busy. The settings are
interleaved rep by rep so that drifting load hits them alike; medians over reps are printed with the
ratio to 1 thread, and written to results/threads.json. This is the evidence behind the
`threads` setting of a run config (`threads: 1` on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import statistics, sys, time
import timm, torch
arch, size, batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
model = timm.create_model(arch, num_classes=4, in_chans=1)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(batch, 1, size, size), torch.randint(0, 4, (batch,))
times = []
i = 0
while steps < 0 or i < steps + 5:
    t = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
    i += 1
print(statistics.median(times[5:]))
"""


def measure(args: argparse.Namespace, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, args.arch, str(args.size), str(args.batch), str(args.steps),
                          str(threads)], capture_output=True, text=True, check=True, env=_env(threads))
    return float(out.stdout.strip())


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    settings = sorted({1, cores})
    times: dict[str, list[float]] = {f"{cond} {t}": [] for cond in ("alone", "busy") for t in settings}
    for rep in range(args.reps):
        for cond in ("alone", "busy"):
            hog = None
            if cond == "busy":  # another job on the same cores: the same loop, all cores, until stopped
                hog = subprocess.Popen([sys.executable, "-c", WORKER, args.arch, str(args.size), str(args.batch), "-1",
                                        str(cores)], env=_env(cores), stdout=subprocess.DEVNULL)
                time.sleep(3)  # let it start spinning
            try:
                for t in settings:
                    times[f"{cond} {t}"].append(measure(args, t))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} thread(s) {v[-1] * 1000:.0f} ms" for k, v in times.items()),
              flush=True)
    rows = []
    for cond in ("alone", "busy"):
        one = statistics.median(times[f"{cond} 1"])
        for t in settings:
            med = statistics.median(times[f"{cond} {t}"])
            rows.append({"condition": cond, "threads": t, "ms_per_step": round(med * 1000, 1),
                         "ratio_to_1_thread": round(med / one, 2)})
            print(f"{cond:6s} {t} thread(s): {med * 1000:7.1f} ms/step (median of {args.reps}), "
                  f"ratio to 1 thread {med / one:.2f}")
    out = Path(__file__).parent / "results" / "threads.json"
    out.write_text(json.dumps({"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps,
                               "reps": args.reps, "cores": cores, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
