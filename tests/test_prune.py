"""prune: reached sparsity, N:M patterns, Wanda vs magnitude, structured pruning equal to the
masked model it came from, save / load, sparsity kept through merge and fine-tuning, CLI."""

import copy
import json

import pytest
import torch

from conftest import CALIB, logits, row_problems, run_cli, with_rows
from mmkit.compression.prune import structured as st
from mmkit.compression.prune import unstructured as un
from mmkit.core.layers import weight_view
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.registry import Context, build_config, get_method
from mmkit.core.tasks import get_task

# One row per registered prune method; a method without one fails
# test_every_registered_prune_method_has_a_row.
#   reload: the tiny families the save / load matrix prunes (sparsity 0.5, calibration data),
#           each with whether the artifact is plain (the config states the new sizes, so plain
#           transformers opens it; no mmkit_prune.json). Empty where the method takes other
#           options than that step's; the comment names the tests that cover it instead.
PRUNE = {
    # saved and reloaded by test_sparsity_survives_a_lora_merge_and_keep_sparsity_finetuning
    ("prune", "magnitude"): {"reload": {}},
    ("prune", "wanda"): {"reload": {"tiny:llama": True}},
    # saved and scored by test_cli_prune; its pattern: test_nm_pattern_holds_in_every_group
    ("prune", "nm"): {"reload": {}},
    ("prune", "heads"): {"reload": {"tiny:bert": False, "tiny:clip": False, "tiny:vit": True,
                                    "tiny:llama": True}},
    ("prune", "neurons"): {"reload": {"tiny:bert": True}},
    ("prune", "layers"): {"reload": {"tiny:llama": True}},
}
RELOAD = [(ref, m.name, plain) for m, row in with_rows("prune", PRUNE)
          for ref, plain in row["reload"].items()]


def test_every_registered_prune_method_has_a_row():
    problems = row_problems("prune", PRUNE, "PRUNE in tests/test_prune.py")
    assert not problems, "\n".join(problems)


def _load(ref):
    return load_model(ref, labels=["a", "b"] if ref in ("tiny:bert", "tiny:vit") else None)


def _prune(loaded, method, **params):
    m = get_method("prune", method)
    ctx = Context()
    return m.apply(loaded, build_config(m, params, "test"), ctx), ctx.report


def _linears(model):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[0] not in ("classifier", "lm_head",
                                                                         "score")}


# ---------------------------------------------------------------- unstructured
@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:llama", "tiny:gpt2"])
def test_magnitude_reaches_the_requested_sparsity(ref):
    loaded, report = _prune(_load(ref), "magnitude", sparsity=0.6)
    for name, fraction in report["layer_sparsity"].items():
        w = loaded.model.get_submodule(name).weight
        assert fraction == pytest.approx(int(w.numel() * 0.6) / w.numel(), abs=1e-9), name
    loaded, report = _prune(_load(ref), "magnitude", sparsity=0.6, scope="global")
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert len({round(v, 2) for v in report["layer_sparsity"].values()}) > 1  # uneven by layer


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_pattern_holds_in_every_group(nm):
    n, m = (int(x) for x in nm.split(":"))
    loaded, report = _prune(_load("tiny:llama"), "nm", nm=nm)
    for name in report["layer_sparsity"]:
        w = weight_view(loaded.model.get_submodule(name))
        kept = (w.reshape(w.shape[0], -1, m) != 0).sum(-1)
        assert torch.all(kept <= n) and float((w == 0).float().mean()) >= 1 - n / m - 1e-6


def test_wanda_keeps_small_weights_on_loud_inputs():
    layer = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(32, dtype=torch.float32).reshape(4, 8) % 8 + 1)
        layer.weight[:, 0] = 0.5  # the smallest weights...
    norms = torch.ones(8)
    norms[0] = 100.0  # ...read the loudest input
    magnitude = un.row_mask(un.magnitude_scores(layer), 0.5)
    wanda = un.row_mask(un.wanda_scores(layer, norms), 0.5)
    assert not magnitude[:, 0].any() and wanda[:, 0].all()


