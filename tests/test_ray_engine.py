"""The Ray engine writes the same images and manifest as the local engine, on a local 2-CPU Ray instance."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys

import numpy as np
import pytest

from vision_si.config import GenerateConfig
from vision_si.data.arrays import LabelledImages
from vision_si.errors import ConfigError
from vision_si.generators import GenerationRequest
from vision_si.generators.ray_engine import engine_generate_fn, ray_session
from vision_si.generators.runner import read_manifest, run_generation

CLASSES = ["good", "bad"]


@pytest.fixture(scope="module")
def ray_local():
    """The engine's own local Ray instance (2 CPUs, loopback only), shared by the module: startup takes seconds."""
    if importlib.util.find_spec("ray") is None:  # not importorskip: the engine sets Ray's env before the import
        pytest.skip("ray is not installed (extra 'ray')")
    with ray_session(None, num_cpus=2, progress=False) as ray:
        yield ray


def _data():
    rng = np.random.default_rng(0)
    images = rng.random((12, 1, 16, 16), dtype=np.float32)
    labels = np.arange(12) % 2
    ids = [f"real:{i:02d}" for i in range(12)]
    requests = [
        GenerationRequest(class_index=0, class_name="good", slice_id="s0", count=3, mode="class"),
        GenerationRequest(class_index=1, class_name="bad", slice_id="s1", count=4,
                          exemplar_ids=["real:01", "real:03", "real:05"], mode="exemplar", strength=0.5),
        GenerationRequest(class_index=1, class_name="bad", slice_id="s2", count=2,
                          exemplar_ids=["real:07"], mode="exemplar", strength=0.8),
    ]
    return images, labels, ids, requests


def _train(images, labels, ids) -> LabelledImages:
    return LabelledImages(images, labels, ids, [f"sha-{i}" for i in ids])


def _run(cfg, out_dir, **kw):
    images, labels, ids, requests = _data()
    return run_generation(cfg, requests, train=_train(images, labels, ids), classes=CLASSES, out_dir=out_dir, seed=7,
                          id_prefix="syn-r01", progress=False, generate_fn=engine_generate_fn(cfg), **kw)


def _run_with(cfg, requests, out_dir):
    images, labels, ids, _ = _data()
    return run_generation(cfg, requests, train=_train(images, labels, ids), classes=CLASSES, out_dir=out_dir, seed=7,
                          progress=False, generate_fn=engine_generate_fn(cfg))


def _files(out_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out_dir / "images").glob("*.png"))}


def _rows(out_dir):
    return [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in read_manifest(out_dir / "manifest.jsonl")]


@pytest.mark.ray
def test_ray_engine_matches_local_engine_and_resumes(ray_local, tmp_path):
    local_cfg = GenerateConfig(preset="tiny", batch_size=2, cache_dir=str(tmp_path / "cache"))
    local = _run(local_cfg, tmp_path / "local")
    ray_cfg = dataclasses.replace(local_cfg, engine="ray")
    remote = _run(ray_cfg, tmp_path / "ray")  # through the engine switch the loop and plan jobs use
    assert ray_local.cluster_resources()["CPU"] == 2
    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.1"}
    assert remote.cache_hit and remote.n_generated == 9 and remote.generator_sha256 == local.generator_sha256
    assert len(_files(tmp_path / "ray")) == 9
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    assert len({r.seed for r in remote.rows}) == 9

    # a lost and a corrupted image are made again on Ray, the seven valid ones are kept
    (tmp_path / "ray" / "images" / "syn-r01-000002.png").unlink()
    (tmp_path / "ray" / "images" / "syn-r01-000005.png").write_bytes(b"not a png")
    again = _run(ray_cfg, tmp_path / "ray")
    assert (again.n_generated, again.n_reused) == (2, 7)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")


@pytest.mark.ray
@pytest.mark.sd
def test_ray_engine_runs_stable_diffusion_like_the_local_engine(ray_local, tmp_path, monkeypatch):
    """SD generators travel to actors as parameters and reload their weights there (the GPU-cluster case)."""
    pytest.importorskip("transformers")
    import yaml
    from test_stable_diffusion import save_tiny_sd, tiny_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = save_tiny_sd(tmp_path / "tiny-sd", tiny_tokenizer(tmp_path / "vocab"), 4)
    preset = tmp_path / "tiny-sd-img2img.yaml"
    preset.write_text(yaml.safe_dump({"backend": "sd-img2img", "model": str(model), "resolution": 16, "device": "cpu",
                                      "sample": {"sampler": "ddim", "steps": 2, "guidance_scale": 2.0}}))
    requests = [GenerationRequest(class_index=1, class_name="bad", slice_id="s1", count=5,
                                  exemplar_ids=["real:01", "real:03"], mode="exemplar", strength=0.5)]
    cfg = GenerateConfig(preset=str(preset), batch_size=2, cache_dir="")
    for engine in ("local", "ray"):
        _run_with(dataclasses.replace(cfg, engine=engine), requests, tmp_path / engine)
    assert len(_files(tmp_path / "ray")) == 5
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
    class_mode = [dataclasses.replace(requests[0], mode="class", exemplar_ids=[])]
    with pytest.raises(ConfigError, match=r"makes exemplar-mode images, not \['class'\]"):
        _run_with(dataclasses.replace(cfg, engine="ray"), class_mode, tmp_path / "class")


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[ray\]'"), ray_session(None):
        pass


def test_the_runner_needs_the_engine_it_is_told_to_use(tmp_path):
    images, labels, ids, requests = _data()
    cfg = GenerateConfig(preset="tiny", engine="ray", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="engine_generate_fn"):
        run_generation(cfg, requests, train=_train(images, labels, ids), classes=CLASSES, out_dir=tmp_path / "o",
                       seed=7, progress=False)
    assert engine_generate_fn(dataclasses.replace(cfg, engine="local")) is None
