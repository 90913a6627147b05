"""The `ray` engine of generation jobs: the same job as `runner.run_generation`, on a Ray cluster.

`engine_generate_fn(cfg)` gives `run_generation` the engine `cfg.engine` names (this module's for 'ray');
`run_generation_ray` takes the same arguments as `run_generation` (plus `address`, `num_actors`)
and writes the same files: `out_dir/images/<id>.png` and `out_dir/manifest.jsonl`, byte for byte
what the local engine writes for the same seed (manifest rows differ only in `seconds`), and it
resumes the same way (an image whose file matches its manifest row is kept).

How it runs. The job is `runner.run_generation` itself with this engine's `generate_fn`
(`ray_generate_fn`): the driver fits the generator once (or loads it from the generator cache),
plans the image jobs and their chunks, and applies the resume rule exactly as the local engine does
(a chunk is the unit of computation, fixed by the plan). Each pending chunk is one item of a Ray Dataset;
`map_batches` sends items to a fixed pool of `GeneratorActor`s (one GPU each when the cluster has
GPUs, else CPUs). An actor loads the fitted generator once — from its cache folder when the folder
is visible on that node, else from the object store (the driver's fitted generator, pickled; the SD
backends pickle their parameters only and reload their weights from `model`) — checks its
checkpoint hash, and computes each chunk with `runner.generate_chunk`. Images come back to the
driver, which writes the files and manifest rows, so the cluster needs no shared filesystem.

Bit-identical files: an image is computed in the same chunk as on the local engine, and a CPU actor
runs as many torch threads as the driver (the local engine) would and holds that many CPUs, because
CPU kernels round differently for other batch shapes and thread counts (differences near 1e-6, enough
to move an 8-bit pixel now and then). Across different hardware (or CPU against GPU) that rounding
can still move a pixel by one 8-bit step in rare cases.

Cluster. `address` (or `GenerateConfig.ray_address`) joins a running cluster (`ray.init(address=...)`);
without it a local instance is started on the loopback interface only (no dashboard, usage
statistics off) and shut down at the end. A Ray session that is already running in this process is
used as it is and left running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vision_si.config import GenerateConfig
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError, DataError
from vision_si.generators.base import GenerationRequest, Generator
from vision_si.generators.presets import generator_kwargs
from vision_si.generators.runner import (
    GenerateFn,
    GenerationResult,
    ImageJob,
    chunks,
    generate_chunk,
    run_generation,
)

# ---------------------------------------------------------------------- Ray session


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, progress: bool = True) -> Iterator[Any]:
    """The `ray` module with a session: the running one, a cluster at `address`, or a local loopback instance."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is None and "ray" not in sys.modules:
        # Ray binds a local instance to the machine's routable address unless this is off (read at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"generate.engine 'ray' needs {exc.name or 'ray'}, which is not installed: install the "
                          "`ray` extra (`pip install -e '.[ray]'` in a checkout, or `make setup-dev`)") from None
    if ray.is_initialized():
        yield ray
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": progress}
    try:
        if address is not None:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                     **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise ConfigError(f"could not start or join {where} (generate.ray_address / --address): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------- actors


@dataclasses.dataclass
class GeneratorSource:
    """How an actor gets the fitted generator: its cache folder if visible, else the pickled object."""

    backend_class: type
    folder: str | None  # a folder `backend_class.load(folder, **kwargs)` reads (the ddpm cache entry)
    kwargs: dict[str, Any]
    pickled: Any  # ray ObjectRef of the driver's fitted generator
    checkpoint_sha256: str

    def load(self) -> Generator:
        import ray

        loader = getattr(self.backend_class, "load", None)
        if self.folder is not None and callable(loader) and Path(self.folder).is_dir():
            generator = loader(self.folder, **self.kwargs)
        else:
            generator = ray.get(self.pickled)
        if generator.checkpoint_sha256 != self.checkpoint_sha256:
            raise DataError(f"a Ray actor loaded generator {generator.checkpoint_sha256[:12]}, not the driver's "
                            f"{self.checkpoint_sha256[:12]} (changed cache folder '{self.folder}'?)")
        return generator


class GeneratorActor:
    """One Ray Data actor: loads the generator once, then turns items (one chunk of jobs each) into images."""

    def __init__(self, source: GeneratorSource, exemplars: Mapping[str, np.ndarray],
                 classifier_fn: Callable[..., Any] | None, classifier_scale: float, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.generator = source.load()
        self.exemplars = exemplars
        self.classifier_fn = classifier_fn
        self.classifier_scale = classifier_scale

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, images, seconds = [], [], []
        for item in batch["chunk"]:  # one item is one chunk of the plan
            chunk = [ImageJob(**d) for d in json.loads(str(item))]
            t0 = time.perf_counter()
            out = generate_chunk(self.generator, chunk, exemplars=self.exemplars, classifier_fn=self.classifier_fn,
                                 classifier_scale=self.classifier_scale)
            per_image = (time.perf_counter() - t0) / len(chunk)
            ids += [j.id for j in chunk]
            images += list(np.asarray(out, dtype=np.float32))
            seconds += [per_image] * len(chunk)
        return {"id": np.array(ids), "image": np.stack(images), "seconds": np.array(seconds, dtype=np.float64)}


def _source(ray: Any, generator: Generator, preset: dict[str, Any]) -> GeneratorSource:
    folder = getattr(generator, "folder_", None)
    return GeneratorSource(backend_class=type(generator), folder=str(folder) if folder is not None else None,
                           kwargs=generator_kwargs(preset), pickled=ray.put(generator),
                           checkpoint_sha256=generator.checkpoint_sha256)


def ray_generate_jobs(ray: Any, generator: Generator, preset: dict[str, Any], jobs: Sequence[ImageJob], *,
                      exemplars: Mapping[str, np.ndarray], classifier_fn: Callable[..., Any] | None = None,
                      classifier_scale: float = 0.0, num_actors: int | None = None,
                      progress: bool = True) -> Iterator[tuple[ImageJob, np.ndarray, float]]:
    """Like `runner.generate_jobs`, on an actor pool: yields (job, C×H×W image, seconds) as chunks finish."""
    if not jobs:
        return
    import torch

    groups = chunks(jobs)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    threads = 1 if gpus else min(torch.get_num_threads(), cpus)
    size = num_actors if num_actors is not None else (gpus if gpus else max(1, cpus // threads))
    if size < 1:
        raise ConfigError(f"num_actors={num_actors} must be >= 1")
    size = min(size, len(groups))
    needed = {j.exemplar_id for j in jobs if j.exemplar_id is not None}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bar counts images
    if not progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"chunk": json.dumps([dataclasses.asdict(j) for j in c])} for c in groups]
    dataset = ray.data.from_items(items).map_batches(
        GeneratorActor, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        fn_constructor_kwargs={"source": _source(ray, generator, preset),
                               "exemplars": {i: exemplars[i] for i in needed}, "classifier_fn": classifier_fn,
                               "classifier_scale": classifier_scale, "threads": threads},
        num_cpus=threads, num_gpus=1 if gpus else 0)
    by_id = {j.id: j for j in jobs}
    with tqdm(total=len(jobs), desc=f"generating on {size} Ray actor(s)", disable=not progress) as bar:
        for row in dataset.iter_rows():
            yield by_id[str(row["id"])], np.asarray(row["image"], dtype=np.float32), float(row["seconds"])
            bar.update(1)


# ---------------------------------------------------------------------- the job


def ray_generate_fn(cfg: GenerateConfig, *, address: str | None = None, num_actors: int | None = None) -> GenerateFn:
    """The `generate_fn` of `runner.run_generation` that computes the pending chunks on Ray actors.

    `address` (else `cfg.ray_address`) joins a cluster; without either a local instance runs for the job.
    """

    def generate(generator: Generator, preset: dict[str, Any], jobs: Sequence[ImageJob], *,
                 exemplars: Mapping[str, np.ndarray], classifier_fn: Callable[..., Any] | None,
                 classifier_scale: float, progress: bool) -> Iterator[tuple[ImageJob, np.ndarray, float]]:
        supported = getattr(generator, "modes", None)  # checked here: an error inside an actor arrives wrapped
        unsupported = sorted({j.mode for j in jobs} - set(supported)) if supported is not None else []
        if unsupported:
            raise ConfigError(f"generator {preset['backend']!r} (preset {preset['name']!r}) makes "
                              f"{' or '.join(supported)}-mode images, not {unsupported}; change generate.mode or "
                              "the preset")
        if not jobs:
            return
        with ray_session(address if address is not None else cfg.ray_address, progress=progress) as ray:
            yield from ray_generate_jobs(ray, generator, preset, jobs, exemplars=exemplars,
                                         classifier_fn=classifier_fn, classifier_scale=classifier_scale,
                                         num_actors=num_actors, progress=progress)

    return generate


def engine_generate_fn(cfg: GenerateConfig, *, address: str | None = None,
                       num_actors: int | None = None) -> GenerateFn | None:
    """The `generate_fn` of `runner.run_generation` for `cfg.engine`: None (this process) for 'local',
    the Ray actors' for 'ray'. The loop and the plan job choose the engine through here, so the runner
    never imports an engine."""
    if cfg.engine == "local":
        return None
    if cfg.engine == "ray":
        return ray_generate_fn(cfg, address=address, num_actors=num_actors)
    raise ConfigError(f"generate.engine {cfg.engine!r} is not one of local, ray")


def run_generation_ray(cfg: GenerateConfig, requests: Sequence[GenerationRequest], *, train: LabelledImages,
                       classes: list[str], out_dir: str | Path, seed: int, id_prefix: str = "syn-r01",
                       classifier_fn: Callable[..., Any] | None = None, progress: bool = True,
                       address: str | None = None, num_actors: int | None = None) -> GenerationResult:
    """`run_generation` on Ray: same files, manifest and resume; `address` (else `cfg.ray_address`) joins a cluster."""
    return run_generation(dataclasses.replace(cfg, engine="ray"), requests, train=train, classes=classes,
                          out_dir=out_dir, seed=seed, id_prefix=id_prefix, classifier_fn=classifier_fn,
                          progress=progress, generate_fn=ray_generate_fn(cfg, address=address, num_actors=num_actors))
