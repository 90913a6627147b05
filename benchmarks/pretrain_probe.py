"""Does self-supervised pretraining on ELPV's own training images give features a linear model can use?

Pretrains the encoder of `vision_si.pretrain` on ELPV's train split (the run's split code:
`make_splits` with the demo config's split and seed; never val or test), then fits a linear probe
(scikit-learn `LogisticRegression`, classes balanced) on the frozen, L2-normalised embeddings of
train and scores it on val: macro-F1 and accuracy. The same probe on the same architecture with its
random initial weights is the reference an encoder has to beat.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/pretrain_probe.py --size 64 --epochs 30 --arch resnet10t
    .venv/bin/python benchmarks/pretrain_probe.py --epochs 0.05 --out /tmp/probe.json   # smoke

The encoder lands in `--cache-dir` (default: the pretrain cache), so a second call with the same
arguments only probes; `cache_hit` in the result says which happened (minutes then exclude training).
Writes `benchmarks/results/pretrain_probe.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from vision_si.classifier.model import _build, normalisation
from vision_si.config import load_config
from vision_si.data import load_images, load_source, make_splits, run_channels
from vision_si.pretrain import Encoder, run_pretrain

RESULTS = Path(__file__).resolve().parent / "results"


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int) -> dict:
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=3000, class_weight="balanced", random_state=seed)
    clf.fit(scaler.transform(train_x), train_y)
    pred = clf.predict(scaler.transform(val_x))
    return {"val_macro_f1": float(f1_score(val_y, pred, average="macro")),
            "val_accuracy": float(accuracy_score(val_y, pred))}


def random_encoder(arch: str, model_kwargs: dict, channels: int, size: int, seed: int) -> Encoder:
    torch.manual_seed(seed)
    model, kwargs = _build(arch, {"num_classes": 0, "in_chans": channels, **model_kwargs}, size, pretrained=False)
    mean, std = normalisation(model, channels)
    meta = {"in_chans": channels, "image_size": size, "mean": mean, "std": std, "create_kwargs": kwargs}
    return Encoder(model=model.eval(), meta=meta, path=Path("."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (data.image_size)")
    ap.add_argument("--epochs", type=float, default=30.0, help="passes over the pretraining images")
    ap.add_argument("--arch", default="resnet10t", help="timm architecture of the backbone")
    ap.add_argument("--model-kwargs", default="{}", help='JSON, e.g. \'{"channels": [16, 32, 64, 128]}\'')
    ap.add_argument("--method", default="simclr", choices=["simclr", "vicreg"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: pretrain.lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="default: pretrain.cache_dir")
    ap.add_argument("--out", type=Path, default=RESULTS / "pretrain_probe.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    sets = [f"seed={args.seed}", f"data.image_size={args.size}", f"classifier.arch={args.arch}",
            f"classifier.model_kwargs={args.model_kwargs}", "classifier.device=cpu", "pretrain.enabled=true",
            f"pretrain.method={args.method}", f"pretrain.epochs={args.epochs}", f"pretrain.batch_size={args.batch_size}"]
    sets += [f"pretrain.lr={args.lr}"] if args.lr is not None else []
    sets += [f"pretrain.cache_dir={args.cache_dir}"] if args.cache_dir else []
    cfg = load_config("configs/demo.yaml", sets)
    table = load_source(cfg.data, cfg.seed, progress=False)
    split_seed = cfg.seed if cfg.data.split.seed is None else cfg.data.split.seed
    splits = make_splits(table, cfg.data.split, split_seed)
    channels = run_channels(table, cfg.data)
    rows = {s: np.flatnonzero(splits == s) for s in ("train", "val")}
    x = {s: load_images(table, r, cfg.data) for s, r in rows.items()}
    y = {s: table.labels[r] for s, r in rows.items()}

    t_pre = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        enc = run_pretrain(cfg, table, splits, channels=channels, out_dir=Path(out_dir), train_images=x["train"],
                           progress=True, echo=print)
    pretrain_minutes = (time.perf_counter() - t_pre) / 60
    emb = {s: enc.embed(v) for s, v in x.items()}
    result = probe(emb["train"], y["train"], emb["val"], y["val"], args.seed)
    rand = random_encoder(args.arch, json.loads(args.model_kwargs), channels, args.size, args.seed)
    rand_emb = {s: rand.embed(v) for s, v in x.items()}
    baseline = probe(rand_emb["train"], y["train"], rand_emb["val"], y["val"], args.seed)

    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pretrained": result, "random_init": baseline,
        "gain": {k: result[k] - baseline[k] for k in result},
        "minutes": {"pretrain": pretrain_minutes, "total": (time.perf_counter() - t0) / 60},
        "cache_hit": enc.cache_hit, "encoder": str(enc.path), "steps": enc.meta["steps"],
        "n_inputs": enc.meta["n_inputs"], "n_val": int(len(rows["val"])), "embedding_dim": enc.dim,
        "final_loss": float(np.mean(enc.meta["losses"][-10:])), "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: out[k] for k in ("pretrained", "random_init", "gain", "minutes", "cache_hit")}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
