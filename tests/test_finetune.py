"""finetune: the method x family matrix, save/load, merge, resume, and bad input."""

import copy
import dataclasses
import json

import pytest
import torch

from conftest import TINY, TINY_DATA, logits, row_problems, run_cli, with_rows
from mmkit.core.artifacts import write_artifact
from mmkit.core.data import load_data
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model, peek
from mmkit.core.recipe import run_recipe
from mmkit.core.registry import Context, build_config, get_method
from mmkit.core.tasks import get_task

# One row per registered finetune method; a method without one fails
# test_every_registered_finetune_method_has_a_row. The matrix runs each method on every tiny
# family whose kind the method registers.
#   trains: "adapter" (the backbone stays frozen, only the adapter and a new task head move)
#           or "everything" (most base weights change)
#   merge_and_unload: a peft model whose merge_and_unload() gives the plain model back
FINETUNE = {
    ("finetune", "lora"): {"trains": "adapter", "merge_and_unload": True},
    ("finetune", "dora"): {"trains": "adapter", "merge_and_unload": True},
    ("finetune", "adalora"): {"trains": "adapter", "merge_and_unload": True},
    ("finetune", "vera"): {"trains": "adapter", "merge_and_unload": True},
    ("finetune", "ia3"): {"trains": "adapter", "merge_and_unload": True},
    ("finetune", "prompt"): {"trains": "adapter", "merge_and_unload": False},
    ("finetune", "prefix"): {"trains": "adapter", "merge_and_unload": False},
    ("finetune", "adaptformer"): {"trains": "adapter", "merge_and_unload": False},  # mmkit's own
    ("finetune", "vpt"): {"trains": "adapter", "merge_and_unload": False},
    ("finetune", "svfit"): {"trains": "adapter", "merge_and_unload": False},  # merges its own way
    # CLIP prompt learning (tests/test_clip_prompts.py: prompts against longhand forwards)
    ("finetune", "coop"): {"trains": "adapter", "merge_and_unload": False},
    ("finetune", "maple"): {"trains": "adapter", "merge_and_unload": False},
    ("finetune", "full"): {"trains": "everything", "merge_and_unload": False},
    # elastic slices the blocks of BERT, ViT, CLIP and Llama (tests/test_elastic.py: the rest)
    ("finetune", "elastic"): {"trains": "everything", "merge_and_unload": False,
                              "skip": ("tiny:gpt2",)},
    # distils from the run's input model (here: the model before training, as the teacher)
    ("finetune", "distill"): {"trains": "everything", "merge_and_unload": False},
}
KIND = {ref: peek(ref)[2] for ref in TINY}  # text-encoder, vision, clip, causal-lm
CASES = [(m.name, ref) for m, row in with_rows("finetune", FINETUNE) for ref in TINY
         if KIND[ref] in m.kinds and ref not in row.get("skip", ())]
MERGEABLE = [m.name for m, row in with_rows("finetune", FINETUNE) if row["merge_and_unload"]]


def test_every_registered_finetune_method_has_a_row():
    problems = row_problems("finetune", FINETUNE, "FINETUNE in tests/test_finetune.py")
    assert not problems, "\n".join(problems)


def _applies(method, ref):
    return KIND[ref] in get_method("finetune", method).kinds


def _train(method, ref, tmp_path, **params):
    task = peek(ref)[3]
    ds = load_data(TINY_DATA[ref], task, max_samples=16)
    labels = None if task.startswith("zero-shot") else ds.label_names
    loaded = load_model(ref, task, labels)
    before = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    m = get_method("finetune", method)
    cfg = build_config(m, {"max_steps": 3, "batch_size": 4, "max_length": 32, "lr": 1e-2,
                           **params}, "test")
    watch = _TrainedWatcher()
    teacher = dataclasses.replace(copy.deepcopy(loaded), fresh_head=False)
    ctx = Context(dataset=ds, workdir=tmp_path / "ckpt", fingerprint="t", callbacks=[watch],
                  origin=teacher)
    loaded = m.apply(loaded, cfg, ctx)
    ctx.report["moved"] = watch.moved
    return loaded, before, ctx.report


