"""Plan files: a resumable batch job of generation requests outside the loop (`vsi generate --plan PLAN --out DIR`).

A plan is YAML or JSON. Besides `requests`, it takes either `run` (a run directory: the job uses that
run's `config.yaml` for `seed` and `data`, and its `splits.csv`, checked against the run's recorded
digest, for the split), or the run-config sections `seed` and `data` (same keys as a run config; the
split is then made exactly as a run with this config makes it, `data.split.seed` included). Either
way the data and the split come through `vision_si.data.real.load_real_data`, the path the loop
takes, so the generator trains on the run's `train` images only and shares the run's cached
generator. A `generate` section (same keys as a run config) overrides the run's, and `id_prefix`
(default `syn-plan`) names the images. A plan for ELPV, whose classes are `functional`,
`possibly_defective`, `likely_defective` and `defective` (indices 0-3) and whose ids are
`elpv:<file stem>`:

```yaml
seed: 0                       # or `run: runs/<timestamp>-demo` instead of seed and data: that run's data
data: {source: elpv, image_size: 32}   # and split (its splits.csv) are used
generate: {preset: quick, batch_size: 64}
id_prefix: syn-plan
requests:
  - class: defective          # class name or index
    count: 5000
    mode: exemplar            # exemplar | class (guided needs a classifier and is not for plans)
    strength: 0.5             # exemplar mode: 0 keeps the exemplar, 1 is pure noise
    exemplar_ids: [elpv:cell0001, elpv:cell0003]   # in the train split (never val or test)
    slice_id: manual          # optional label recorded in the manifest
  - {class: 0, count: 200, mode: class}   # 0: functional
```

Exemplar ids must lie in the `train` split (the run's `splits.csv` lists every id with its split).
The job writes what a loop round writes (`images/<id>.png`, `manifest.jsonl`) and resumes the same
way (`generators.runner.run_generation`); `--engine ray` computes the images on Ray
(`generators.ray_engine`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision_si.config import (
    RunConfig,
    check_plain_tree,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_yaml,
    read_text_file,
)
from vision_si.errors import ConfigError
from vision_si.generators.base import GenerationRequest
from vision_si.generators.ray_engine import engine_generate_fn
from vision_si.generators.runner import GenerationResult, run_generation

REQUEST_KEYS = ("class", "count", "mode", "strength", "exemplar_ids", "slice_id")


@dataclass
class Plan:
    config: RunConfig  # the run's config (or one built from the plan's seed and data), with its generate section
    requests: list[GenerationRequest]
    id_prefix: str
    run: Path | None = None  # the run directory whose split the job uses


def _read(path: Path) -> dict[str, Any]:
    text = read_text_file(path, "plan file")
    if path.suffix == ".json":
        try:
            content = check_plain_tree(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{path}: values nested too deeply to read; refused") from None
    else:
        content = parse_yaml(text, str(path))
    if not isinstance(content, dict) or not isinstance(content.get("requests"), list) or not content["requests"]:
        raise ConfigError(f"{path}: a plan is a mapping with a non-empty 'requests' list")
    return dict(content)


def _config(path: Path, content: dict[str, Any]) -> tuple[RunConfig, Path | None]:
    """The plan's run config: the named run's, with the plan's `generate` keys over it, or the plan's own."""
    run = content.pop("run", None)
    if run is None:
        try:
            return config_from_dict(content), None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(run, str):
        raise ConfigError(f"{path}: run: expected the path of a run directory, got {run!r}")
    run_dir = Path(run).expanduser()
    if not run_dir.is_absolute() and not run_dir.exists():  # the working directory first, then beside the plan
        run_dir = path.parent / run_dir
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{path}: run: '{run}' is not a run directory (no config.yaml)")
    clash = sorted(set(content) - {"generate"})
    if clash:
        raise ConfigError(f"{path}: a plan naming a run takes seed and data from the run's config.yaml; "
                          f"remove {', '.join(clash)} (only 'generate' may override the run's)")
    base = config_to_dict(load_config(run_dir / "config.yaml"))
    generate = content.get("generate") or {}
    if not isinstance(generate, dict):
        raise ConfigError(f"{path}: generate: expected a mapping of generate keys, got {generate!r}")
    try:
        return config_from_dict({**base, "generate": {**base["generate"], **generate}}), run_dir
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file (see the module doc); class names are resolved when the data is loaded."""
    path = Path(path)
    content = _read(path)
    raw_requests = content.pop("requests")
    id_prefix = str(content.pop("id_prefix", "syn-plan"))
    cfg, run_dir = _config(path, content)
    requests = []
    for n, raw in enumerate(raw_requests):
        if not isinstance(raw, dict) or "class" not in raw or "count" not in raw:
            raise ConfigError(f"{path}: requests[{n}] needs at least 'class' and 'count'")
        unknown = set(raw) - set(REQUEST_KEYS)
        if unknown:
            raise ConfigError(f"{path}: requests[{n}] has unknown key(s) {sorted(unknown)}; allowed: "
                              f"{', '.join(REQUEST_KEYS)}")
        mode = raw.get("mode", "exemplar" if raw.get("exemplar_ids") else "class")
        if mode == "guided":
            raise ConfigError(f"{path}: requests[{n}]: guided mode needs a live classifier; use it inside a run")
        cls = raw["class"]
        for key, kinds in (("count", (int,)), ("strength", (int, float))):
            value = raw.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, kinds):
                what = "an integer" if key == "count" else "a number"
                raise ConfigError(f"{path}: requests[{n}]: {key} must be {what}, got {value!r}")
        try:
            requests.append(GenerationRequest(class_index=cls if isinstance(cls, int) and not isinstance(cls, bool)
                                              else -1, class_name=str(cls),
                                              slice_id=str(raw.get("slice_id", "plan")), count=int(raw["count"]),
                                              exemplar_ids=[str(i) for i in raw.get("exemplar_ids") or []],
                                              mode=mode, strength=float(raw.get("strength", cfg.generate.strength))))
        except ConfigError as exc:
            raise ConfigError(f"{path}: requests[{n}]: {exc}") from None
    return Plan(config=cfg, requests=requests, id_prefix=id_prefix, run=run_dir)


