"""mmkit's own adapters (AdaptFormer, VPT, SVFit): the math against hand-computed references,
the save / load format, merging, and CLI paths. The method x family matrix (trains, only the
adapter moves, save -> load) is in test_finetune.py."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import logits
from mmkit.adapters import adaptformer, own, svfit, vpt
from mmkit.cli.main import cli
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.tasks import get_task


def _randomize(model, mark):
    """Give an adapter non-trivial weights (fresh ones are zero, an identity)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if mark in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# ---------------------------------------------------------------- AdaptFormer
@pytest.mark.parametrize("ref", ["tiny:vit", "tiny:llama", "tiny:gpt2"])
def test_adaptformer_adds_the_branch_beside_the_mlp(ref):
    loaded = load_model(ref, labels=["a", "b"])
    block = [n for n, _ in adaptformer.find_blocks(loaded.model)][0]
    mlp = dict(loaded.model.named_modules())[block]
    x = torch.randn(2, 5, adaptformer._input_width(mlp))
    with torch.no_grad():
        plain = mlp(x)
        before = logits(loaded)
        adaptformer.inject(loaded.model, {"bottleneck": 4, "scale": 0.3, "dropout": 0.0})
        assert torch.allclose(logits(loaded), before)  # up starts at zero: same model
        _randomize(loaded.model, "mmkit_adaptformer")
        branch = mlp.mmkit_adaptformer
        by_hand = plain + 0.3 * branch.up(torch.relu(branch.down(x)))
        assert torch.allclose(mlp(x), by_hand, atol=1e-6)


def test_adaptformer_on_post_norm_bert_sits_inside_the_residual_sum():
    loaded = load_model("tiny:bert", labels=["a", "b"])
    adaptformer.inject(loaded.model, {"bottleneck": 4, "scale": 0.5, "dropout": 0.0})
    _randomize(loaded.model, "mmkit_adaptformer")
    layer = loaded.model.bert.encoder.layer[0]
    x = torch.randn(2, 5, loaded.model.config.hidden_size)
    with torch.no_grad():
        out, b = layer.output, layer.mmkit_adaptformer
        by_hand = out.LayerNorm(out.dense(layer.intermediate(x)) + x
                                + 0.5 * b.up(torch.relu(b.down(x))))
        assert torch.allclose(layer.feed_forward_chunk(x), by_hand, atol=1e-5)


def test_adaptformer_adds_under_two_percent_to_minilm():
    loaded = load_model("minilm", labels=["a", "b"])
    total = sum(p.numel() for p in loaded.model.parameters())
    adaptformer.inject(loaded.model, {"bottleneck": 64, "scale": 0.1, "dropout": 0.0})
    added = sum(p.numel() for n, p in loaded.model.named_parameters() if "mmkit_" in n)
    assert 0 < added / total < 0.02