class _TrainedWatcher:
    """A TrainerCallback noting which trainable tensors actually moved during training."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Watcher(TrainerCallback):
            moved: list = []

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.start = {n: p.detach().clone() for n, p in model.named_parameters()
                              if p.requires_grad}

            def on_step_end(self, args, state, control, model=None, **kwargs):
                self.moved = [n for n, p in model.named_parameters()
                              if n in self.start and not torch.equal(p, self.start[n])]

        return Watcher()


def _base_params(model):
    """Base weights by their plain names (peft's wrappers and adapter weights stripped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, value in base.state_dict().items():
        if any(t in name for t in ("lora_", "vera_", "ia3_", "modules_to_save", "magnitude",
                                   "mmkit_")):
            continue
        out[name.replace(".base_layer", "").replace(".original_module", "")] = value
    return out


@pytest.mark.parametrize("method,ref", CASES, ids=[f"{m}-{r[5:]}" for m, r in CASES])
def test_method_trains_only_what_it_should_and_round_trips(method, ref, tmp_path):
    loaded, before, report = _train(method, ref, tmp_path)
    assert torch.isfinite(torch.tensor(report["train_loss"]))
    assert 0 < report["trainable_parameters"] <= report["total_parameters"]
    base = _base_params(loaded.model)
    changed = [k for k, v in base.items() if k in before and not torch.equal(v, before[k])]
    head = ("classifier", "score")
    if FINETUNE[("finetune", method)]["trains"] == "everything":
        assert len(changed) > len(base) // 2
    else:  # the backbone is frozen; only a new task head may move
        assert all(k.split(".")[0] in head or ".classifier." in k for k in changed), changed
        assert report["trainable_parameters"] < report["total_parameters"]
        # the adapter itself learned: a trainable tensor outside any task head moved
        adapter_moved = [n for n in report["moved"]
                         if not any(h in n for h in ("classifier", "score", "modules_to_save"))]
        assert adapter_moved, report["moved"]
    expected = logits(loaded)
    out = write_artifact(loaded, tmp_path / "art", recipe={"model": ref, "seed": 0}, steps=[],
                         metrics=[], fmt=loaded.extra.get("format", "hf-model"))
    reloaded = load_model(str(out))
    assert torch.allclose(logits(reloaded), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", MERGEABLE)
@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:llama", "tiny:vit"])
def test_merged_equals_unmerged(method, ref, tmp_path):
    if not _applies(method, ref):
        pytest.skip("method does not apply")
    loaded, _, _ = _train(method, ref, tmp_path)
    unmerged = logits(loaded)
    loaded.model = loaded.model.merge_and_unload()
    assert type(loaded.model).__name__.startswith(("Bert", "Llama", "ViT"))
    assert torch.allclose(logits(loaded), unmerged, atol=1e-4)


def test_merge_option_writes_a_plain_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 2, "merge": True}]}, tmp_path / "m")
    plain = AutoModelForSequenceClassification.from_pretrained(result["artifact"])
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_peft_artifact_opens_with_plain_peft(tmp_path):
    import peft

    result = run_recipe({"model": "tiny:bert", "max_samples": 16, "seed": 0, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 2, "lr": 1e-2}]}, tmp_path / "a")
    base = load_model("tiny:bert", labels=["negative", "positive"], seed=0).model
    model = peft.PeftModel.from_pretrained(base, result["artifact"]).eval()
    ours = load_model(result["artifact"])
    batch = get_task("text-classification").dummy_batch(ours, 2, 10)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, ours.model(**batch).logits, atol=1e-6)


def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path):
    from transformers import TrainerCallback

    recipe = {"model": "tiny:bert", "max_samples": 48, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 3, "batch_size": 8, "lr": 5e-3}]}
    straight = run_recipe(recipe, tmp_path / "straight")

    class Interrupt(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "cut", callbacks=[Interrupt()])
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.checkpoints").is_dir()
    resumed = run_recipe(recipe, tmp_path / "cut", resume=True)
    # the interrupt came before epoch 2 was saved: the run resumes from epoch 1 (step 6)
    assert resumed["steps"][0]["report"]["resumed_from"].endswith("checkpoint-6")
    assert not (tmp_path / "cut.checkpoints").exists()
    a = load_model(straight["artifact"])
    b = load_model(resumed["artifact"])
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.allclose(pa, pb, atol=1e-6), na


def test_resume_from_the_last_step_trains_nothing_and_says_so(tmp_path):
    """Killed after the last checkpoint but before the model was written: resuming trains no
    step, writes the same weights, and reports no loss or speed rather than 0.0."""
    from transformers import TrainerCallback

    recipe = {"model": "tiny:bert", "max_samples": 32, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 1, "batch_size": 8, "lr": 5e-3}]}

    class Interrupt(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    straight = run_recipe(recipe, tmp_path / "straight")["steps"][0]["report"]
    assert straight["steps_this_run"] == straight["steps"] > 0
    assert straight["train_loss"] > 0 and straight["train_samples_per_second"] > 0
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "cut", callbacks=[Interrupt()])
    resumed = run_recipe(recipe, tmp_path / "cut", resume=True)
    report = resumed["steps"][0]["report"]
    assert report["resumed_from"].endswith(f"checkpoint-{straight['steps']}")
    assert report["steps_this_run"] == 0 and report["steps"] == straight["steps"]
    assert report["train_loss"] is None and report["train_samples_per_second"] is None
    a, b = load_model(str(tmp_path / "straight")), load_model(resumed["artifact"])
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert na == nb and torch.allclose(pa, pb, atol=1e-6), na
    from mmkit.cli.finetune import _human

    assert "none left to train" in _human(resumed)


