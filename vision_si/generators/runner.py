"""Generation jobs: requests → PNG files + `manifest.jsonl`, resumable, and plan files for batch jobs.

`run_generation` fits (or loads from the cache) the preset's generator on the real training split,
expands the requests into image ids `{id_prefix}-{k:06d}` (k runs over all requests in order),
seeds image k with `image_seed(seed, id)` through its own `torch.Generator`, and writes
`out_dir/images/<id>.png` (8-bit; grayscale stays `L`) atomically, appending one `ManifestRow` per
image to `out_dir/manifest.jsonl` (flushed and fsync'd). Exemplar-mode images cycle through their
request's `exemplar_ids`.

Batches are fixed by the plan, not by what happens to be pending: each request is cut into chunks
of `batch_size` images, and a row records its chunk (`batch_id`, the chunk's first id). Per-image
generators make an image's noise independent of its neighbours, but CPU kernels (oneDNN
convolutions, GEMM) round differently for different batch shapes, so the same image computed in
another batch can differ by one 8-bit level in a few pixels; computing it in the same chunk again
gives the same bytes. Run again on the same folder, the job keeps every image whose file matches
its manifest row (sha256 and generation parameters) and recomputes the chunks that hold a missing,
corrupt or stale image, so a killed job resumes and repairs itself; the manifest never holds an id
twice. `regenerate(row, generator, rows=...)` re-creates an image from the manifest.

Plan files (`vsi generate --plan`) are `vision_si.generators.plan`; the Ray engine is
`vision_si.generators.ray_engine` (`engine_generate_fn(cfg)` gives the `generate_fn` for
`cfg.engine`). This module imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vision_si.config import GenerateConfig, resolve_path
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError, DataError
from vision_si.generators.base import GenerationRequest, Generator, ManifestRow, create_generator, image_seed
from vision_si.generators.presets import generator_kwargs, resolve_preset
from vision_si.rundir import atomic_write_bytes, atomic_write_text


@dataclass
class ImageJob:
    """One image to make: the expansion of a request, before any pixel exists."""

    id: str
    class_index: int
    class_name: str
    slice_id: str
    mode: str
    strength: float | None
    exemplar_id: str | None
    seed: int
    batch_id: str  # id of the first image of its chunk; images are always computed with their chunk


GenerateFn = Callable[..., Iterator[tuple[ImageJob, np.ndarray, float]]]  # see `run_generation`


@dataclass
class GenerationResult:
    rows: list[ManifestRow]  # one per requested image, in id order
    manifest_path: Path
    generator_sha256: str
    n_generated: int  # made in this call
    n_reused: int  # already on disk and valid
    cache_hit: bool  # the generator came from the cache
    seconds: float


def plan_jobs(requests: Sequence[GenerationRequest], *, seed: int, id_prefix: str,
              batch_size: int) -> list[ImageJob]:
    """Requests → image jobs with ids, per-image seeds, exemplars (cycled) and chunks, in a fixed order."""
    if batch_size < 1:
        raise ConfigError(f"generate.batch_size must be >= 1, got {batch_size}")
    jobs, k = [], 0
    for req in requests:
        for j in range(req.count):
            image_id = f"{id_prefix}-{k:06d}"
            exemplar = req.exemplar_ids[j % len(req.exemplar_ids)] if req.mode == "exemplar" else None
            jobs.append(ImageJob(id=image_id, class_index=req.class_index, class_name=req.class_name,
                                 slice_id=req.slice_id, mode=req.mode,
                                 strength=float(req.strength) if req.mode == "exemplar" else None,
                                 exemplar_id=exemplar, seed=image_seed(seed, image_id),
                                 batch_id=f"{id_prefix}-{k - j % batch_size:06d}"))
            k += 1
    return jobs


def chunks(jobs: Sequence[ImageJob]) -> list[list[ImageJob]]:
    """The jobs grouped by `batch_id`, in order: the unit of computation."""
    out: dict[str, list[ImageJob]] = {}
    for job in jobs:
        out.setdefault(job.batch_id, []).append(job)
    return list(out.values())


def fit_generator(cfg: GenerateConfig, train: LabelledImages, classes: list[str], *, seed: int,
                  progress: bool = True) -> tuple[Generator, dict[str, Any]]:
    """The preset's generator fitted on the training split (or loaded from `cfg.cache_dir`), and the preset.

    It trains with `cfg.train_seed`, or the run's `seed` when that is None.
    """
    preset = resolve_preset(cfg)
    gen = create_generator(preset["backend"], **generator_kwargs(preset))
    cache = resolve_path(cfg.cache_dir) if cfg.cache_dir else None
    train_seed = seed if cfg.train_seed is None else cfg.train_seed
    gen.fit(train.images, train.labels, classes, seed=train_seed, cache_dir=cache, progress=progress)
    return gen, preset


# ---------------------------------------------------------------------- files


def png_bytes(image: np.ndarray) -> bytes:
    """C×H×W float in [0, 1] → 8-bit PNG bytes (C=1: mode L, C=3: RGB)."""
    arr = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ValueError(f"expected a C×H×W image with C 1 or 3, got shape {arr.shape}")
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def quantize(image: np.ndarray) -> np.ndarray:
    """What an image looks like after a round trip through its 8-bit PNG."""
    return (np.clip(np.round(np.asarray(image, dtype=np.float64) * 255), 0, 255) / 255).astype(np.float32)


def write_image(out_dir: Path, image_id: str, image: np.ndarray) -> tuple[str, str]:
    """Write `images/<id>.png` atomically; returns (path relative to `out_dir`, sha256 of the bytes)."""
    data = png_bytes(image)
    rel = f"images/{image_id}.png"
    path = Path(out_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return rel, hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Rows of a manifest (the one parser of `manifest.jsonl`); a torn last line (a crash mid-write) is
    ignored, later rows win for an id.

    Every row's `path` must resolve inside the manifest's own folder (symlinks followed), checked
    here, before any image is opened: a row pointing elsewhere (`../../etc/passwd`, an absolute
    path, a link out of the folder) is a `DataError` naming the manifest line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    folder = path.parent.resolve()
    rows: dict[str, ManifestRow] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = ManifestRow.from_dict(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError, RecursionError) as exc:
            if n == len(lines):
                break
            raise DataError(f"{path}:{n}: not a manifest row ({type(exc).__name__}: {exc})") from None
        if not isinstance(row.path, str) or not row.path or not (folder / row.path).resolve().is_relative_to(folder):
            raise DataError(f"{path}:{n}: image path {row.path!r} leaves the generation folder {folder}; "
                            "manifest paths must stay inside it")
        rows.pop(row.id, None)
        rows[row.id] = row
    return list(rows.values())


def load_generated(folder: str | Path, rows: Sequence[ManifestRow], data_cfg: Any, *,
                   channels: int | None = None) -> np.ndarray:
    """The images of manifest `rows` (N×C×H×W float32, as `data.load_image_files`), each file's bytes
    checked against its row's sha256 before they are decoded: an image replaced or damaged on disk
    is a `DataError` naming the file. Every stage that reads generated images back goes through here."""
    from vision_si.data.decode import decode_image
    from vision_si.data.images import stack_images

    folder = Path(folder)
    arrays = []
    for row in rows:
        file = folder / row.path
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DataError(f"{file}: cannot read the generated image of '{row.id}' ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != row.sha256:
            raise DataError(f"{file}: its bytes do not match the sha256 recorded in {folder / 'manifest.jsonl'} "
                            f"for '{row.id}' (the image was replaced or damaged); delete the round's generate "
                            "folder to make its images again")
        arrays.append(decode_image(data, channels if channels is not None else data_cfg.channels,
                                   data_cfg.alpha, name=str(file)))
    return stack_images(arrays, data_cfg, channels)


def write_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    """Replace the manifest atomically with `rows`."""
    atomic_write_text(Path(path), "".join(json.dumps(r.to_dict()) + "\n" for r in rows))


def append_manifest(path: Path, rows: Sequence[ManifestRow]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r.to_dict()) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------- generation


def make_row(job: ImageJob, *, path: str, sha256: str, preset: dict[str, Any], generator: Generator,
             classifier_scale: float, seconds: float) -> ManifestRow:
    return ManifestRow(id=job.id, path=path, sha256=sha256, class_index=job.class_index, class_name=job.class_name,
                       slice=job.slice_id, mode=job.mode, preset=str(preset["name"]),
                       generator_sha256=generator.checkpoint_sha256, seed=job.seed,
                       exemplar_ids=[job.exemplar_id] if job.exemplar_id else [], strength=job.strength,
                       steps=int(generator.steps), guidance=generator.guidance_scale, seconds=round(seconds, 4),
                       backend=str(preset["backend"]),
                       classifier_scale=classifier_scale if job.mode == "guided" else None, batch_id=job.batch_id)


def _same_job(row: ManifestRow, expected: ManifestRow) -> bool:
    keys = ("path", "class_index", "mode", "preset", "backend", "generator_sha256", "seed", "exemplar_ids",
            "strength", "steps", "guidance", "classifier_scale", "batch_id")
    return all(getattr(row, k) == getattr(expected, k) for k in keys)


def generate_chunk(generator: Generator, chunk: Sequence[ImageJob], *, exemplars: Mapping[str, np.ndarray],
                   classifier_fn: Callable[..., Any] | None = None, classifier_scale: float = 0.0,
                   steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
    """The images of one chunk (N×C×H×W in [0, 1]); all its jobs share mode and strength."""
    head = chunk[0]
    init = np.stack([exemplars[j.exemplar_id] for j in chunk]) if head.mode == "exemplar" else None
    return generator.generate_batch(np.array([j.class_index for j in chunk]), [j.seed for j in chunk],
                                    mode=head.mode, exemplars=init, strength=head.strength or 0.0,
                                    classifier_fn=classifier_fn, classifier_scale=classifier_scale, steps=steps,
                                    guidance_scale=guidance_scale)


def generate_jobs(generator: Generator, jobs: Sequence[ImageJob], *, exemplars: Mapping[str, np.ndarray],
                  classifier_fn: Callable[..., Any] | None = None, classifier_scale: float = 0.0,
                  progress: bool = True) -> Iterator[tuple[ImageJob, np.ndarray, float]]:
    """Yield (job, C×H×W image, seconds per image), computing chunk by chunk."""
    groups = chunks(jobs)
    bar = tqdm(total=sum(len(c) for c in groups), desc="generating", disable=not progress)
    for chunk in groups:
        t0 = time.perf_counter()
        images = generate_chunk(generator, chunk, exemplars=exemplars, classifier_fn=classifier_fn,
                                classifier_scale=classifier_scale)
        per_image = (time.perf_counter() - t0) / len(chunk)
        for job, image in zip(chunk, images, strict=True):
            yield job, image, per_image
        bar.update(len(chunk))
    bar.close()


def exemplar_lookup(jobs: Sequence[ImageJob], train: LabelledImages) -> dict[str, np.ndarray]:
    """The training images the jobs use as exemplars, by id; unknown ids raise `DataError`."""
    position = {i: k for k, i in enumerate(train.ids)}
    wanted = sorted({j.exemplar_id for j in jobs if j.exemplar_id is not None})
    missing = [i for i in wanted if i not in position]
    if missing:
        raise DataError(f"exemplar id(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} are not training images; "
                        "exemplars must come from the training split")
    return {i: train.images[position[i]] for i in wanted}


def _generate_here(generator: Generator, preset: dict[str, Any], jobs: Sequence[ImageJob],
                   **kwargs: Any) -> Iterator[tuple[ImageJob, np.ndarray, float]]:
    return generate_jobs(generator, jobs, **kwargs)


def run_generation(cfg: GenerateConfig, requests: Sequence[GenerationRequest], *, train: LabelledImages,
                   classes: list[str], out_dir: str | Path, seed: int, id_prefix: str = "syn-r01",
                   classifier_fn: Callable[..., Any] | None = None, progress: bool = True,
                   generate_fn: GenerateFn | None = None) -> GenerationResult:
    """Make the requested images in `out_dir` (images/ + manifest.jsonl), skipping valid ones already there.

    The generator is fitted on `train` (the real training split), whose ids are the exemplar ids.
    `generate_fn(generator, preset, jobs, *, exemplars, classifier_fn, classifier_scale, progress)`
    computes the pending jobs (whole chunks) and yields (job, C×H×W image, seconds per image); it is
    closed if the job stops early, so a generator function may hold resources. The default computes
    them in this process (`generate_jobs`); for `cfg.engine` 'ray' pass
    `ray_engine.engine_generate_fn(cfg)`. Planning, resume, files and manifest are this function's
    whatever computes the images.
    """
    if generate_fn is None and cfg.engine != "local":
        raise ConfigError(f"generate.engine {cfg.engine!r}: pass its generate_fn "
                          "(vision_si.generators.ray_engine.engine_generate_fn(cfg)), as the loop and plan jobs do")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(requests, seed=seed, id_prefix=id_prefix, batch_size=cfg.batch_size)
    if any(j.mode == "guided" for j in jobs) and classifier_fn is None:
        raise ConfigError("generate.mode 'guided' needs the current classifier (classifier_fn); none was given")
    exemplars = exemplar_lookup(jobs, train)
    generator, preset = fit_generator(cfg, train, classes, seed=seed, progress=progress)

    def expected(job: ImageJob, sha: str = "", seconds: float = 0.0) -> ManifestRow:
        return make_row(job, path=f"images/{job.id}.png", sha256=sha, preset=preset, generator=generator,
                        classifier_scale=cfg.classifier_scale, seconds=seconds)

    manifest = out_dir / "manifest.jsonl"
    job_ids = {j.id for j in jobs}
    old = read_manifest(manifest)
    foreign = [r for r in old if r.id not in job_ids]  # rows of other jobs sharing the folder stay as they are
    by_id = {r.id: r for r in old}
    done: dict[str, ManifestRow] = {}
    for job in jobs:
        row = by_id.get(job.id)
        if row is not None and _same_job(row, expected(job)) and file_sha256(out_dir / row.path) == row.sha256:
            done[job.id] = row
    write_manifest(manifest, foreign + [done[j.id] for j in jobs if j.id in done])
    todo = {j.batch_id for j in jobs if j.id not in done}
    pending = [j for j in jobs if j.batch_id in todo]  # whole chunks, so every image gets its own batch back
    n_reused = len(done)
    n_generated = sum(j.id not in done for j in jobs)
    computed = (generate_fn or _generate_here)(generator, preset, pending, exemplars=exemplars,
                                                classifier_fn=classifier_fn, classifier_scale=cfg.classifier_scale,
                                                progress=progress)
    with contextlib.closing(computed):
        for job, image, seconds in computed:
            if job.id in done:
                continue
            rel, sha = write_image(out_dir, job.id, image)
            row = expected(job, sha, seconds)
            append_manifest(manifest, [row])
            done[job.id] = row
    rows = [done[j.id] for j in jobs]
    write_manifest(manifest, foreign + rows)  # id order, whatever order the repairs happened in
    return GenerationResult(rows=rows, manifest_path=manifest, generator_sha256=generator.checkpoint_sha256,
                            n_generated=n_generated, n_reused=n_reused,
                            cache_hit=bool(getattr(generator, "cache_hit_", False)),
                            seconds=time.perf_counter() - t0)


def job_from_row(row: ManifestRow) -> ImageJob:
    return ImageJob(id=row.id, class_index=row.class_index, class_name=row.class_name, slice_id=row.slice,
                    mode=row.mode, strength=row.strength, exemplar_id=row.exemplar_ids[0] if row.exemplar_ids else None,
                    seed=row.seed, batch_id=row.batch_id or row.id)


def regenerate(row: ManifestRow, generator: Generator, *, rows: Sequence[ManifestRow] | None = None,
               exemplars: Mapping[str, np.ndarray] | None = None,
               classifier_fn: Callable[..., Any] | None = None) -> np.ndarray:
    """Re-create the image of a manifest row (C×H×W, quantised as in its PNG) with the generator that made it.

    `rows` (the manifest) supplies the row's chunk, recomputed with it so the bytes match; without
    it the image is computed alone and may differ by one 8-bit level in a few pixels.
    """
    if generator.checkpoint_sha256 != row.generator_sha256:
        raise DataError(f"manifest row {row.id} was made by generator {row.generator_sha256[:12]}, "
                        f"not {generator.checkpoint_sha256[:12]}; load that generator from the cache")
    chunk = [job_from_row(r) for r in rows if r.batch_id == row.batch_id] if rows is not None and row.batch_id \
        else [job_from_row(row)]
    if row.id not in [j.id for j in chunk]:
        raise DataError(f"manifest row {row.id} is not among the rows passed in `rows`")
    needed = {j.exemplar_id for j in chunk if j.exemplar_id is not None}
    missing = sorted(needed - set(exemplars or {}))
    if missing:
        raise DataError(f"manifest row {row.id} needs exemplar(s) {missing[:5]}; pass them in `exemplars`")
    if row.mode == "guided" and classifier_fn is None:
        raise DataError(f"manifest row {row.id} is guided; pass the classifier that guided it")
    images = generate_chunk(generator, chunk, exemplars=exemplars or {}, classifier_fn=classifier_fn,
                            classifier_scale=row.classifier_scale or 0.0, steps=row.steps,
                            guidance_scale=row.guidance)
    return quantize(images[[j.id for j in chunk].index(row.id)])


def verify_folder(out_dir: str | Path, generator: Generator, *, exemplars: Mapping[str, np.ndarray] | None = None,
                  classifier_fn: Callable[..., Any] | None = None) -> dict[str, list[str]]:
    """Check a generation folder: every PNG has a row, every row's file has its sha256 and regenerates.

    Returns the offending ids by problem (`no_row`, `bad_file`, `differs`); all empty means sound.
    Chunks are recomputed whole, so this costs about as much as the job did.
    """
    out_dir = Path(out_dir)
    rows = read_manifest(out_dir / "manifest.jsonl")
    known = {r.path for r in rows}
    report: dict[str, list[str]] = {"no_row": sorted(p.stem for p in (out_dir / "images").glob("*.png")
                                                     if f"images/{p.name}" not in known),
                                    "bad_file": [], "differs": []}
    jobs = [job_from_row(r) for r in rows]
    by_id = {r.id: r for r in rows}
    for chunk in chunks(jobs):
        row = by_id[chunk[0].id]
        images = generate_chunk(generator, chunk, exemplars=exemplars or {}, classifier_fn=classifier_fn,
                                classifier_scale=row.classifier_scale or 0.0, steps=row.steps,
                                guidance_scale=row.guidance)
        for job, image in zip(chunk, images, strict=True):
            r = by_id[job.id]
            if file_sha256(out_dir / r.path) != r.sha256:
                report["bad_file"].append(r.id)
            elif hashlib.sha256(png_bytes(image)).hexdigest() != r.sha256:
                report["differs"].append(r.id)
    return report