def test_wanda_and_magnitude_choose_differently_on_a_model():
    a, ra = _prune(_load("tiny:llama"), "magnitude", sparsity=0.5)
    b, rb = _prune(_load("tiny:llama"), "wanda", sparsity=0.5, calib="bbc-text", calib_samples=8)
    name = "model.layers.1.mlp.down_proj"
    wa, wb = a.model.get_submodule(name).weight, b.model.get_submodule(name).weight
    assert rb["layer_sparsity"][name] == pytest.approx(0.5)
    assert not torch.equal(wa == 0, wb == 0)


# ---------------------------------------------------------------- structured
def _mask_heads(model, family, parts, config_blocks, keep_per_block):
    """The masked equivalent of head pruning: zero the removed heads' output columns."""
    for blocks, heads, kv, head_dim in config_blocks:
        for i, block in enumerate(blocks):
            keep = keep_per_block[id(block)]
            rep = heads // kv
            o = block.get_submodule(parts["o"])
            with torch.no_grad():
                for group in range(kv):
                    if group not in keep:
                        for h in range(group * rep, (group + 1) * rep):
                            o.weight[:, h * head_dim:(h + 1) * head_dim] = 0


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:vit", "tiny:clip", "tiny:llama"])
def test_head_pruning_equals_masking_those_heads(ref):
    loaded = _load(ref)
    masked = copy.deepcopy(loaded)
    parts = st.PARTS[loaded.family]
    config_blocks, keep = [], {}
    for (_, blocks, config), (_, mblocks, _) in zip(st.stacks(loaded.model),
                                                     st.stacks(masked.model)):
        heads, kv, head_dim = st.head_layout(config, loaded.family)
        config_blocks.append((mblocks, heads, kv, head_dim))
        for block, mblock in zip(blocks, mblocks):
            score = st.head_weight_importance(block, parts, heads, kv, head_dim)
            keep[id(mblock)] = set(torch.topk(score, kv - round(kv * 0.5)).indices.tolist())
    _mask_heads(masked.model, loaded.family, parts, config_blocks, keep)
    pruned, report = _prune(loaded, "heads", sparsity=0.5, importance="weights")
    assert sum(p.numel() for p in pruned.model.parameters()) < \
        sum(p.numel() for p in masked.model.parameters())
    assert torch.allclose(logits(pruned), logits(masked), atol=1e-5)


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:vit", "tiny:clip", "tiny:llama"])
def test_neuron_pruning_equals_masking_those_neurons(ref):
    loaded = _load(ref)
    masked = copy.deepcopy(loaded)
    parts = st.PARTS[loaded.family]
    for (_, blocks, _), (_, mblocks, _) in zip(st.stacks(loaded.model), st.stacks(masked.model)):
        for block, mblock in zip(blocks, mblocks):
            score = st.neuron_weight_importance(block, parts)
            drop = torch.topk(score, round(len(score) * 0.5), largest=False).indices
            with torch.no_grad():
                mblock.get_submodule(parts["ffn_out"]).weight[:, drop] = 0
    pruned, report = _prune(loaded, "neurons", sparsity=0.5, importance="weights")
    assert torch.allclose(logits(pruned), logits(masked), atol=1e-5)


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:llama"])
def test_layer_pruning_equals_skipping_those_layers(ref):
    loaded = _load(ref)
    skipped = copy.deepcopy(loaded)
    pruned, report = _prune(loaded, "layers", sparsity=0.5)
    (name, drop), = report["removed_layers"].items()
    blocks = dict(skipped.model.named_modules())[name]
    for i in drop:  # the block returns its input unchanged
        blocks[i].register_forward_hook(
            lambda m, a, k, o: (a[0] if a else k["hidden_states"]) if not isinstance(o, tuple)
            else ((a[0] if a else k["hidden_states"]),) + o[1:], with_kwargs=True)
    assert torch.allclose(logits(pruned), logits(skipped), atol=1e-5)


@pytest.mark.parametrize("ref,method,plain", RELOAD)
def test_pruned_artifacts_reload_to_the_same_outputs(ref, method, plain, tmp_path):
    import transformers

    step = {"step": "prune", "method": method, "sparsity": 0.5, "calib": CALIB[ref],
            "calib_samples": 8}
    result = run_recipe({"model": ref, "max_samples": 16, "steps": [step]}, tmp_path / "p")
    first, again = load_model(result["artifact"]), load_model(result["artifact"])
    assert torch.equal(logits(first), logits(again))
    assert (tmp_path / "p" / "mmkit_prune.json").is_file() != plain
    if plain:  # the config states the new sizes: plain transformers opens it
        cls = {"tiny:bert": transformers.AutoModelForSequenceClassification,
               "tiny:vit": transformers.AutoModelForImageClassification,
               "tiny:llama": transformers.AutoModelForCausalLM}[ref]
        model = cls.from_pretrained(result["artifact"]).eval()
        batch = get_task(first.task).dummy_batch(first, 2, 12)
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, logits(first, batch), atol=1e-5)


