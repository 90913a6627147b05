"""Generation performance on this machine, and the quick preset trained on ELPV.

    python benchmarks/generation.py            # throughput: sampling at 32/64 px, FLOP rate, training steps/s
    python benchmarks/generation.py --elpv     # also: train `quick` on ELPV's train split (cached), time a
                                               # 200-image round, write a sample grid per class

Sampling throughput is measured with the `quick` UNet shape at 32 and 64 px and the best of a few
batch sizes; the UNet's FLOPs per forward come from `torch.utils.flop_counter.FlopCounterMode`, so
achieved GFLOP/s = FLOPs per image × images/s (FLOPs of direct convolution: oneDNN's Winograd
kernels can beat that count, so a ratio above 1 is possible). The reference is this machine's fp32
matrix multiply (square `torch.mm`, best size) measured in the same run, before and after. Every
figure is the fastest of a few repeats: the machine is shared, and the fastest run is the least
disturbed; the load average at start and end is recorded.
Writes `benchmarks/results/generation.json` and `generation.md` (and `ddpm_quick_samples.png` with
`--elpv`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vision_si.config import DataConfig, GenerateConfig, SplitConfig  # noqa: E402
from vision_si.generators import GenerationRequest, load_preset  # noqa: E402
from vision_si.generators.ddpm import build_unet  # noqa: E402
from vision_si.generators.pipeline import ClassConditionalPipeline, make_scheduler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def best_time(fn, repeats: int, warmup=None) -> float:
    """Fastest of `repeats` runs: on a shared machine the least disturbed one (as `timeit` advises)."""
    (warmup or fn)()  # warm-up (allocator, oneDNN primitive caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_gflops(repeats: int) -> dict:
    best = {}
    for n in (256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = best_time(lambda a=a, b=b: torch.mm(a, b), repeats)
        rate = 2 * n**3 / t / 1e9
        if not best or rate > best["gflops"]:
            best = {"n": n, "gflops": rate}
    return best


def unet_flops(unet, batch: int, res: int, channels: int) -> float:
    x = torch.randn(batch, channels, res, res)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500), class_labels=torch.zeros(batch, dtype=torch.long))
    return counter.get_total_flops() / batch


def sampling(res: int, unet_cfg: dict, steps: int, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    """Images/s of the class-conditional pipeline over batch sizes; then channels_last at the best size."""
    torch.manual_seed(0)
    unet = build_unet(4, 1, res, unet_cfg).eval()
    pipe = ClassConditionalPipeline(unet, make_scheduler("dpmsolver++", {"num_train_timesteps": 1000,
                                                                          "beta_schedule": "squaredcos_cap_v2",
                                                                          "prediction_type": "v_prediction"}))
    pipe.set_progress_bar_config(disable=True)
    flops_per_forward = unet_flops(unet, 2, res, 1)
    flops_per_image = 2 * steps * flops_per_forward  # classifier-free guidance: two UNet passes per step

    def measure(bs: int, channels_last: bool) -> dict:
        unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        labels = np.arange(bs) % 4

        def run(n_steps=steps):
            gens = [torch.Generator().manual_seed(k) for k in range(bs)]
            pipe(labels, generator=gens, num_inference_steps=n_steps, guidance_scale=2.0)

        t = best_time(run, repeats, warmup=lambda: run(2))
        return {"batch_size": bs, "channels_last": channels_last, "seconds_per_batch": t, "images_per_s": bs / t,
                "gflops": flops_per_image * bs / t / 1e9}

    rows = [measure(bs, False) for bs in batch_sizes]
    best = max(rows, key=lambda r: r["images_per_s"])
    rows.append(measure(best["batch_size"], True))
    best = max(rows, key=lambda r: r["images_per_s"])
    return {"resolution": res, "steps": steps, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "gflop_per_unet_forward": flops_per_forward / 1e9, "by_batch": rows, "best": best}


def training_rate(preset: dict, rounds: int = 5, steps_per_round: int = 8) -> dict:
    """Seconds per optimizer step of the preset's UNet and batch (fastest round, so load spikes drop out)."""
    from vision_si.generators.ddpm import TRAIN_DEFAULTS, denoising_loss, noise_schedule

    train = {**TRAIN_DEFAULTS, **preset["train"]}
    sched = noise_schedule(train)
    torch.manual_seed(0)
    unet = build_unet(4, 1, preset["resolution"], preset["unet"])
    opt = torch.optim.AdamW(unet.parameters(), lr=train["lr"])
    bs, res = int(train["batch_size"]), preset["resolution"]
    x, y = torch.rand(bs, 1, res, res) * 2 - 1, torch.randint(0, 4, (bs,))
    gen = torch.Generator().manual_seed(0)
    per_round = []
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        for _ in range(steps_per_round):
            loss = denoising_loss(unet, sched, x, y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if r:  # round 0 warms up
            per_round.append((time.perf_counter() - t0) / steps_per_round)
    per_step = min(per_round)
    return {"rounds": [round(v, 4) for v in per_round], "batch_size": bs, "seconds_per_step": per_step,
            "steps_per_s": 1 / per_step, "preset_steps": train["steps"],
            "projected_train_minutes": train["steps"] * per_step / 60}


def elpv_quick(n_images: int, progress: bool) -> dict:
    """Train `quick` on ELPV's train split (as a run with seed 0 splits it), time a round, draw a grid."""
    from vision_si.data import load_images, load_source, make_splits
    from vision_si.data.arrays import LabelledImages
    from vision_si.generators.runner import read_manifest, run_generation

    data_cfg = DataConfig(source="elpv", image_size=32, split=SplitConfig())
    table = load_source(data_cfg, 0, progress=progress)
    splits = make_splits(table, data_cfg.split, 0)
    idx = np.flatnonzero(splits == "train")
    images, labels, ids = load_images(table, idx, data_cfg, progress=progress), table.labels[idx], [table.ids[i] for i in idx]
    classes = list(table.classes)
    cfg = GenerateConfig(preset="quick", batch_size=64, cache_dir=str(ROOT / ".cache/vision_si/generators"))
    rng = np.random.default_rng(0)
    per_class = n_images // (2 * len(classes))
    requests = []
    for c, name in enumerate(classes):
        members = [ids[i] for i in np.flatnonzero(labels == c)]
        requests.append(GenerationRequest(c, name, f"{name}/class", per_class, mode="class"))
        requests.append(GenerationRequest(c, name, f"{name}/exemplar", per_class, mode="exemplar", strength=0.5,
                                          exemplar_ids=list(rng.choice(members, size=8, replace=False))))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        train = LabelledImages(images, labels, ids, [table.sha256[i] for i in idx])
        res = run_generation(cfg, requests, train=train, classes=classes, out_dir=out, seed=0, id_prefix="syn-bench",
                             progress=progress)
        total = time.perf_counter() - t0
        rows = read_manifest(res.manifest_path)
        gen_seconds = sum(r.seconds for r in rows)
        from vision_si.generators.runner import fit_generator

        gen, _ = fit_generator(cfg, train, classes, seed=0, progress=False)
        grid_path = RESULTS / "ddpm_quick_samples.png"
        write_grid(gen, images, labels, ids, classes, rows, Path(out), grid_path)
    return {"train_images": int(len(idx)), "class_counts": np.bincount(labels, minlength=len(classes)).tolist(),
            "classes": classes, "cache_hit": res.cache_hit, "train_seconds": float(gen.train_seconds_),
            "train_steps": int(load_preset("quick")["train"]["steps"]),
            "final_loss_mean_last_50": float(np.mean(gen.loss_history_[-50:])),
            "images": len(rows), "generate_seconds": gen_seconds, "images_per_s": len(rows) / gen_seconds,
            "round_seconds_incl_training_or_cache": total, "grid": str(grid_path.relative_to(ROOT))}


def write_grid(gen, images, labels, ids, classes, rows, out_dir: Path, path: Path) -> None:
    """Per class: 6 real training images | 6 class-mode samples | 4 (exemplar → strength-0.5 variation) pairs."""
    from PIL import Image

    pos = {i: k for k, i in enumerate(ids)}
    tile, gap = 32, 4
    cols = 6 + 6 + 8
    canvas = np.ones((len(classes) * (tile + gap), cols * tile + 3 * gap), np.float32)
    for c, _ in enumerate(classes):
        real = images[np.flatnonzero(labels == c)[:6], 0]
        cls_rows = [r for r in rows if r.class_index == c and r.mode == "class"][:6]
        ex_rows = [r for r in rows if r.class_index == c and r.mode == "exemplar"][:4]
        load = lambda r: np.asarray(Image.open(out_dir / r.path), np.float32) / 255  # noqa: E731
        tiles = list(real) + [load(r) for r in cls_rows]
        for r in ex_rows:
            tiles += [images[pos[r.exemplar_ids[0]], 0], load(r)]
        y = c * (tile + gap)
        for k, t in enumerate(tiles):
            x = k * tile + gap * (k >= 6) + gap * (k >= 12)
            canvas[y:y + tile, x:x + tile] = t
    big = np.kron(canvas, np.ones((2, 2), np.float32))
    Image.fromarray((big * 255).round().astype(np.uint8), "L").save(path, optimize=True)


def write_markdown(res: dict, path: Path) -> None:
    mm = res["matmul"]
    runs = ", ".join(f"{r['gflops']:.1f}" for r in res["matmul_runs"])
    lines = ["# Generation benchmark", "",
             f"Machine: {res['machine']['cpu_count']} CPU threads used ({res['machine']['torch_threads']}), "
             f"torch {res['machine']['torch']}, load average (1/5/15 min) at start {res['machine']['loadavg']}, "
             f"at end {res['machine']['loadavg_end']}. Figures are the fastest of a few repeats. "
             f"Command: `{res['command']}`.", "",
             f"fp32 matrix multiply (torch.mm, n={mm['n']}): **{mm['gflops']:.1f} GFLOP/s** (the better of a run "
             f"before and after the sampling runs: "
             f"{runs}; the ratios below use it)", "",
             "## Sampling (quick UNet shape, DPM-Solver++, classifier-free guidance: 2 UNet passes per step)", "",
             "| px | params | GFLOP per UNet pass | steps | batch | channels_last | images/s | GFLOP/s | share of matmul rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in res["sampling"]:
        for b in s["by_batch"]:
            mark = "**" if b is s["best"] or b == s["best"] else ""
            lines.append(f"| {s['resolution']} | {s['params_m']:.2f} M | {s['gflop_per_unet_forward']:.3f} | {s['steps']} | "
                         f"{b['batch_size']} | {b['channels_last']} | {mark}{b['images_per_s']:.1f}{mark} | "
                         f"{b['gflops']:.1f} | {b['gflops'] / mm['gflops']:.2f} |")
    t = res["training"]
    lines += ["", "## Training (quick preset)", "",
              f"{t['steps_per_s']:.2f} steps/s ({t['seconds_per_step']:.3f} s per batch of {t['batch_size']}, fastest "
              f"of rounds {t['rounds']}); the preset's {t['preset_steps']} steps project to "
              f"{t['projected_train_minutes']:.1f} min.", ""]
    if "elpv" in res:
        e = res["elpv"]
        lines += ["## quick preset on ELPV (train split, 32 px)", "",
                  f"- {e['train_images']} training images, per class {dict(zip(e['classes'], e['class_counts'], strict=True))}",
                  f"- training: {e['train_steps']} steps in {e['train_seconds']:.0f} s when it was trained (the "
                  f"cached model; wall time on a shared machine, see the steps/s above for this run's rate) "
                  f"(mean loss of the last 50 steps {e['final_loss_mean_last_50']:.4f}); cache hit this run: "
                  f"{e['cache_hit']}",
                  f"- a round of {e['images']} images (half class mode, half exemplar mode at strength 0.5): "
                  f"{e['generate_seconds']:.1f} s, {e['images_per_s']:.1f} images/s",
                  f"- samples: `{e['grid']}` (per class: 6 real | 6 class-mode | 4 exemplar → variation pairs)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elpv", action="store_true", help="also train quick on ELPV and draw the sample grid")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    quick = load_preset("quick")
    steps = quick["sample"]["steps"]
    res = {"command": "python benchmarks/generation.py" + (" --elpv" if args.elpv else ""),
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "platform": platform.platform(), "loadavg": [round(v, 2) for v in os.getloadavg()]}}
    res["matmul"] = matmul_gflops(max(5, args.repeats * 3))
    print(f"matmul: {res['matmul']['gflops']:.1f} GFLOP/s (n={res['matmul']['n']})", flush=True)
    res["sampling"] = []
    for res_px, batch_sizes in ((32, (16, 64, 128)), (64, (8, 32))):
        s = sampling(res_px, quick["unet"], steps, batch_sizes, args.repeats)
        res["sampling"].append(s)
        for r in s["by_batch"]:
            print(f"sampling {res_px}px batch {r['batch_size']} channels_last={r['channels_last']}: "
                  f"{r['images_per_s']:.1f} img/s, {r['gflops']:.1f} GFLOP/s = "
                  f"{r['gflops'] / res['matmul']['gflops']:.2f} of matmul", flush=True)
    after = matmul_gflops(max(5, args.repeats * 3))
    print(f"matmul again: {after['gflops']:.1f} GFLOP/s (n={after['n']})", flush=True)
    # the machine is shared: the reference is the better of the two matmul runs, a conservative ratio
    res["matmul_runs"] = [res["matmul"], after]
    res["matmul"] = max(res["matmul_runs"], key=lambda r: r["gflops"])
    res["training"] = training_rate(quick)
    print(f"training quick: {res['training']['steps_per_s']:.2f} steps/s, projected "
          f"{res['training']['projected_train_minutes']:.1f} min", flush=True)
    if args.elpv:
        res["elpv"] = elpv_quick(200, progress=not args.quiet)
        print(json.dumps(res["elpv"], indent=1), flush=True)
    res["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generation.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    write_markdown(res, RESULTS / "generation.md")
    print(f"wrote {RESULTS / 'generation.json'} and generation.md")


if __name__ == "__main__":
    main()
