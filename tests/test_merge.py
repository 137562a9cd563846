"""merge: each method through a recipe on every tiny family against the tensor math applied
longhand, identities (identical models, one task vector at lambda 1), LoRA / rsLoRA / SVFit
inputs against their own merges, `mmkit merge ADAPTER`, task heads of other tasks, a merge
followed by quantize, and bad input on the command line."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, TINY_DATA, read_manifest, run_cli
from mmkit.compression.merge import tensors as tm
from mmkit.compression.merge.apply import tensor_seed
from mmkit.core.artifacts import write_artifact
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.train import tied_duplicates

LABELS = {"tiny:bert": ["negative", "positive"], "tiny:vit": [str(i) for i in range(10)]}
METHODS = {  # method -> the step's extra parameters (the defaults elsewhere)
    "linear": {"weights": [0.7, 0.3]},
    "task-arithmetic": {"weights": [1.0, 0.5], "lambda": 0.6},
    "ties": {"density": 0.3},
    "dare-linear": {"density": 0.6, "lambda": 0.8},
    "dare-ties": {"density": 0.6, "rescale": "l1", "tie": "positive"},
    "slerp": {"t": 0.3},
}


def _finetune_copy(ref, out, seed, labels=None, scale=0.02, task=None):
    """A stand-in fine-tune of `ref`: its weights plus seeded noise, saved as an artifact."""
    loaded = load_model(ref, task, labels=labels or LABELS.get(ref))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in loaded.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    write_artifact(loaded, out, recipe={"model": ref}, steps=[], metrics=[])
    return str(out)


def _state(ref):
    return {k: v for k, v in load_model(str(ref)).model.state_dict().items()}


def _merge(base, models, out, method="linear", data=None, **params):
    recipe = {"model": base, "max_samples": 8,
              "steps": [{"step": "merge", "method": method, "models": models, **params}]}
    if data:
        recipe["data"] = data
    return run_recipe(recipe, out)


def _expected(method, params, base, inputs, names, seed=0):
    """The merged tensors computed longhand from whole state dicts with `tensors`."""
    w = params.get("weights", [1.0] * len(inputs))
    lam, density = params.get("lambda", 1.0), params.get("density")
    if method == "linear":
        w = [x / sum(w) for x in w]
    cuts = None
    if method == "ties":
        cuts = [tm.magnitude_threshold([tm.task_vectors(base[n], [x[n]])[0] for n in names],
                                       density) for x in inputs]
    out = {}
    for n in names:
        xs = [x[n] for x in inputs]
        if method == "linear":
            out[n] = tm.linear(xs, w)
        elif method == "task-arithmetic":
            out[n] = tm.task_arithmetic(base[n], xs, w, lam)
        elif method == "ties" and params.get("trim_scope") == "tensor":
            out[n] = tm.ties(base[n], xs, w, lam, density)
        elif method == "ties":
            out[n] = tm.ties(base[n], xs, w, lam, density, trim_scope="model", threshold=cuts)
        elif method.startswith("dare"):
            extra = {"then": "linear"} if method == "dare-linear" else {
                "then": "ties", "tie": params.get("tie", "zero")}
            generator = torch.Generator().manual_seed(tensor_seed(seed, n))
            out[n] = tm.dare(base[n], xs, w, lam, density, generator,
                             rescale=params.get("rescale", "inverse"), **extra)
        else:
            out[n] = tm.slerp(xs[0], xs[1], params["t"])
    return out


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """Two stand-in fine-tunes of each tiny family."""
    root = tmp_path_factory.mktemp("finetunes")
    return {ref: [_finetune_copy(ref, root / f"{ref[5:]}-{s}", s) for s in (1, 2)]
            for ref in TINY}


@pytest.mark.parametrize("ref", TINY)
def test_each_method_matches_the_tensor_math_longhand(ref, finetunes, tmp_path):
    base = load_model(ref, labels=LABELS.get(ref)).model.state_dict()
    tied = set(tied_duplicates(base))
    names = [n for n, t in base.items() if t.is_floating_point() and n not in tied]
    # the base's head is new (untrained): the models' heads are averaged, not task vectors
    heads = [n for n in names if n.startswith(("classifier.", "score."))]
    names = [n for n in names if n not in heads]
    inputs = [_state(path) for path in finetunes[ref]]
    for method, params in METHODS.items():
        result = _merge(ref, finetunes[ref], tmp_path / method, method, TINY_DATA[ref], **params)
        report = result["steps"][0]["report"]
        assert report["tensors_merged"] == len(names)
        assert set(report["inputs"].values()) == {"file"}
        merged = _state(result["artifact"])
        expected = _expected(method, params, base, inputs, names)
        expected.update({n: (inputs[0][n] + inputs[1][n]) / 2 for n in heads})
        worst = max((merged[n] - expected[n]).abs().max().item() for n in expected)
        assert worst <= 1e-6, f"{ref} {method}: {worst}"
        moved = max((merged[n] - base[n]).abs().max().item() for n in names)
        assert moved > 1e-3, f"{ref} {method} left the base as it was"
        for dup in tied:  # a tied tensor is merged once and still shared
            assert torch.equal(merged[dup], merged["transformer.wte.weight"])
        manifest = read_manifest(result["artifact"])
        assert manifest["format"] == "hf-model" and manifest["steps"][0]["method"] == method


@pytest.mark.parametrize("method, params", [
    ("linear", {"weights": [0.7, 0.3]}), ("task-arithmetic", {"lambda": 0.6}),
    ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "trim_scope": "tensor"})])
def test_large_tensors_merge_block_by_block_to_the_same_result(method, params, finetunes,
                                                                tmp_path, monkeypatch):
    from mmkit.compression.merge import apply

    monkeypatch.setattr(apply, "CHUNK_ENTRIES", 100)  # every matrix of tiny:bert in blocks
    assert apply.blocks((260, 32)) is not None
    base = load_model("tiny:bert", labels=LABELS["tiny:bert"]).model.state_dict()
    names = [n for n, t in base.items() if t.is_floating_point() and "classifier" not in n]
    result = _merge("tiny:bert", finetunes["tiny:bert"], tmp_path / "m", method, **params)
    merged = _state(result["artifact"])
    expected = _expected(method, params, base, [_state(p) for p in finetunes["tiny:bert"]],
                         names)
    assert max((merged[n] - expected[n]).abs().max().item() for n in names) <= 1e-6


def test_the_recipe_records_lambda_and_runs_again(finetunes, tmp_path):
    import yaml

    from mmkit.core.recipe import load_recipe

    first = _merge("tiny:bert", finetunes["tiny:bert"], tmp_path / "a", "task-arithmetic",
                   **{"lambda": 0.4})
    recipe = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert recipe["steps"][0]["lambda"] == 0.4 and "lam" not in recipe["steps"][0]
    again = run_recipe(load_recipe(tmp_path / "a" / "recipe.yaml"), tmp_path / "b")
    a, b = _state(first["artifact"]), _state(again["artifact"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, params", [
    ("linear", {}), ("slerp", {"t": 0.3}), ("task-arithmetic", {"weights": [0.5, 0.5]}),
    ("ties", {"density": 1.0, "trim_scope": "tensor"}),
    ("dare-linear", {"density": 1.0, "weights": [0.5, 0.5]}), ("dare-ties", {"density": 1.0})])
def test_merging_identical_models_returns_the_model(method, params, finetunes, tmp_path):
    a = finetunes["tiny:bert"][0]
    result = _merge("tiny:bert", [a, a], tmp_path / "m", method, **params)
    merged, want = _state(result["artifact"]), _state(a)
    assert max((merged[k] - want[k]).abs().max().item() for k in want
               if want[k].is_floating_point()) <= 1e-6


def test_task_vectors_need_models_made_from_the_base(finetunes, tmp_path):
    """The recorded lineages decide: a model whose lineage starts from another seed of the
    tiny model (other starting weights) than the base's is refused as a task vector against
    it; a fine-tune of a fine-tune of the base starts where the base does."""
    a = finetunes["tiny:bert"][0]
    loaded = load_model("tiny:bert", labels=LABELS.get("tiny:bert"), seed=1)
    other = write_artifact(loaded, tmp_path / "seed1", recipe={"model": "tiny:bert", "seed": 1},
                           steps=[], metrics=[])
    refused = run_cli("merge", a, other, "--base", "tiny:bert", "--method", "ties", "-o",
                      tmp_path / "no")
    assert refused.exit_code == 2 and "'tiny:bert' (seed 1)" in refused.stderr, refused.stderr
    assert "(seed 0)" in refused.stderr and not (tmp_path / "no").exists()
    grandchild, sibling = _finetune_copy(a, tmp_path / "grandchild", 3), finetunes["tiny:bert"][1]
    done = run_cli("merge", grandchild, sibling, "--base", "tiny:bert", "--method",
                   "task-arithmetic", "-o", tmp_path / "from-root")
    assert done.exit_code == 0, done.stderr
    done = run_cli("merge", grandchild, "--base", a, "--method", "task-arithmetic", "-o",
                   tmp_path / "from-parent")
    assert done.exit_code == 0, done.stderr
    # linear and slerp average weights: no base to descend from, nothing refused
    assert run_cli("merge", a, other, "-o", tmp_path / "mean").exit_code == 0


def test_a_pickled_model_merges_only_with_allow_pickle(finetunes, tmp_path):
    """--allow-pickle reaches the models merged, not only the base: a fine-tune kept as
    pytorch_model.bin merges with it, and is refused (exit 2) without it."""
    import shutil

    from safetensors.torch import load_file

    a, b = finetunes["tiny:bert"]
    pickled = tmp_path / "pickled"
    shutil.copytree(b, pickled)
    for name in ("model.safetensors", "mmkit.json"):
        (pickled / name).unlink()
    torch.save(load_file(str(Path(b) / "model.safetensors")), pickled / "pytorch_model.bin")
    refused = run_cli("merge", a, pickled, "-o", tmp_path / "no")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "no").exists()
    done = run_cli("merge", a, pickled, "--allow-pickle", "-o", tmp_path / "yes")
    assert done.exit_code == 0, done.stderr
    want = _state(_merge("tiny:bert", [a, b], tmp_path / "ref")["artifact"])
    merged = _state(tmp_path / "yes")
    assert all(torch.allclose(merged[k], want[k]) for k in want if want[k].is_floating_point())


@pytest.mark.parametrize("ref", ["tiny:gpt2", "tiny:vit"])
def test_task_arithmetic_with_one_model_and_lambda_1_returns_it(ref, finetunes, tmp_path):
    a = finetunes[ref][0]
    result = _merge(ref, [a], tmp_path / "m", "task-arithmetic", TINY_DATA[ref], **{"lambda": 1})
    merged, want = _state(result["artifact"]), _state(a)
    assert max((merged[k] - want[k]).abs().max().item() for k in want
               if want[k].is_floating_point()) <= 1e-6


def test_heads_of_another_task_are_kept_beside_the_main_one(finetunes, tmp_path):
    """Onto a base folder (which would stream) two fine-tunes of its task and one of another:
    the two heads are averaged into the model's head, the other is kept apart."""
    other = _finetune_copy("tiny:bert", tmp_path / "other", 3, labels=["a", "b", "c"])
    a, a2 = finetunes["tiny:bert"]
    result = _merge(a, [a, a2, other], tmp_path / "m", "linear")
    heads = result["steps"][0]["report"]["heads"]
    assert heads["main"] == {"labels": ["negative", "positive"], "from": [a, a2]}
    assert heads["extra"] == {"other": {"labels": ["a", "b", "c"], "from": [other]}}
    merged, base, base2, b = _state(result["artifact"]), _state(a), _state(a2), _state(other)
    assert torch.allclose(merged["classifier.weight"],
                          (base["classifier.weight"] + base2["classifier.weight"]) / 2)
    body = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(merged[body], (base[body] + base2[body] + b[body]) / 3, atol=1e-7)
    # the extra head is a plain HF model: the merged backbone, the other model's head
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m/heads/other")
    assert plain.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(plain.classifier.weight, b["classifier.weight"])
    assert torch.equal(plain.state_dict()[body], merged[body])
    # mmkit loads the head whose labels fit the data; the main head otherwise
    assert load_model(result["artifact"], labels=["c", "a"]).labels == ["a", "b", "c"]
    assert load_model(result["artifact"]).labels == ["negative", "positive"]
    with pytest.raises(InputError, match="cannot take"):
        load_model(result["artifact"], labels=["z"])


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:vit"])
def test_a_base_without_a_head_takes_the_first_models_head_and_keeps_the_others(ref, tmp_path):
    """Heads of three models, two tasks: the first task's two heads are averaged into the
    model's head (resized from the base's fresh one), the other task's head is kept apart."""
    first = ["x", "y", "z"] if ref == "tiny:llama" else [str(i) for i in range(4)]
    task = "text-classification" if ref == "tiny:llama" else None
    models = [_finetune_copy(ref, tmp_path / f"t1-{s}", s, first, task=task) for s in (1, 2)]
    models.append(_finetune_copy(ref, tmp_path / "t2", 3, ["p", "q"], task=task))
    result = _merge(ref, models, tmp_path / "m", "task-arithmetic", **{"lambda": 0.5})
    heads = result["steps"][0]["report"]["heads"]
    assert heads["main"]["labels"] == first and list(heads["extra"]) == ["t2"]
    states = [_state(m) for m in models]
    head = "score.weight" if ref == "tiny:llama" else "classifier.weight"
    merged = load_model(result["artifact"])
    assert merged.labels == first and not merged.fresh_head
    assert torch.allclose(merged.model.state_dict()[head], (states[0][head] + states[1][head]) / 2)
    other = load_model(result["artifact"], labels=["q"])
    assert torch.equal(other.model.state_dict()[head], states[2][head])


