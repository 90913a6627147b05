"""Torch CPU training on a shared machine: step time alone and beside a competing job, by thread count and
OpenMP wait policy.

    python benchmarks/threads.py [--arch resnet10t] [--size 64] [--batch 32] [--steps 30] [--reps 5]

Each measurement is a fresh subprocess that trains `--steps` optimizer steps of a timm classifier and
reports the median seconds per step (after 5 warm-up steps). Settings: torch threads 1 or all cores,
with GNU OpenMP's default wait policy (idle threads spin before sleeping) or `OMP_WAIT_POLICY=PASSIVE`
(what `import vision_si` sets unless the user set it). Each runs alone and beside a competing job
(the same training, all cores, default policy, in an endless loop: another user's torch job). Settings
are interleaved rep by rep so drifting load hits them alike; medians over reps are printed with the
ratio busy/alone, and written to results/threads.json.

Why: torch's CPU kernels run on GNU OpenMP. With as many threads as cores and another job on the
machine, a thread that reaches a barrier spins on a core the other threads of its team need; each
parallel region then waits for a descheduled thread. Passive waiting gives the core back.
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

POLICIES = ("default", "passive")


def _env(threads: int, policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def measure(args: argparse.Namespace, threads: int, policy: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKER, args.arch, str(args.size), str(args.batch), str(args.steps),
                          str(threads)], capture_output=True, text=True, check=True, env=_env(threads, policy))
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    settings = [(t, p) for t in sorted({1, cores}) for p in POLICIES]
    times: dict[str, list[float]] = {f"{cond} {t} {p}": [] for cond in ("alone", "busy") for t, p in settings}
    for rep in range(args.reps):
        for cond in ("alone", "busy"):
            hog = None
            if cond == "busy":  # another user's job on the same cores: the same loop, all cores, until stopped
                hog = subprocess.Popen([sys.executable, "-c", WORKER, args.arch, str(args.size), str(args.batch), "-1",
                                        str(cores)], env=_env(cores, "default"), stdout=subprocess.DEVNULL)
                time.sleep(3)  # let it start
            try:
                for t, p in settings:
                    times[f"{cond} {t} {p}"].append(measure(args, t, p))
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items()),
              flush=True)
    rows = []
    for t, p in settings:
        alone, busy = (statistics.median(times[f"{c} {t} {p}"]) for c in ("alone", "busy"))
        rows.append({"threads": t, "wait_policy": p, "alone_ms_per_step": round(alone * 1000, 1),
                     "busy_ms_per_step": round(busy * 1000, 1), "busy_over_alone": round(busy / alone, 2)})
        print(f"{t} thread(s), {p:7s}: alone {alone * 1000:7.1f} ms/step, beside a competing job "
              f"{busy * 1000:7.1f} ms/step ({busy / alone:.2f}x), medians of {args.reps}")
    default = next(r for r in rows if r["threads"] == cores and r["wait_policy"] == "passive")
    out = Path(__file__).parent / "results" / "threads.json"
    out.write_text(json.dumps({"arch": args.arch, "size": args.size, "batch": args.batch, "steps": args.steps,
                               "reps": args.reps, "cores": cores, "rows": rows,
                               "vision_si_default": {"threads": cores, "wait_policy": "passive",
                                                     "alone_ms_per_step": default["alone_ms_per_step"],
                                                     "beside_competing_job_ms_per_step": default["busy_ms_per_step"]}},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
