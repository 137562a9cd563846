"""Artifacts: complete or absent, carry provenance, reload to the same outputs."""

import json
import os

import pytest
import torch
import yaml

from conftest import TINY, logits, read_manifest
from mmkit.core.artifacts import check_output, file_hashes
from mmkit.core.data import load_data
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.tasks import get_task


@pytest.mark.parametrize("ref", TINY)
def test_artifact_reloads_to_the_same_outputs(ref, tiny_artifacts):
    path = tiny_artifacts[ref]
    manifest = read_manifest(path)
    task = manifest["task"]["name"]
    labels = manifest["task"]["labels"]
    original = load_model(ref, task, labels, seed=0)  # same seed -> same weights as the run
    reloaded = load_model(str(path))
    assert reloaded.source.kind == "artifact" and reloaded.task == task
    assert reloaded.labels == labels and not reloaded.fresh_head
    assert torch.allclose(logits(original), logits(reloaded), atol=1e-6)


@pytest.mark.parametrize("ref", TINY)
def test_artifact_loads_with_plain_transformers(ref, tiny_artifacts):
    import transformers

    path = tiny_artifacts[ref]
    cls = {"text-classification": transformers.AutoModelForSequenceClassification,
           "image-classification": transformers.AutoModelForImageClassification,
           "zero-shot-image-classification": transformers.AutoModel,
           "causal-lm": transformers.AutoModelForCausalLM}[read_manifest(path)["task"]["name"]]
    plain = cls.from_pretrained(path).eval()
    ours = load_model(str(path))
    batch = get_task(ours.task).dummy_batch(ours, 1, 8)
    with torch.no_grad():
        a, b = plain(**batch), ours.model(**batch)
    key = "logits" if getattr(a, "logits", None) is not None else "logits_per_image"
    assert torch.equal(getattr(a, key), getattr(b, key))
    if ours.tokenizer is not None:
        assert transformers.AutoTokenizer.from_pretrained(path)("hi")["input_ids"] == \
            ours.tokenizer("hi")["input_ids"]


def test_manifest_records_provenance(tiny_artifacts):
    path = tiny_artifacts["tiny:bert"]
    m = read_manifest(path)
    assert m["schema_version"] == 1 and m["parent"]["ref"] == "tiny:bert"
    assert m["steps"][0]["step"] == "cast" and m["steps"][0]["params"] == {"dtype": "float32"}
    assert m["metrics"][0]["examples"] == 16 and "versions" in m["metrics"][0]["environment"]
    assert m["data"]["sizes"]["test"] == 16 and m["data"]["split_sha256"]
    assert m["files"] == file_hashes(path)
    recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    assert recipe["model"] == "tiny:bert" and recipe["steps"][0]["dtype"] == "float32"


def test_resolved_recipe_reruns_to_identical_weights(tiny_artifacts, tmp_path):
    path = tiny_artifacts["tiny:llama"]
    recipe = yaml.safe_load((path / "recipe.yaml").read_text())
    run_recipe(recipe, tmp_path / "again")
    assert read_manifest(tmp_path / "again")["weights_sha256"] == read_manifest(path)["weights_sha256"]


def test_parent_weights_hash_is_recorded_for_a_folder_parent(tiny_artifacts, tmp_path):
    parent = tiny_artifacts["tiny:gpt2"]
    run_recipe({"model": str(parent), "steps": [{"step": "cast", "dtype": "bf16"}]}, tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    assert m["parent"]["weights_sha256"] == read_manifest(parent)["weights_sha256"]
    assert load_model(str(tmp_path / "c")).model.dtype == torch.bfloat16


def test_existing_output_needs_overwrite_and_only_mmkit_outputs_are_replaced(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    recipe = {"model": "tiny:gpt2", "steps": []}
    with pytest.raises(InputError, match="--overwrite"):
        run_recipe(recipe, out)
    with pytest.raises(InputError, match="did not write"):  # not mmkit's: never replaced
        run_recipe(recipe, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    run_recipe(recipe, out, overwrite=True)  # an empty folder may be replaced
    first = read_manifest(out)["created"]
    run_recipe({**recipe, "seed": 1}, out, overwrite=True)  # an artifact: replaced
    assert read_manifest(out)["parent"]["seed"] == 1 and read_manifest(out)["created"] >= first
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary siblings left


def test_unwritable_output_is_refused_before_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a writable folder"):
        check_output(blocker / "out", overwrite=False)


def test_failing_step_leaves_no_output(tmp_path, monkeypatch):
    from mmkit.core import registry

    registry.all_methods()
    method = registry.get_method("cast")

    def explode(loaded, config, ctx):
        raise RuntimeError("step failed")

    monkeypatch.setitem(registry._REGISTRY, ("cast", "dtype"),
                        registry.Method("cast", "dtype", method.config, explode, "boom"))
    with pytest.raises(RuntimeError):
        run_recipe({"model": "tiny:gpt2", "steps": [{"step": "cast"}]}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_safetensors_is_a_clear_error(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts["tiny:bert"], copy)
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupted"):
        load_model(str(copy))


def test_altered_weights_fail_the_manifest_hash(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts["tiny:bert"], copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, header intact, one weight byte changed
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="does not match the hash"):
        load_model(str(copy))
    os.remove(copy / "mmkit.json")  # as plain HF files it loads (the user's call)
    assert load_model(str(copy)).source.kind == "folder"


def test_artifact_head_refuses_labels_it_cannot_take(tiny_artifacts):
    ds = load_data("bbc-news", "text-classification", max_samples=4)
    with pytest.raises(InputError, match="cannot take"):
        load_model(str(tiny_artifacts["tiny:bert"]), labels=ds.label_names)


def test_image_processor_round_trips(tiny_artifacts):
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(tiny_artifacts["tiny:vit"])
    assert proc.size["height"] == 32
    assert json.loads((tiny_artifacts["tiny:clip"] / "mmkit.json").read_text())["kind"] == "clip"


@pytest.mark.slow
def test_minilm_artifact_round_trip(tmp_path):
    result = run_recipe({"model": "minilm", "max_samples": 8, "steps": []}, tmp_path / "m")
    original = load_model("minilm", labels=["negative", "positive"], seed=0)
    reloaded = load_model(result["artifact"])
    assert torch.equal(logits(original), logits(reloaded))
    assert read_manifest(result["artifact"])["parent"]["weights_sha256"]