def _resolve_classes(plan: Plan, classes: list[str], where: str) -> None:
    for n, req in enumerate(plan.requests):
        if req.class_index == -1:
            if req.class_name not in classes:
                raise ConfigError(f"{where}: requests[{n}]: class {req.class_name!r} is not one of {classes}")
            req.class_index = classes.index(req.class_name)
        elif not 0 <= req.class_index < len(classes):
            raise ConfigError(f"{where}: requests[{n}]: class index {req.class_index} is not in 0..{len(classes) - 1}")
        req.class_name = classes[req.class_index]


def generate_from_plan(plan_path: str | Path, out_dir: str | Path, *, engine: str = "local",
                       address: str | None = None, progress: bool = True) -> GenerationResult:
    """Run a plan file as a resumable batch job into `out_dir` (images/ + manifest.jsonl), on the `train`
    split of the run it names (or of the split its seed and data make), through the loop's data path."""
    from vision_si.data.real import load_real_data

    plan = load_plan(plan_path)
    cfg = plan.config
    real = load_real_data(cfg, run_dir=plan.run, record=False, progress=progress)
    _resolve_classes(plan, real.classes, str(plan_path))
    gen_cfg = dataclasses.replace(cfg.generate, engine=engine,
                                  ray_address=address if address is not None else cfg.generate.ray_address)
    return run_generation(gen_cfg, plan.requests, train=real.split("train"), classes=real.classes, out_dir=out_dir,
                          seed=cfg.seed, id_prefix=plan.id_prefix, progress=progress,
                          generate_fn=engine_generate_fn(gen_cfg))
