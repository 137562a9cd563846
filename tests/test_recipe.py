"""Recipes: safe YAML, clear errors naming the step and line, chains checked before any step
runs. (The shipped recipes are run by test_shipped_recipes.py.)"""

import pytest

from mmkit.core.errors import InputError
from mmkit.core.recipe import load_recipe, parse_recipe, run_recipe
from mmkit.core.registry import all_methods, get_method, methods_for


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_step_names_the_steps(tmp_path):
    path = _write(tmp_path, "model: tiny:bert\nsteps:\n  - step: distill\n")
    with pytest.raises(InputError, match="Unknown recipe step 'distill'.*quantize"):
        parse_recipe(load_recipe(path))


def test_unknown_step_key_names_step_line_and_allowed_keys(tmp_path):
    path = _write(tmp_path, "model: tiny:bert\nsteps:\n  - step: cast\n    dtype: fp16\n"
                            "  - step: cast\n    dtpye: bf16\n")
    with pytest.raises(InputError) as err:
        parse_recipe(load_recipe(path), where=str(path))
    msg = str(err.value)
    assert "step 2 (line 5)" in msg and "unknown key 'dtpye'" in msg and "dtype" in msg


def test_bad_value_and_unknown_recipe_key(tmp_path):
    with pytest.raises(InputError, match="'dtype'"):
        parse_recipe({"steps": [{"step": "cast", "dtype": "int3"}]})
    with pytest.raises(InputError, match="unknown key 'modle'"):
        parse_recipe({"modle": "tiny:bert"})
    with pytest.raises(InputError, match="needs a 'step' key"):
        parse_recipe({"steps": [{"dtype": "fp16"}]})
    with pytest.raises(InputError, match="Unknown cast method"):
        parse_recipe({"steps": [{"step": "cast", "method": "nope"}]})


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "model: tiny:bert\nsteps: [\n  - step: cast\n")
    with pytest.raises(InputError, match="not valid YAML at line"):
        load_recipe(path)


def test_yaml_is_safe_loaded(tmp_path):
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_recipe(path)


def test_every_step_has_methods_and_an_unknown_one_lists_them():
    from mmkit.core.registry import STEPS

    assert {m.step for m in all_methods()} == set(STEPS)
    assert get_method("extract").name == "subnet"  # the step's default
    with pytest.raises(InputError, match="Unknown extract method 'nope'. Methods: subnet"):
        get_method("extract", "nope")


def test_registry_lists_methods_by_kind():
    assert {m.step for m in all_methods()} >= {"cast"}
    assert get_method("cast") in methods_for("vision")


CHAINS = {
    "compressing an adapter that cannot be merged": (
        [{"step": "finetune", "method": "prompt", "max_steps": 1, "max_length": 64},
         {"step": "quantize", "method": "rtn", "bits": 8}], "is not a weight change"),
    "pruning quantized weights": (
        [{"step": "quantize", "method": "rtn", "bits": 8}, {"step": "prune"}], "quantize last"),
    "quantizing twice": (
        [{"step": "quantize", "method": "rtn", "bits": 8},
         {"step": "quantize", "method": "rtn", "bits": 4}], "quantized already"),
    "an adapter on an adapter": (
        [{"step": "finetune", "method": "lora", "max_steps": 1},
         {"step": "finetune", "method": "ia3", "max_steps": 1}], "merge: true"),
}


@pytest.mark.parametrize("name", CHAINS)
def test_a_chain_that_cannot_work_is_refused_before_the_first_step(name, tmp_path, monkeypatch):
    from mmkit.core import registry

    steps, needle = CHAINS[name]
    ran = []
    registry.all_methods()
    for key, method in list(registry._REGISTRY.items()):  # record any step that runs
        monkeypatch.setitem(registry._REGISTRY, key, registry.Method(
            method.step, method.name, method.config,
            lambda loaded, cfg, ctx, m=method: ran.append(m.name) or m.apply(loaded, cfg, ctx),
            method.summary, method.kinds, method.needs_data, method.hint, method.load_options))
    with pytest.raises(InputError, match=needle):
        run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": steps}, tmp_path / "o")
    assert ran == [] and not (tmp_path / "o").exists()


def test_a_lora_then_quantize_chain_merges_and_runs(tmp_path):
    result = run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 1},
        {"step": "quantize", "method": "rtn", "bits": 8}]}, tmp_path / "o")
    assert result["steps"][1]["report"]["merged_adapter_first"]


def test_an_adapter_run_through_no_step_is_copied_onto_its_own_base(tmp_path):
    """With no step, the adapter is written as it came: it must sit on the adapter's base (an
    adapter on an adapter does not load) and keep its training's record."""
    import torch

    from mmkit.core.loading import load_model
    from mmkit.core.refs import read_manifest

    adapter = tmp_path / "lora"
    run_recipe({"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 1}]}, adapter)
    copy = tmp_path / "copy"
    run_recipe({"model": str(adapter), "max_samples": 16, "steps": []}, copy)
    made, copied = read_manifest(adapter), read_manifest(copy)
    assert copied["parent"]["ref"] == made["parent"]["ref"] == "tiny:bert"
    assert [s["method"] for s in copied["steps"]] == ["lora"]
    first, second = (load_model(p, "text-classification") for p in (adapter, copy))
    batch = first.tokenizer(["a fine day", "not good"], return_tensors="pt", padding=True)
    torch.testing.assert_close(second.model(**batch).logits, first.model(**batch).logits)


def test_errors_name_recipe_keys_in_recipes_and_flags_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from mmkit.cli.main import cli

    recipe = _write(tmp_path, "model: tiny:bert\nsteps:\n  - {step: prune, method: wanda}\n")
    from_file = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "a")])
    assert from_file.exit_code == 2 and "set calib:" in from_file.stderr
    assert "calib_samples" in from_file.stderr and "--calib" not in from_file.stderr
    typed = CliRunner().invoke(cli, ["prune", "tiny:bert", "--method", "wanda", "-o",
                                     str(tmp_path / "b")])
    assert typed.exit_code == 2 and "pass --calib" in typed.stderr
    assert "--calib-samples" in typed.stderr and "calib_samples" not in typed.stderr