# ---------------------------------------------------------------- sparsity survives
def _zeros(model, name):
    return model.get_submodule(name).weight == 0


def test_sparsity_survives_a_lora_merge_and_keep_sparsity_finetuning(tmp_path):
    pruned = run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "prune", "method": "magnitude", "sparsity": 0.5}]}, tmp_path / "p")["artifact"]
    name = "bert.encoder.layer.0.intermediate.dense"
    before = _zeros(load_model(pruned).model, name)
    train = {"max_steps": 3, "lr": 5e-2, "batch_size": 4}
    merged = run_recipe({"model": pruned, "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "merge": True, **train}]}, tmp_path / "m")
    assert merged["steps"][0]["report"]["sparse_layers_kept"] > 0
    after = load_model(merged["artifact"]).model
    assert torch.equal(_zeros(after, name) & before, before)  # every pruned weight still zero
    assert not torch.equal(after.get_submodule(name).weight,
                           load_model(pruned).model.get_submodule(name).weight)  # it did merge
    kept = run_recipe({"model": pruned, "max_samples": 16, "steps": [
        {"step": "finetune", "method": "full", "keep_sparsity": True, **train}]}, tmp_path / "k")
    assert torch.equal(_zeros(load_model(kept["artifact"]).model, name), before)
    lost = run_recipe({"model": pruned, "max_samples": 16, "steps": [
        {"step": "finetune", "method": "full", **train}]}, tmp_path / "l")
    assert _zeros(load_model(lost["artifact"]).model, name).sum() < before.sum()  # without it


# ---------------------------------------------------------------- CLI
def test_cli_prune(tmp_path):
    result = run_cli("prune", "tiny:llama", "--method", "nm", "--nm", "2:4", "--eval",
                     "--max-samples", "8", "-o", tmp_path / "n", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["steps"][0]["report"]["sparsity"] == pytest.approx(0.5)
    assert "perplexity" in row["metrics"][0]


def test_cli_prune_bad_input(tmp_path):
    cases = {
        "sparsity 1": (["tiny:bert", "--sparsity", "1"], "0<=x<1"),
        "sparsity negative": (["tiny:bert", "--sparsity", "-0.1"], "0<=x<1"),
        "N >= M": (["tiny:llama", "--method", "nm", "--nm", "4:4"], "0 < N < M"),
        "every head": (["tiny:bert", "--method", "heads", "--sparsity", "0.9"], "all 4 heads"),
        "every layer": (["tiny:llama", "--method", "layers", "--sparsity", "0.8"],
                        "all 2 layers"),
        "wanda without calib": (["tiny:llama", "--method", "wanda"], "--calib"),
        "importance without calib": (["tiny:bert", "--method", "heads", "--importance",
                                      "calibration"], "--calib"),
        "family": (["tiny:gpt2", "--method", "heads"], "bert, vit, clip, llama"),
        "option for another method": (["tiny:bert", "--method", "heads", "--nm", "2:4"],
                                      "--nm does not apply"),
    }
    for name, (args, needle) in cases.items():
        result = run_cli("prune", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert not (tmp_path / "out").exists()


def test_a_head_pruned_bert_stays_loadable_after_fine_tuning(tmp_path):
    pruned = run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "prune", "method": "heads", "sparsity": 0.5}]}, tmp_path / "p")["artifact"]
    tuned = run_recipe({"model": pruned, "max_samples": 16, "steps": [
        {"step": "finetune", "method": "full", "max_steps": 2}]}, tmp_path / "f")["artifact"]
    assert (tmp_path / "f" / "mmkit_prune.json").is_file()
    a, b = load_model(pruned), load_model(tuned)
    assert sum(p.numel() for p in a.model.parameters()) == \
        sum(p.numel() for p in b.model.parameters())
    logits(b)