def test_resume_refuses_another_runs_checkpoints(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:  # epoch 1's checkpoint is saved by now
                raise KeyboardInterrupt

    recipe = {"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 3}]}
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, tmp_path / "o", callbacks=[Stop()])
    assert (tmp_path / "o.checkpoints").is_dir()
    recipe["steps"][0]["epochs"] = 5
    with pytest.raises(InputError, match="different run"):
        run_recipe(recipe, tmp_path / "o", resume=True)
    with pytest.raises(InputError, match="no checkpoints"):
        run_recipe(recipe, tmp_path / "never", resume=True)


# ---------------------------------------------------------------- CLI
def test_cli_finetune_json(tmp_path):
    result = run_cli("finetune", "tiny:gpt2", "--lora", "--r", 4, "--max-steps", 2,
                     "--max-samples", 4, "--max-length", 32, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    rep = row["steps"][0]["report"]
    assert rep["steps"] == 2 and row["steps"][0]["params"]["r"] == 4
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_cli_finetune_bad_input(tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "\n".join(f"t{i},pos" for i in range(10)))
    cases = {
        "option for another method": (["tiny:bert", "--ia3", "--r", "4"], "--r does not apply"),
        "targets match nothing": (["tiny:bert", "--target-modules", "q_proj,v_proj",
                                   "--max-samples", "8"], "query"),
        "prompt on vision": (["tiny:vit", "--prompt"], "--vpt"),
        "bits 3": (["tiny:llama", "--bits", "3"], "'3' is not one of"),
        "single class": (["tiny:bert", "--data", one_class], "two classes"),
        "resume without checkpoints": (["tiny:bert", "--resume"], "no checkpoints"),
        "merge prompt": (["tiny:bert", "--prompt", "--merge"], "cannot be merged"),
        "merge adaptformer": (["tiny:bert", "--adaptformer", "--merge"], "cannot be merged"),
        "vpt on text": (["tiny:bert", "--vpt"], "--prompt or --prefix"),
        "bottleneck for lora": (["tiny:bert", "--bottleneck", "8"], "--bottleneck does not apply"),
        "deep for svfit": (["tiny:bert", "--svfit", "--deep"], "--deep does not apply"),
        "keep sparsity of a dense model": (["tiny:bert", "--full", "--keep-sparsity",
                                            "--max-samples", "8"], "no sparse layers"),
    }
    for name, (args, needle) in cases.items():
        result = run_cli("finetune", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()


@pytest.mark.slow
def test_minilm_adapter_artifact_loads_back(tmp_path):
    # a real base folder: its own files must not be checked against the adapter's manifest
    result = run_recipe({"model": "minilm", "max_samples": 8, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 1}]}, tmp_path / "a")
    loaded = load_model(result["artifact"])
    assert loaded.labels == ["negative", "positive"] and loaded.source.kind == "artifact"


@pytest.mark.parametrize("bits,layer,bnb_cpu_path", [
    (4, "Linear4bit", "generic"), (4, "Linear4bit", "avx512bf16"), (8, "Linear8bitLt", None)],
    indirect=["bnb_cpu_path"])
def test_qlora_trains_on_a_quantized_base_and_reloads_on_one(bits, layer, bnb_cpu_path,
                                                             tmp_path):
    from mmkit.core.evaluate import evaluate

    recipe = {"model": "tiny:llama", "data": "bbc-text", "max_samples": 4, "steps": [
        {"step": "finetune", "method": "lora", "bits": bits, "max_steps": 2, "lr": 1e-2,
         "max_length": 32}], "eval": {"max_length": 32}}
    result = run_recipe(recipe, tmp_path / "q")
    report = result["steps"][0]["report"]
    assert report["base_bits"] == bits and torch.isfinite(torch.tensor(report["train_loss"]))
    reloaded = load_model(result["artifact"])
    base = reloaded.model.get_base_model()
    assert type(base.model.layers[0].self_attn.q_proj.base_layer).__name__ == layer
    assert type(base.lm_head).__name__ == "Linear"  # heads stay in full precision
    again = evaluate(reloaded, load_data("bbc-text", "causal-lm", max_samples=4), max_length=32)
    assert again["perplexity"] == pytest.approx(result["metrics"][0]["perplexity"], rel=1e-5)


def test_qlora_must_be_the_first_step(tmp_path):
    recipe = {"model": "tiny:llama", "steps": [
        {"step": "cast", "dtype": "fp32"},
        {"step": "finetune", "method": "lora", "bits": 4}]}
    with pytest.raises(InputError, match="must be the first step"):
        run_recipe(recipe, tmp_path / "q")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_cuda(tmp_path):
    result = run_recipe({"model": "tiny:llama", "data": "bbc-text", "max_samples": 4, "steps": [
        {"step": "finetune", "method": "lora", "bits": 4, "max_steps": 2}]}, tmp_path / "q",
        device="cuda")
    assert result["steps"][0]["report"]["device"].startswith("cuda")
