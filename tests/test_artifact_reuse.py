"""Later commands on an artifact: they default to the data it was made with, keep its head,
merge an adapter before compressing it, and nothing opens it silently wrong."""

import json

import pytest

from conftest import read_manifest, run_cli
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """A 3-class CSV (not the bundled 2-class tweets) and a LoRA adapter trained on it."""
    root = tmp_path_factory.mktemp("three")
    data = root / "moods.csv"
    words = {"sad": "awful terrible bad", "meh": "fine okay average", "glad": "great lovely good"}
    rows = [f"{words[c].split()[i % 3]} day number {i},{c}" for i in range(90)
            for c in [("sad", "meh", "glad")[i % 3]]]
    data.write_text("review,mood\n" + "\n".join(rows) + "\n")
    adapter = root / "lora"
    run_recipe({"model": "tiny:bert", "data": str(data), "text_column": "review",
                "label_column": "mood", "seed": 5, "steps": [
                    {"step": "finetune", "method": "lora", "max_steps": 4, "lr": 1e-2}]}, adapter)
    return {"data": data, "adapter": adapter}


def test_eval_defaults_to_the_data_columns_and_split_the_artifact_was_made_with(three_class):
    result = run_cli("eval", three_class["adapter"], "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["data_info"]["source"] == str(three_class["data"])
    assert row["data_info"]["seed"] == 5 and row["data_info"]["label_column"] == "mood"
    assert not row["fresh_head"] and "new one was created" not in result.stderr
    made = read_manifest(three_class["adapter"])["data"]
    assert row["data_info"]["split_sha256"] == made["split_sha256"]  # the same held-out test


def test_a_quantized_artifact_keeps_defaulting_to_that_data(three_class, tmp_path):
    result = run_cli("quantize", three_class["adapter"], "--bits", "8", "--eval", "-o",
                  tmp_path / "q", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["steps"][0]["report"]["merged_adapter_first"]  # the LoRA adapter was merged
    assert "merged the adapter" in result.stderr
    again = json.loads(run_cli("eval", tmp_path / "q", "--json").stdout)
    assert again["data_info"]["source"] == str(three_class["data"])
    assert again["accuracy"] == row["metrics"][0]["accuracy"]


def test_data_the_head_cannot_take_is_refused(three_class):
    result = run_cli("eval", three_class["adapter"], "--data", "tweets-sentiment")
    assert result.exit_code == 2
    assert "cannot take" in result.stderr and str(three_class["adapter"]) in result.stderr


def test_the_artifacts_data_gone_is_a_clear_error(three_class, tmp_path):
    import shutil

    moved = tmp_path / "copy"
    shutil.copytree(three_class["adapter"], moved)
    manifest = json.loads((moved / "mmkit.json").read_text())
    manifest["data"]["source"] = str(tmp_path / "gone.csv")
    (moved / "mmkit.json").write_text(json.dumps(manifest))
    result = run_cli("eval", moved)
    assert result.exit_code == 2 and "no longer exists" in result.stderr


@pytest.mark.parametrize("method", ["prompt", "adaptformer"])
def test_adapters_that_are_not_weight_changes_are_not_merged(method, tmp_path):
    adapter = tmp_path / "a"
    run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": method, "max_steps": 1, "max_length": 64}]}, adapter)
    result = run_cli("prune", adapter, "-o", tmp_path / "p")
    assert result.exit_code == 2 and "cannot be merged" in result.stderr
    assert not (tmp_path / "p").exists()


def test_a_pruned_lora_merge_keeps_its_zeros_when_quantized(tmp_path):
    sparse = tmp_path / "sparse"
    run_recipe({"model": "tiny:llama", "steps": [{"step": "prune", "sparsity": 0.5}]}, sparse)
    adapter = tmp_path / "lora"
    run_recipe({"model": str(sparse), "max_samples": 4, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 2, "lr": 1e-2,
         "max_length": 32}]}, adapter)
    result = run_recipe({"model": str(adapter), "steps": [{"step": "prune", "method":
                                                           "magnitude", "sparsity": 0.5}]},
                        tmp_path / "again")
    assert result["steps"][0]["report"]["merged_adapter_first"]
    assert result["steps"][0]["report"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_plain_transformers_cannot_open_rtn_weights_as_random_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_recipe({"model": "tiny:llama", "steps": [{"step": "quantize", "method": "rtn"}]},
                     tmp_path / "q")["artifact"]
    with pytest.raises(OSError):  # it finds no weights it knows, rather than random ones
        AutoModelForCausalLM.from_pretrained(out)
    assert load_model(out).extra["format"] == "mmkit-quantized"


def test_trust_remote_code_reaches_the_tokenizer_and_processor(tiny_artifacts, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_model(str(tiny_artifacts["tiny:bert"]), trust_remote_code=True)
    load_model(str(tiny_artifacts["tiny:bert"]))
    assert seen == [True, False]


def test_a_manifest_naming_files_outside_is_refused(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(tiny_artifacts["tiny:gpt2"], copy)
    manifest = json.loads((copy / "mmkit.json").read_text())
    manifest["files"]["/etc/hostname"] = {"sha256": "0", "bytes": 1}
    (copy / "mmkit.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="outside its own folder"):
        load_model(str(copy))


def test_ptq_prints_its_result(tmp_path):
    result = run_cli("quantize", "tiny:vit", "--bits", "8", "--method", "ptq", "--calib", "digits",
                  "--calib-samples", "8", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    assert "simulated W8A8" in result.stdout


def test_lora_with_keep_sparsity_trains_the_adapter_and_keeps_only_the_bases_zeros(tmp_path):
    sparse = tmp_path / "sparse"
    run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "prune", "sparsity": 0.5}]}, sparse)
    zeros = {n: (p == 0) for n, p in load_model(str(sparse)).model.named_parameters()
             if p.dim() == 2 and float((p == 0).float().mean()) > 0.4}
    out = run_recipe({"model": str(sparse), "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 3, "lr": 1e-2,
         "keep_sparsity": True}]}, tmp_path / "a")["artifact"]
    model = load_model(out).model
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(float(p.abs().sum()) > 0 for p in b)  # every B matrix learned
    assert zeros
    result = run_recipe({"model": str(sparse), "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 3, "lr": 1e-2, "merge": True,
         "keep_sparsity": True}]}, tmp_path / "m")
    merged = dict(load_model(result["artifact"]).model.named_parameters())
    assert all(bool((merged[n][mask] == 0).all()) for n, mask in zeros.items())