# ---------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """LoRA (plain and rsLoRA) on tiny:bert, LoRA on GPT-2 (Conv1D), SVFit on tiny:bert, and
    the LoRA run again with merge: true."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, ref, step in (
            ("lora", "tiny:bert", {"method": "lora", "r": 4}),
            ("lora-merged", "tiny:bert", {"method": "lora", "r": 4, "merge": True}),
            ("rslora", "tiny:bert", {"method": "lora", "r": 4, "alpha": 4, "rslora": True}),
            ("gpt2", "tiny:gpt2", {"method": "lora", "r": 4}),
            ("svfit", "tiny:bert", {"method": "svfit", "r": 4})):
        run_recipe({"model": ref, "data": TINY_DATA[ref], "max_samples": 16, "seed": 0,
                    "steps": [{"step": "finetune", "max_steps": 2, "lr": 0.05,
                               "max_length": 32, **step}]}, root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("name, ref", [("lora", "tiny:bert"), ("rslora", "tiny:bert"),
                                       ("gpt2", "tiny:gpt2"), ("svfit", "tiny:bert")])
def test_one_adapter_at_weight_1_and_lambda_1_is_its_own_merge(name, ref, adapters, tmp_path):
    result = _merge(ref, [adapters[name]], tmp_path / "m", "task-arithmetic", TINY_DATA[ref],
                    weights=[1.0], **{"lambda": 1.0})
    kind = result["steps"][0]["report"]["inputs"][adapters[name]]
    assert kind == ("memory" if name == "svfit" else "lora")
    merged = _state(result["artifact"])
    loaded = load_model(adapters[name])
    if name == "svfit":
        from mmkit.adapters import svfit

        svfit.merge(loaded.model)
        want = loaded.model.state_dict()
    else:
        want = loaded.model.merge_and_unload().state_dict()
    base = load_model(ref, labels=LABELS.get(ref)).model.state_dict()
    floats = [k for k in want if want[k].is_floating_point()]
    assert max((merged[k] - want[k]).abs().max().item() for k in floats) <= 1e-6
    assert max((want[k] - base[k]).abs().max().item() for k in floats) > 1e-3  # it trained


def test_merge_adapter_command_equals_finetune_merge(adapters, tmp_path):
    result = run_cli("merge", adapters["lora"], "--max-samples", "8", "-o", tmp_path / "m",
                     "--json")
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["steps"][0]["report"]["adapter_kind"] == "lora"
    assert read_manifest(tmp_path / "m")["format"] == "hf-model"
    merged, want = _state(tmp_path / "m"), _state(adapters["lora-merged"])
    assert set(merged) == set(want)
    assert max((merged[k] - want[k]).abs().max().item() for k in want
               if want[k].is_floating_point()) <= 1e-6


def test_linear_takes_an_adapter_of_another_base_as_the_model_it_makes(adapters, finetunes,
                                                                     tmp_path):
    a = finetunes["tiny:bert"][0]
    result = _merge(a, [a, adapters["lora"]], tmp_path / "m", "linear")
    assert result["steps"][0]["report"]["inputs"][adapters["lora"]] == "memory"
    lora = load_model(adapters["lora"]).model.merge_and_unload().state_dict()
    merged, full = _state(result["artifact"]), _state(a)
    assert max((merged[k] - (full[k] + lora[k]) / 2).abs().max().item() for k in full
               if full[k].is_floating_point()) <= 1e-6


def _folded(ref):
    """A model's weights with its adapter folded in (peft's merge_and_unload)."""
    from mmkit.adapters.merging import merge_adapter_

    loaded = load_model(str(ref))
    merge_adapter_(loaded, "test")
    return loaded.model.state_dict()


@pytest.mark.parametrize("how", ["cat", "svd"])
def test_as_adapter_equals_the_full_weight_merge(adapters, how, tmp_path):
    """One LoRA adapter from two (rsLoRA, a negative weight): folded into the base it gives
    the full-weight task-arithmetic merge, computed by the streaming path from each adapter's
    exact delta."""
    pair = [adapters["lora"], adapters["rslora"]]
    args = ["--base", "tiny:bert", "--method", "task-arithmetic", "--lambda", 0.7,
            "--weights", "1,-0.5"]
    r = run_cli("merge", *pair, *args, "--as-adapter", how, *(["--rank", 8] if how == "svd"
                                                              else []), "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert f"as one {how} adapter of tiny:bert (max rank 8" in r.output
    assert read_manifest(tmp_path / "a")["format"] == "peft-adapter"
    full = run_cli("merge", *pair, *args, "--max-samples", 8, "-o", tmp_path / "f")
    assert full.exit_code == 0, full.output
    got, want = _folded(tmp_path / "a"), _state(tmp_path / "f")
    body = [k for k in want if want[k].is_floating_point() and "classifier" not in k]
    assert max((got[k] - want[k]).abs().max().item() for k in body) <= 1e-5


def test_one_adapter_with_weight_1_as_adapter_reproduces_it(adapters, tmp_path):
    r = run_cli("merge", adapters["rslora"], "--base", "tiny:bert", "--method", "linear",
                "--as-adapter", "svd", "-o", tmp_path / "a")
    assert r.exit_code == 0, r.output
    got, want = _folded(tmp_path / "a"), _folded(adapters["rslora"])
    assert max((got[k] - want[k]).abs().max().item() for k in want
               if want[k].is_floating_point()) <= 1e-6


@pytest.mark.parametrize("extra, needle", [
    (["--method", "ties", "--as-adapter", "cat"], "--as-adapter"),
    (["--method", "linear", "--as-adapter", "cat", "--rank", 2], "--rank sets the rank"),
    (["--method", "task-arithmetic", "--lambda", "auto", "--as-adapter", "cat", "--data",
      "tweets-sentiment"], "give a number with --as-adapter"),
])
def test_bad_as_adapter_requests_exit_2(adapters, extra, needle, tmp_path):
    r = run_cli("merge", adapters["lora"], adapters["rslora"], "--base", "tiny:bert", *extra,
                "-o", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_as_adapter_refuses_a_full_model_among_the_inputs(adapters, finetunes, tmp_path):
    r = run_cli("merge", adapters["lora"], finetunes["tiny:bert"][0], "--base", "tiny:bert",
                "--method", "linear", "--as-adapter", "cat", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "not a plain LoRA adapter" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_two_lora_adapters_merge_with_ties(adapters, tmp_path):
    result = _merge("tiny:bert", [adapters["lora"], adapters["rslora"]], tmp_path / "m", "ties",
                    density=0.5)
    assert set(result["steps"][0]["report"]["inputs"].values()) == {"lora"}
    heads = result["steps"][0]["report"]["heads"]  # the base's head is untrained: averaged
    assert heads["main"]["from"] == [adapters["lora"], adapters["rslora"]] and not heads["extra"]


# ---------------------------------------------------------------- recipes


def test_a_merge_step_then_quantize_in_one_recipe(finetunes, tmp_path):
    result = run_recipe({"model": "tiny:llama", "max_samples": 8, "steps": [
        {"step": "merge", "method": "dare-ties", "models": finetunes["tiny:llama"]},
        {"step": "quantize", "method": "rtn", "bits": 8}], "eval": {}}, tmp_path / "q")
    assert [s["step"] for s in result["steps"]] == ["merge", "quantize"]
    assert read_manifest(tmp_path / "q")["format"] == "mmkit-quantized"
    assert result["metrics"][0]["perplexity"] > 0
    load_model(str(tmp_path / "q"))


def test_recipe_mistakes_name_the_key(finetunes, tmp_path):
    a, b = finetunes["tiny:bert"]
    for params, said in (({"models": [a, b], "weights": [1.0]}, "1 weights for 2 models"),
                         ({"models": [a], "method": "slerp"}, "exactly two models"),
                         ({"models": [a, b], "method": "ties", "density": 0}, "'density'"),
                         ({"models": [a, b], "method": "ties", "lam": "x"}, "lam")):
        step = {"step": "merge", "method": "linear", **params}
        with pytest.raises(InputError, match=said):
            run_recipe({"model": "tiny:bert", "steps": [step]}, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def misfits(tmp_path_factory):
    """BERT models whose FFN width or vocabulary differs from tiny:bert's."""
    from mmkit.core.tiny import tiny_config
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("misfits")
    out = {}
    for name, change in (("ffn", {"intermediate_size": 48}), ("vocab", {"vocab_size": 300})):
        config = tiny_config("bert")
        for key, value in change.items():
            setattr(config, key, value)
        config.num_labels = 2
        config.id2label, config.label2id = {0: "negative", 1: "positive"}, {
            "negative": 0, "positive": 1}
        BertForSequenceClassification(config).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def test_merge_command_human_line_and_eval(finetunes, tmp_path):
    a, b = finetunes["tiny:bert"]
    result = run_cli("merge", a, b, "--base", "tiny:bert", "--method", "ties", "--lambda", "0.5",
                     "--density", "0.3", "--eval", "--max-samples", "8", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "ties of 2 models onto tiny:bert: 39 tensors merged, heads averaged" in result.stdout
    assert "test: accuracy" in result.stdout
    params = read_manifest(tmp_path / "m")["steps"][0]["params"]
    assert params["lambda"] == 0.5 and params["density"] == 0.3 and params["models"] == [a, b]


@pytest.mark.parametrize("case", ["ffn", "vocab", "other-base", "one", "weights", "density-0",
                                  "density-1.5", "t-2", "unknown", "no-base"])
def test_bad_input_exits_2_and_writes_nothing(case, finetunes, adapters, misfits, tmp_path):
    a, b = finetunes["tiny:bert"]
    args, said = {
        "ffn": ([a, misfits["ffn"]], "bert.encoder.layer.0.intermediate.dense.weight"),
        "vocab": ([a, misfits["vocab"]], "word_embeddings.weight"),
        "other-base": ([adapters["lora"], "--base", a, "--method", "task-arithmetic"],
                       "is an adapter of 'tiny:bert', not of the base"),
        "one": ([a], "merging needs two or more models, or one adapter"),
        "weights": ([a, b, "--weights", "0.5,0.3,0.2"], "3 weights for 2 MODELS"),
        "density-0": ([a, b, "--base", "tiny:bert", "--method", "ties", "--density", "0"],
                      "--density"),
        "density-1.5": ([a, b, "--base", "tiny:bert", "--method", "dare-linear", "--density",
                         "1.5"], "--density"),
        "t-2": ([a, b, "--method", "slerp", "--t", "2"], "--t"),
        "unknown": ([a, b, "--method", "average"], "--method"),
        "no-base": ([a, b, "--method", "ties"], "pass --base BASE"),
    }[case]
    result = run_cli("merge", *args, "--max-samples", "8", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_eval_of_a_multi_task_merge_uses_the_head_that_fits_the_data(tmp_path):
    bbc = ["business", "entertainment", "politics", "sports", "tech"]
    tweets = _finetune_copy("tiny:bert", tmp_path / "tweets", 1)
    news = _finetune_copy("tiny:bert", tmp_path / "news", 2, labels=bbc)
    out = tmp_path / "m"
    made = run_cli("merge", tweets, news, "--base", "tiny:bert", "--method", "ties", "-o", out)
    assert made.exit_code == 0, made.output
    assert "head news (business, entertainment, politics, sports) kept in heads/news" in made.output
    scores = {}
    for data in ("bbc-news", "tweets-sentiment"):
        r = run_cli("eval", out, "--data", data, "--max-samples", 20, "--json")
        assert r.exit_code == 0, r.output
        scores[data] = json.loads(r.stdout)
    assert scores["bbc-news"]["head"] == str(out / "heads" / "news")
    assert "head" not in scores["tweets-sentiment"]


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:gpt2"])
def test_a_streamed_merge_writes_what_the_in_memory_merge_computes(ref, finetunes, tmp_path,
                                                                   monkeypatch):
    """A one-step merge onto a base folder streams file to file (the base never loaded), in
    row blocks; the same recipe with an evaluation merges in memory: same tensors."""
    from mmkit.compression.merge import apply

    monkeypatch.setattr(apply, "CHUNK_ENTRIES", 300)  # the larger matrices in several blocks
    base = _finetune_copy(ref, tmp_path / "base", 7, scale=0.0)
    data = TINY_DATA[ref]
    streamed_paths = {m: METHODS[m] for m in ("linear", "ties", "dare-ties", "slerp")}
    for method, params in {**streamed_paths, "ties-tensor": {"density": 0.3,
                                                             "trim_scope": "tensor"}}.items():
        name = method.removesuffix("-tensor")
        streamed = _merge(base, finetunes[ref], tmp_path / f"s-{method}", name, **params)
        assert streamed["steps"][0]["report"].get("streamed") is True, method
        recipe = {"model": base, "data": data, "max_samples": 8, "eval": {"split": "test"},
                  "steps": [{"step": "merge", "method": name, "models": finetunes[ref],
                             **params}]}
        in_memory = run_recipe(recipe, tmp_path / f"m-{method}")
        assert "streamed" not in in_memory["steps"][0]["report"]
        got, want = _state(streamed["artifact"]), _state(in_memory["artifact"])
        worst = max((got[k] - want[k]).abs().max().item() for k in want
                    if want[k].is_floating_point())
        assert worst <= 1e-6, f"{ref} {method}: {worst}"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s-linear" / "model.safetensors"), "pt") as f, \
            safe_open(str(tmp_path / "base" / "model.safetensors"), "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())  # the base's own layout


@pytest.mark.parametrize("ref, names", [("tiny:bert", ["lora", "rslora"]),
                                        ("tiny:gpt2", ["gpt2"])])  # GPT-2: Conv1D layers
def test_lora_inputs_merge_the_same_in_row_blocks(ref, names, adapters, tmp_path, monkeypatch):
    from mmkit.compression.merge import apply

    models = [adapters[n] for n in names]
    whole = _state(_merge(ref, models, tmp_path / "w", "ties", density=0.5)["artifact"])
    monkeypatch.setattr(apply, "CHUNK_ENTRIES", 300)
    parts = _state(_merge(ref, models, tmp_path / "p", "ties", density=0.5)["artifact"])
    assert max((whole[k] - parts[k]).abs().max().item() for k in whole
               if whole[k].is_floating_point()) <= 1e-6


def test_scratch_files_of_a_killed_streamed_merge_are_removed_by_the_next_run(finetunes,
                                                                              tmp_path):
    """A streamed merge writes beside OUT under a staging name; killed (-9), it leaves that
    folder, which the next run on OUT removes. The finished run leaves no scratch behind."""
    from mmkit.core.outputs import scratch_folder

    base = _finetune_copy("tiny:gpt2", tmp_path / "base", 7, scale=0.0)
    out = tmp_path / "m"
    killed = scratch_folder(out)
    (killed / "model.safetensors").write_bytes(b"half a file")
    result = _merge(base, finetunes["tiny:gpt2"], out, "linear")
    assert result["steps"][0]["report"]["streamed"] is True
    assert not killed.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")) == []
