"""The shipped recipes and search spaces: every `recipes/*.yaml` runs through `mmkit run` on a
tiny model, every `recipes/spaces/*.yaml` through `mmkit search`, and each output loads. A new
file is picked up by the globs and fails until it has a tiny-model mapping below."""

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import read_manifest, run_cli

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SPACES = sorted((ROOT / "recipes" / "spaces").glob("*.yaml"))
SAMPLES = 24  # examples per split in every tiny run (`mmkit run --max-samples`)

# How each recipe runs on a tiny model: the `mmkit run` arguments beside --max-samples.
# {tweets} and {tweets_b} are tiny:bert fine-tunes standing in for the fine-tunes a recipe
# starts from (its comment says how a user makes the real ones).
TINY_RUN = {
    "fp16-eval.yaml": ["--model", "tiny:bert"],
    "lora-merge-int8.yaml": ["--model", "tiny:bert"],
    "qlora-smollm2.yaml": ["--model", "tiny:llama"],
    "gptq-4bit-smollm2.yaml": ["--model", "tiny:llama"],
    "prune-distill-int8.yaml": ["--model", "{tweets}"],
    "merge-int8.yaml": ["--model", "tiny:bert", "--set", "merge.models=[{tweets}, {tweets_b}]"],
    "elastic-minilm.yaml": ["--model", "tiny:bert"],
    "vit-digits-compress.yaml": ["--model", "tiny:vit", "--set", "finetune.epochs=2"],
}
# How each search space is searched on a tiny model: MODEL and the options it needs.
# {elastic}: the output of elastic-minilm.yaml's tiny run.
TINY_SEARCH = {
    "encoder.yaml": ["tiny:bert"],
    "causal-lm.yaml": ["tiny:llama", "--data", "bbc-text", "--objectives",
                       "perplexity,latency,size"],
    "elastic.yaml": ["{elastic}"],
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Models the tests make once: the stand-in fine-tunes, then each recipe's output."""
    from mmkit.core.recipe import run_recipe

    root = tmp_path_factory.mktemp("shipped")
    found = {"root": root}
    for name, lr in (("tweets", 1e-3), ("tweets_b", 5e-4)):
        run_recipe({"model": "tiny:bert", "data": "tweets-sentiment", "max_samples": SAMPLES,
                    "steps": [{"step": "finetune", "method": "full", "max_steps": 2,
                               "lr": lr}]}, root / name)
        found[name] = str(root / name)
    return found


def run_shipped(path: Path, made: dict) -> dict:
    """`mmkit run RECIPE` on its tiny model (once per module): the output and the result."""
    if path.name in made:
        return made[path.name]
    if path.name not in TINY_RUN:
        pytest.fail(f"recipes/{path.name} has no tiny-model mapping: add it to TINY_RUN in "
                    f"{Path(__file__).name}")
    out = made["root"] / path.stem
    args = [a.format(**made) for a in TINY_RUN[path.name]]
    result = run_cli("run", path, *args, "--max-samples", SAMPLES, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    made[path.name] = {"out": out, "result": json.loads(result.stdout.splitlines()[-1])}
    return made[path.name]


def test_every_recipe_and_space_has_a_tiny_mapping():
    recipes, spaces = {p.name for p in RECIPES}, {p.name for p in SPACES}
    assert recipes - set(TINY_RUN) == set(), "recipes without a tiny-model mapping (TINY_RUN)"
    assert spaces - set(TINY_SEARCH) == set(), "spaces without a tiny-model mapping"
    assert set(TINY_RUN) - recipes == set() and set(TINY_SEARCH) - spaces == set(), \
        "mappings of files that no longer exist"
    assert len(RECIPES) >= 8 and len(SPACES) >= 3


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_a_tiny_model_and_its_output_loads(path, made):
    recipe = yaml.safe_load(path.read_text())
    out = run_shipped(path, made)["out"]
    manifest = read_manifest(out)
    named = [(s["step"], s.get("method")) for s in recipe["steps"]]
    done = [(s["step"], s["method"]) for s in manifest["steps"]]
    assert [s for s, _ in done] == [s for s, _ in named]
    assert all(m is None or m == d for (_, m), (_, d) in zip(named, done)), (named, done)
    if recipe.get("eval") is not None:
        assert manifest["metrics"] and manifest["metrics"][0]["split"] == recipe["eval"]["split"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["steps"]  # re-runnable
    again = run_cli("eval", out, "--max-samples", SAMPLES, "--json")  # it loads
    assert again.exit_code == 0, again.output
    metrics = json.loads(again.stdout.splitlines()[-1])
    assert "accuracy" in metrics or "perplexity" in metrics


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_search_space_searches_a_tiny_model(path, made):
    if path.name not in TINY_SEARCH:
        pytest.fail(f"recipes/spaces/{path.name} has no tiny-model mapping: add it to "
                    f"TINY_SEARCH in {Path(__file__).name}")
    if "{elastic}" in TINY_SEARCH[path.name]:
        made["elastic"] = str(run_shipped(ROOT / "recipes" / "elastic-minilm.yaml", made)["out"])
    args = [a.format(**made) for a in TINY_SEARCH[path.name]]
    out = made["root"] / f"search-{path.stem}"
    result = run_cli("search", *args, "--space", path, "--trials", 3, "--sampler", "random",
                     "--max-samples", SAMPLES, "--seq-len", 16, "--export", "best", "-o", out,
                     "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["trials_completed"] >= 2
    space = yaml.safe_load(path.read_text())["knobs"]
    for trial in json.loads((out / "pareto.json").read_text())["evaluated"]:
        assert set(trial["params"]) == set(space)  # the file's knobs, and its values only
        assert all(v in space[k] for k, v in trial["params"].items()), trial["params"]
    assert run_cli("eval", out / "best", "--max-samples", SAMPLES).exit_code == 0


@pytest.mark.parametrize("path", RECIPES + SPACES, ids=lambda p: p.stem)
def test_each_file_says_what_it_is_for_how_to_run_it_and_what_it_measured(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    rel = path.relative_to(ROOT).as_posix()
    if path.parent.name == "spaces":
        assert f"mmkit search" in header and f"--space {rel}" in header
    else:
        assert f"mmkit run {rel}" in header
        assert re.search(r"Measured\b", header) and "PENDING" not in header
    assert len(header.splitlines()) >= 3  # what it is for, beside the command


def test_readme_lists_every_shipped_recipe_and_space():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Recipes", 1)[1].split("\n## ", 1)[0]
    for path in RECIPES + SPACES:
        assert f"`{path.relative_to(ROOT).as_posix()}`" in section, path.name


# ---------------------------------------------------------------- mmkit run's overrides
def test_set_changes_recipe_keys_and_step_parameters(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:bert\nmax_samples: 500\nsteps:\n"
                      "  - {step: prune, method: magnitude, sparsity: 0.1}\n"
                      "  - {step: cast, dtype: float16}\n")
    result = run_cli("run", recipe, "--max-samples", 12, "--set", "1.sparsity=0.5",
                     "--set", "cast.dtype=bfloat16", "--set", "eval.split=validation",
                     "--no-cache", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())
    assert written["max_samples"] == 12 and written["steps"][0]["sparsity"] == 0.5
    assert written["steps"][1]["dtype"] == "bfloat16"
    metrics = read_manifest(tmp_path / "o")["metrics"][0]
    assert metrics["split"] == "validation" and metrics["examples"] <= 12


@pytest.mark.parametrize("change,needle", [
    ("sparsity", "expected KEY=VALUE"),
    ("3.sparsity=0.5", "has no step 3. Its steps: 1 prune"),
    ("quantize.bits=4", "has no quantize step"),
    ("nope=1", "not a recipe key"),
    ("prune.step=cast", "cannot be changed"),
    ("prune.sparsity=[", "not valid YAML"),
    ("prune.sparsity=2", "'sparsity'"),  # the method's own check, naming the key
    ("prune.sparsty=0.5", "unknown key 'sparsty'"),
])
def test_a_bad_set_exits_2_naming_the_fix(change, needle, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:bert\nsteps:\n  - {step: prune, method: magnitude}\n")
    result = run_cli("run", recipe, "--set", change, "-o", tmp_path / "o")
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_a_value_set_twice_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:bert\nsteps:\n  - {step: cast, dtype: float16}\n")
    result = run_cli("run", recipe, "--max-samples", 5, "--set", "max_samples=6",
                     "-o", tmp_path / "o")
    assert result.exit_code == 2 and "'max_samples' is set twice" in result.stderr