def test_save_steps_checkpoints_and_evaluates_every_n_steps(tmp_path):
    result = run_recipe({"model": "tiny:bert", "max_samples": 32, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 1, "batch_size": 4,
         "save_steps": 3}]}, tmp_path / "s")
    history = result["steps"][0]["report"]["validation_history"]
    assert len(history) >= 2 and not (tmp_path / "s.checkpoints").exists()


def test_inspect_tells_what_an_artifact_is_and_what_applies(three_class, tmp_path):
    from mmkit.core.inspect import inspect_model

    lora = inspect_model(load_model(str(three_class["adapter"])))
    assert lora["adapter"]["method"] == "lora" and lora["adapter"]["r"] == 16
    assert not any(m.startswith("finetune:") for m in lora["methods"])  # no adapter on adapter
    assert "quantize:rtn" in lora["methods"]  # merged first
    assert not any("lora" in layer["name"] for layer in lora["linear_layers"])
    shapes = {(g["suffix"], g["shape"]) for g in lora["linear_groups"]}
    assert {("dense", "32->64"), ("dense", "64->32")} <= shapes  # one group per shape
    plain = inspect_model(load_model("tiny:llama"))
    out = run_recipe({"model": "tiny:llama", "steps": [{"step": "quantize", "method": "rtn"}]},
                     tmp_path / "q")["artifact"]
    quantized = inspect_model(load_model(out))
    assert quantized["parameters"] == plain["parameters"]  # packed layers count in full
    assert quantized["weights_mb"] < plain["weights_mb"]
    assert not any(m.startswith(("quantize:", "prune:")) for m in quantized["methods"])


@pytest.mark.parametrize("method,stored", [("rtn", "int4"), ("dynamic-int8", "int8")])
def test_inspect_counts_quantized_layers_by_type_and_dtype(tmp_path, method, stored):
    """A quantized layer's weights live outside its parameters (mmkit's codes, in buffers):
    the breakdowns by module type and dtype count them at their logical size, so that both
    add up to the parameter total."""
    from mmkit.core.inspect import inspect_model

    steps = [{"step": "quantize", "method": method, **({"bits": 4} if method == "rtn" else {})}]
    out = run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": steps},
                     tmp_path / "q")["artifact"]
    plain, report = inspect_model(load_model("tiny:bert", labels=["a", "b"])), \
        inspect_model(load_model(out))
    assert report["parameters"] == plain["parameters"]
    assert sum(report["dtypes"].values()) == report["parameters"]
    assert sum(report["parameters_by_module_type"].values()) == report["parameters"]
    linear = sum(layer["in"] * layer["out"] for layer in plain["linear_layers"]
                 if not layer["name"].startswith("classifier"))  # the head stays float
    assert report["dtypes"][stored] == linear
    quant_types = {k for k in report["parameters_by_module_type"] if k != "Linear"} - set(
        plain["parameters_by_module_type"])
    assert quant_types and sum(report["parameters_by_module_type"][k] for k in quant_types) \
        >= linear
