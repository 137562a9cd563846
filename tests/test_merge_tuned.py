"""The merges that choose or learn on data: greedy soup, lambda auto and aTLAS, on stand-in
fine-tunes whose scores are known by construction (a head bias decides the predicted class),
checked against evaluations and weights computed another way."""

import json

import pytest
import torch

from conftest import read_manifest, run_cli
from mmkit.compression.merge.tuned import few_shot
from mmkit.core.data import align_labels, load_data
from mmkit.core.evaluate import evaluate
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from test_merge import _finetune_copy, _state

TWEETS = ["negative", "positive"]  # tweets-sentiment's validation split is mostly negative
BBC = ["business", "entertainment", "politics", "sports", "tech"]


def _with_bias(ref, out, seed, bias, labels=TWEETS):
    """A stand-in fine-tune whose classifier bias is `bias` (it dominates the logits)."""
    path = _finetune_copy(ref, out, seed, labels=labels)
    loaded = load_model(path)
    with torch.no_grad():
        loaded.model.classifier.bias.copy_(torch.tensor(bias))
    from mmkit.core.artifacts import write_artifact

    write_artifact(loaded, out, recipe={"model": ref}, steps=[], metrics=[], overwrite=True)
    return path


def _validation_accuracy(ref, data="tweets-sentiment"):
    loaded = load_model(ref, labels=load_data(data, "text-classification").label_names)
    dataset = load_data(data, "text-classification", max_samples=60)
    return evaluate(loaded, dataset, "validation")["accuracy"]


def test_greedy_soup_keeps_what_helps_and_never_loses_to_the_best_single(tmp_path):
    good = _with_bias("tiny:bert", tmp_path / "good", 1, [10.0, 0.0])  # the majority class
    bad = _with_bias("tiny:bert", tmp_path / "bad", 2, [0.0, 30.0])  # the minority class
    also = _with_bias("tiny:bert", tmp_path / "also", 3, [12.0, 0.0])
    singles = {m: _validation_accuracy(m) for m in (good, bad, also)}
    assert singles[good] > singles[bad]
    result = run_recipe({"model": good, "data": "tweets-sentiment", "max_samples": 60,
                         "steps": [{"step": "merge", "method": "greedy-soup",
                                    "models": [bad, good, also]}]}, tmp_path / "soup")
    report = result["steps"][0]["report"]
    assert report["single"] == pytest.approx(singles, abs=1e-5)
    assert report["ingredients"] == [good, also]  # bad drags the soup to the minority class
    assert [t["added"] for t in report["trail"]] == [True, False]
    soup = result["artifact"]
    assert _validation_accuracy(soup) == pytest.approx(report["soup_score"], abs=1e-5)
    assert report["soup_score"] >= max(singles.values())
    merged, a, c = _state(soup), _state(good), _state(also)
    assert max((merged[k] - (a[k] + c[k]) / 2).abs().max().item() for k in a
               if a[k].is_floating_point()) <= 1e-6


def test_lambda_auto_picks_the_best_scale_on_validation_and_applies_it(tmp_path):
    base = _with_bias("tiny:bert", tmp_path / "base", 1, [0.0, 4.0])
    tuned = _with_bias("tiny:bert", tmp_path / "tuned", 2, [8.0, -4.0])
    result = run_recipe({"model": base, "data": "tweets-sentiment", "max_samples": 60,
                         "steps": [{"step": "merge", "method": "task-arithmetic",
                                    "models": [tuned], "lambda": "auto"}]}, tmp_path / "m")
    report = result["steps"][0]["report"]
    grid = {row["lambda"]: row["mean"] for row in report["lambda_auto"]["grid"]}
    # the bias is [8 lam, 4 - 8 lam] + small terms: the majority class wins from lam ~0.25 on
    assert grid[0.1] < grid[0.3] and report["lambda"] == report["lambda_auto"]["chosen"]
    assert grid[report["lambda"]] == max(grid.values())
    assert report["lambda"] == min(lam for lam, v in grid.items() if v == max(grid.values()))
    assert _validation_accuracy(result["artifact"]) == pytest.approx(grid[report["lambda"]], abs=1e-5)
    merged, b, t = _state(result["artifact"]), _state(base), _state(tuned)
    lam = report["lambda"]
    assert max((merged[k] - (b[k] + lam * (t[k] - b[k]))).abs().max().item() for k in b
               if b[k].is_floating_point()) <= 1e-5
    assert read_manifest(result["artifact"])["steps"][0]["params"]["lambda"] == "auto"