# ---------------------------------------------------------------- VPT
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_enter_every_layer_they_should(deep):
    loaded = load_model("tiny:vit", labels=["a", "b"])
    vpt.inject(loaded.model, {"virtual_tokens": 3, "deep": deep})
    prompts = loaded.model.vit.mmkit_vpt.prompts
    assert prompts.shape[:2] == ((len(loaded.model.vit.layers) if deep else 1), 3)
    seen = []
    for layer in loaded.model.vit.layers:
        layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                        with_kwargs=True)
    logits(loaded)
    patches = (loaded.model.config.image_size // loaded.model.config.patch_size) ** 2
    assert all(h.shape[1] == 1 + 3 + patches for h in seen)
    assert torch.equal(seen[0][:, 1:4], prompts[0].expand(2, -1, -1))
    if deep:  # every later layer reads its own prompts, not what the previous layer wrote
        for i, h in enumerate(seen[1:], start=1):
            assert torch.equal(h[:, 1:4], prompts[i].expand(2, -1, -1))
    else:
        assert not torch.equal(seen[1][:, 1:4], prompts[0].expand(2, -1, -1))


# ---------------------------------------------------------------- SVFit
def test_svfit_equals_training_the_singular_values_of_w():
    layer = torch.nn.Linear(12, 8)
    model = torch.nn.Sequential(layer)
    w0 = layer.weight.detach().clone().double()
    names = svfit.inject(model, {"r": 3, "target_modules": "all-linear"})
    assert names == ["0"] and layer.mmkit_svfit.delta.numel() == 3
    with torch.no_grad():
        layer.mmkit_svfit.delta.copy_(torch.tensor([0.5, -0.2, 0.1]))
    # reference: W' = U diag(s + delta) V^T with delta on the top 3 values only
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    s[:3] += torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    reference = (u * s) @ vh
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = x.double() @ reference.T + layer.bias.double()
        assert torch.allclose(model(x).double(), expected, atol=1e-5)
        svfit.merge(model)
    assert not hasattr(layer, "mmkit_svfit") and not layer._forward_hooks
    assert torch.allclose(layer.weight.double(), reference, atol=1e-5)


def test_svfit_on_gpt2_conv1d_merges_to_the_same_outputs():
    loaded = load_model("tiny:gpt2")
    svfit.inject(loaded.model, {"r": 4, "target_modules": "all-linear"})
    _randomize(loaded.model, "delta")
    unmerged = logits(loaded)
    svfit.merge(loaded.model)
    assert not any("mmkit_" in n for n in loaded.model.state_dict())
    assert torch.allclose(logits(loaded), unmerged, atol=1e-4)


def test_svfit_merge_writes_a_plain_model_with_the_same_outputs(tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = {"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "svfit", "max_steps": 3, "lr": 5e-2}]}
    adapter = run_recipe(recipe, tmp_path / "a")
    recipe["steps"][0]["merge"] = True
    merged = run_recipe(recipe, tmp_path / "m")
    plain = AutoModelForSequenceClassification.from_pretrained(merged["artifact"]).eval()
    ours = load_model(adapter["artifact"])
    batch = get_task("text-classification").dummy_batch(ours, 2, 10)
    assert torch.allclose(logits(ours, batch), plain(**batch).logits.detach(), atol=1e-4)


# ---------------------------------------------------------------- format
def test_adapter_folder_is_documented_and_loads_in_plain_python(tmp_path):
    from transformers import AutoModelForImageClassification

    run_recipe({"model": "tiny:vit", "data": "digits", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "vpt", "deep": True, "max_steps": 2}]}, tmp_path / "v")
    folder = tmp_path / "v"
    spec = json.loads((folder / own.ADAPTER_JSON).read_text())
    assert spec["method"] == "vpt" and spec["params"] == {"virtual_tokens": 10, "deep": True}
    assert spec["base_model"] == "tiny:vit" and spec["task"] == "image-classification"
    manifest = json.loads((folder / "mmkit.json").read_text())
    assert manifest["format"] == "mmkit-adapter"
    ours = load_model(str(folder))
    # by hand: the base with the same head, then attach_adapter
    base = load_model("tiny:vit", labels=ours.labels).model
    assert isinstance(base, AutoModelForImageClassification._model_mapping[type(base.config)])
    by_hand = own.attach_adapter(base, folder)
    batch = get_task("image-classification").dummy_batch(ours, 2)
    with torch.no_grad():
        assert torch.equal(by_hand(**batch).logits, ours.model(**batch).logits)


def test_adapter_refuses_another_base(tmp_path):
    from mmkit.core.errors import InputError

    run_recipe({"model": "tiny:bert", "max_samples": 8, "steps": [
        {"step": "finetune", "method": "svfit", "max_steps": 1}]}, tmp_path / "s")
    other = load_model("tiny:gpt2").model
    with pytest.raises(InputError, match="own base model|does not fit"):
        own.attach_adapter(other, tmp_path / "s")


@pytest.mark.parametrize("method,ref", [("full", "tiny:vit"), ("adaptformer", "tiny:vit")])
def test_resume_restores_vit_checkpoints(method, ref, tmp_path):
    # transformers 5 renames ViT keys on save; the Trainer's own reload must still find them
    from transformers import TrainerCallback

    recipe = {"model": ref, "data": "digits", "max_samples": 24, "steps": [
        {"step": "finetune", "method": method, "epochs": 2, "batch_size": 8, "lr": 1e-3}]}
    straight = run_recipe(recipe, tmp_path / "straight")

    class Interrupt(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "cut", callbacks=[Interrupt()])
    resumed = run_recipe(recipe, tmp_path / "cut", resume=True)
    assert resumed["steps"][0]["report"]["resumed_from"]
    a, b = load_model(straight["artifact"]), load_model(resumed["artifact"])
    assert torch.allclose(logits(a), logits(b), atol=1e-5)


# ---------------------------------------------------------------- CLI
def test_cli_own_adapters(tmp_path):
    runner = CliRunner()
    for args in (["tiny:vit", "--vpt", "--deep", "--virtual-tokens", "2"],
                 ["tiny:bert", "--adaptformer", "--bottleneck", "8", "--scale", "0.5"],
                 ["tiny:llama", "--svfit", "--r", "2", "--merge", "--max-length", "32"]):
        out = tmp_path / args[1]
        result = runner.invoke(cli, ["finetune", *args, "--max-steps", "2", "--max-samples", "8",
                                     "-o", str(out), "--json"])
        assert result.exit_code == 0, result.stderr
        row = json.loads(result.stdout)
        params = row["steps"][0]["params"]
        assert (out / ("model.safetensors" if "--merge" in args else own.ADAPTER_WEIGHTS)).is_file()
        assert params.get("deep") or params.get("bottleneck") == 8 or params.get("r") == 2
        again = runner.invoke(cli, ["eval", str(out), "--max-samples", "8", "--json"])
        assert again.exit_code == 0, again.stderr
