"""Scale of the diagnosis: 200,000 embeddings of width 512 over 10 classes, time and memory.

Synthetic embeddings (each class a mixture of a few Gaussian sub-groups, one planted weak slice) and
simulated predictions go through `vision_si.diagnose.diagnose` with the default config. The run is
timed without instrumentation, then repeated under tracemalloc to measure the memory the diagnosis
allocates on top of its inputs; peak RSS of the process is read from getrusage. The machine's load
average is recorded too: on a shared 2-core machine other processes can slow the run many times.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/diagnose_scale.py [--n 200000] [--width 512]

Writes benchmarks/results/diagnose_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

from vision_si.config import DiagnoseConfig
from vision_si.data.arrays import LabelledImages
from vision_si.diagnose import diagnose

RESULTS = Path(__file__).resolve().parent / "results"


def make_data(n: int, width: int, k: int, val_fraction: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    sub = rng.integers(0, 3, n)  # three sub-groups per class
    centres = rng.standard_normal((k, width)).astype(np.float32) * 2
    offsets = rng.standard_normal((k, 3, width)).astype(np.float32)
    x = np.empty((n, width), dtype=np.float32)
    for s in range(0, n, 20_000):  # fill in blocks so the generator itself stays small
        e = slice(s, s + 20_000)
        x[e] = centres[y[e]] + offsets[y[e], sub[e]] + rng.standard_normal((y[e].size, width), dtype=np.float32)
    weak = (y == 0) & (sub == 2) & (rng.random(n) < 0.3)  # a rare, failing sub-group of class 0
    x[weak] += rng.standard_normal(width).astype(np.float32) * 2
    wrong = rng.random(n) < np.where(weak, 0.6, 0.05)
    pred = np.where(wrong, (y + rng.integers(1, k, n)) % k, y)
    probs = rng.dirichlet(np.ones(k), n).astype(np.float32) * 0.4
    probs[np.arange(n), pred] += 0.6
    # the val images come first, so splitting is a view and the inputs exist once in memory
    n_val = int(round(val_fraction * n))
    ids = np.array([f"e{i:07d}" for i in range(n)], dtype=object)
    return {"x": x, "y": y, "probs": probs, "n_val": n_val, "ids": ids, "weak": weak}


def run_once(d: dict, classes: list[str], cfg: DiagnoseConfig):
    v, t = slice(0, d["n_val"]), slice(d["n_val"], None)
    val, train = (LabelledImages.of_labels(d["y"][s], d["ids"][s]) for s in (v, t))  # outputs only, no pixels
    return diagnose(cfg, classes=classes, val=val, val_probs=d["probs"][v], val_embeddings=d["x"][v], train=train,
                    train_embeddings=d["x"][t], seed=0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "diagnose_scale.json"))
    args = ap.parse_args(argv)

    classes = [f"class{i}" for i in range(args.classes)]
    t0 = time.perf_counter()
    d = make_data(args.n, args.width, args.classes, args.val_fraction, seed=0)
    gen_s = time.perf_counter() - t0
    inputs_mb = (d["x"].nbytes + d["probs"].nbytes) / 2**20
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = DiagnoseConfig()
    times, diag = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        diag = run_once(d, classes, cfg)
        times.append(time.perf_counter() - t)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    run_once(d, classes, cfg)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    n_val = d["n_val"]
    weak_ids = {s.slice_id for s in diag.weak_slices}
    flagged = np.isin(diag.members["slice_id"][:n_val], list(weak_ids))
    truth = d["weak"][:n_val]
    result = {
        "n_embeddings": args.n, "width": args.width, "classes": args.classes,
        "n_val": n_val, "n_train": args.n - n_val,
        "seconds": {"median": float(np.median(times)), "runs": times, "by_step_last_run": diag.timings_s},
        "under_60_s": bool(np.median(times) < 60),
        "memory_mb": {"inputs": inputs_mb, "peak_rss_before_diagnosis": rss_before,
                      "peak_rss_after_diagnosis": rss_after,
                      "diagnosis_allocations_peak_tracemalloc": traced_peak / 2**20},
        "weak_slices_found": len(weak_ids),
        "planted_slice_val_precision": float((flagged & truth).sum() / max(1, flagged.sum())),
        "planted_slice_val_recall": float((flagged & truth).sum() / max(1, truth.sum())),
        "data_generation_s": gen_s,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count(), "load_average_1_5_15_min_at_end": list(os.getloadavg())},
        "config": cfg.__dict__,
    }
    print(f"diagnose: {args.n} x {args.width} over {args.classes} classes: median {result['seconds']['median']:.1f} s "
          f"({', '.join(f'{x:.1f}' for x in times)}); steps {', '.join(f'{k} {x:.1f}s' for k, x in diag.timings_s.items())}")
    print(f"memory: inputs {inputs_mb:.0f} MB, peak RSS {rss_before:.0f} MB before / {rss_after:.0f} MB after, "
          f"diagnosis allocations peak {traced_peak / 2**20:.0f} MB (tracemalloc)")
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs (other processes slow every figure above)")
    print(f"planted slice: {len(weak_ids)} weak slice(s), val precision {result['planted_slice_val_precision']:.2f}, "
          f"recall {result['planted_slice_val_recall']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