def _few_shot_loss(ref, data, seed=0, shots=4):
    """Cross-entropy of a saved model on the few-shot examples aTLAS draws, by plain
    forward passes (the head fitting the data)."""
    dataset = load_data(data, "text-classification", max_samples=40, seed=seed)
    loaded = load_model(ref, labels=dataset.label_names)
    align_labels(dataset, loaded.labels)
    train = dataset.split("train")
    picked = few_shot(dataset, shots, seed)
    enc = loaded.tokenizer([train.inputs[i] for i in picked], truncation=True, max_length=128,
                           padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**enc).logits
    return torch.nn.functional.cross_entropy(logits,
                                             torch.tensor([train.labels[i] for i in picked]))


def test_atlas_learns_coefficients_that_beat_task_arithmetic_on_its_few_shot_data(tmp_path):
    tweets = _finetune_copy("tiny:bert", tmp_path / "tweets", 1, scale=0.05)
    news = _finetune_copy("tiny:bert", tmp_path / "news", 2, labels=BBC, scale=0.05)
    data = "tweets-sentiment,bbc-news"
    common = ["--base", "tiny:bert", "--max-samples", 40]
    ta = run_cli("merge", tweets, news, "--method", "task-arithmetic", "--lambda", 0.3,
                 *common, "-o", tmp_path / "ta")
    assert ta.exit_code == 0, ta.output
    r = run_cli("merge", tweets, news, "--method", "atlas", "--data", data, "--shots", 4,
                "--steps", 15, "--lr", 0.1, *common, "-o", tmp_path / "atlas", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["steps"][0]["report"]
    assert report["few_shot_loss"]["end"] < report["few_shot_loss"]["start"]
    for task in ("tweets-sentiment", "bbc-news"):  # per task, measured another way
        assert _few_shot_loss(str(tmp_path / "atlas"), task) < _few_shot_loss(str(tmp_path / "ta"), task)
    # the weights are base + sum_i c_ib tau_ib with the reported coefficients
    merged = _state(str(tmp_path / "atlas"))
    base = load_model("tiny:bert", labels=TWEETS).model.state_dict()
    taus = {m: {k: v - base[k] for k, v in _state(m).items() if "classifier" not in k}
            for m in (tweets, news)}
    table = report["coefficients_per_block"]
    for name in table[tweets]:
        want = base[name] + sum(table[m][name] * taus[m][name] for m in (tweets, news))
        assert (merged[name] - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item())
    assert len({round(v, 3) for v in table[tweets].values()}) > 1  # block-wise, not one scale


@pytest.mark.parametrize("args, needle", [
    (["--method", "atlas"], "give --data"),
    (["--method", "greedy-soup"], "give --data"),
    (["--method", "task-arithmetic", "--lambda", "auto"], "give --data"),
    (["--method", "linear", "--lambda", "auto", "--data", "tweets-sentiment"],
     "does not apply to --method linear"),
    (["--method", "ties", "--lambda", "x"], "give a number"),
    (["--method", "atlas", "--data", "tweets-sentiment", "--shots", 0], "--shots"),
    (["--method", "atlas", "--data", "tweets-sentiment,nope.csv"], "nope.csv"),
])
def test_bad_data_driven_merges_exit_2_before_writing(args, needle, tmp_path):
    a = _finetune_copy("tiny:bert", tmp_path / "a", 1)
    b = _finetune_copy("tiny:bert", tmp_path / "b", 2)
    r = run_cli("merge", a, b, "--base", "tiny:bert", *args, "-o", tmp_path / "out")
    assert r.exit_code == 2 and needle in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_greedy_soup_refuses_models_of_different_tasks(tmp_path):
    a = _finetune_copy("tiny:bert", tmp_path / "a", 1)
    b = _finetune_copy("tiny:bert", tmp_path / "b", 2, labels=BBC)
    r = run_cli("merge", a, b, "--method", "greedy-soup", "--data", "tweets-sentiment",
                "--max-samples", 20, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "one task" in r.output, r.output
    assert not (tmp_path / "out").exists()
