"""Elastic super-networks: reordering is an identity, a sliced sub-network equals the model
cut out of it, the sandwich rule's passes, the distillation loss against a longhand
reference, the artifact and its space round trip, and bad inputs."""

import copy
import json
import math
import random

import pytest
import torch
from conftest import logits, run_cli

from mmkit.compression.elastic.configs import ElasticConfig, ExtractConfig
from mmkit.compression.elastic.extract import extract_
from mmkit.compression.elastic.order import order_by_importance_
from mmkit.compression.elastic.training import Sampler, elastic_finetune
from mmkit.compression.elastic.widths import Cut, active, install_, kept, model_stacks, uninstall_
from mmkit.core.data import load_data
from mmkit.core.distill import distillation_loss
from mmkit.core.elastic_space import ELASTIC_FILE, ElasticSpace, StackSpace
from mmkit.core.artifacts import write_artifact
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.registry import Context
from mmkit.core.tasks import get_task

FAMILIES = {"tiny:bert": "text-classification", "tiny:vit": "image-classification",
            "tiny:llama": "causal-lm", "tiny:clip": "zero-shot-image-classification"}


def _load(ref):
    task = FAMILIES[ref]
    return load_model(ref, task, ["a", "b", "c"] if task.endswith("image-classification")
                      and not task.startswith("zero") or task == "text-classification" else None)


def _batch(loaded):
    return get_task(loaded.task).dummy_batch(loaded, 2, 12)


def _inputs(loaded):
    return {k: v for k, v in _batch(loaded).items() if k != "labels"}


def _space(loaded, stacks, drop_orders, depths):
    return ElasticSpace(mode="sampled", family=loaded.family,
                        space={"ffn": [0.25, 0.5, 1.0], "heads": [0.5, 1.0], "depth": depths},
                        stacks={s.name: StackSpace(layers=len(s.blocks), ffn=s.ffn,
                                                   kv_heads=s.kv_heads,
                                                   drop_order=drop_orders[s.name])
                                for s in stacks})


def _sliced_logits(loaded, cut, drop_orders):
    """A copy of the super-network run as the sub-network `cut`: its logits, and the copy's
    logits once the full network is restored."""
    supernet = copy.deepcopy(loaded)
    stacks = model_stacks(supernet)
    install_(stacks)
    with active(stacks, cut, drop_orders):
        sliced = logits(supernet)
    uninstall_(stacks)
    return sliced, logits(supernet)


@pytest.mark.parametrize("ref", FAMILIES)
def test_reordering_is_an_identity_and_extraction_equals_the_sliced_supernet(ref):
    loaded = _load(ref)
    with torch.no_grad():  # make the units' importance differ from their order
        for p in loaded.model.parameters():
            p.mul_(1 + torch.rand_like(p))
    before = logits(loaded)
    stacks = model_stacks(loaded)
    drop_orders = order_by_importance_(loaded.model, stacks, [_inputs(loaded)])
    assert torch.allclose(logits(loaded), before, atol=1e-5, rtol=1e-5)
    # the first neurons now score highest: the prefix keeps the important ones
    n = len(stacks[0].blocks)
    for depth in (n, n - 1):
        cut = Cut(0.25, 0.5, depth)
        sliced, restored = _sliced_logits(loaded, cut, drop_orders)
        assert torch.allclose(restored, before, atol=1e-5, rtol=1e-5)
        small = copy.deepcopy(loaded)
        small.extra["elastic"] = _space(small, stacks, drop_orders, [n - 1, n])
        ctx = Context()
        extract_(small, ExtractConfig(ffn=0.25, heads=0.5, depth=depth), ctx)
        assert torch.allclose(logits(small), sliced, atol=1e-6)
        assert ctx.report["parameters_after"] < ctx.report["parameters_before"]
        block = model_stacks(small, "test")[0].blocks[0]
        parts = model_stacks(small, "test")[0].parts
        assert block.get_submodule(parts["ffn_out"]).in_features == kept(stacks[0].ffn, 0.25)


def test_the_most_important_units_come_first():
    loaded = _load("tiny:bert")
    stacks = model_stacks(loaded)
    block = stacks[0].blocks[0]
    ffn_out = block.get_submodule("output.dense")
    with torch.no_grad():  # neuron 7 writes 100x more than any other: it must come first
        ffn_out.weight[:, 7] *= 100
    column = ffn_out.weight[:, 7].clone()
    order_by_importance_(loaded.model, stacks, [_inputs(loaded)])
    assert torch.equal(block.get_submodule("output.dense").weight[:, 0], column)


def test_per_layer_extraction_equals_the_sliced_supernet(tmp_path):
    loaded = _load("tiny:bert")
    stacks = model_stacks(loaded)
    drop_orders = order_by_importance_(loaded.model, stacks, [_inputs(loaded)])
    widths = {"ffn": [0.25, 1.0], "heads": [1.0, 0.5]}
    cut = Cut(per_layer={stacks[0].name: list(zip(widths["ffn"], widths["heads"]))})
    sliced, _ = _sliced_logits(loaded, cut, drop_orders)
    file = tmp_path / "widths.json"
    file.write_text(json.dumps(widths))
    loaded.extra["elastic"] = _space(loaded, stacks, drop_orders, [2])
    extract_(loaded, ExtractConfig(per_layer=str(file)), Context())
    assert torch.allclose(logits(loaded), sliced, atol=1e-6)
    assert loaded.extra["format"] == "mmkit-pruned"  # per-layer widths: the config cannot say


def test_sampler_sandwich_and_nested():
    sampled = Sampler("sampled", [0.25, 0.5, 1.0], [0.5, 1.0], [4, 5, 6], 2, seed=0)
    for _ in range(50):
        cuts = sampled.draw()
        assert cuts[0] == Cut(1.0, 1.0, 6) and cuts[1] == Cut(0.25, 0.5, 4) and len(cuts) == 4
        assert all(c not in (cuts[0], cuts[1]) for c in cuts[2:])
    nested = Sampler("nested", [0.25, 0.5, 1.0], [0.5, 1.0], [6], 1, seed=0)
    seen = set()
    for _ in range(200):
        cuts = nested.draw()
        assert cuts[0] == Cut(1.0, 1.0, 6) and len(cuts) == 2 and cuts[1] != cuts[0]
        seen.add(cuts[1])
    assert len(seen) == 3 * 2 - 1  # every other width choice is visited


def _longhand_kd(student, teacher, labels, alpha, t, causal):
    """The distillation loss written out with Python floats (float64)."""
    s, q, y = student.double().tolist(), teacher.double().tolist(), labels.tolist()
    if causal:  # position i predicts token i + 1
        rows = [(s[b][i], q[b][i], y[b][i + 1]) for b in range(len(s))
                for i in range(len(s[b]) - 1)]
    else:
        rows = list(zip(s, q, y))
    rows = [r for r in rows if r[2] != -100]

    def log_softmax(v, temp):
        m = max(x / temp for x in v)
        z = math.log(sum(math.exp(x / temp - m) for x in v)) + m
        return [x / temp - z for x in v]

    kl = ce = 0.0
    for st, te, label in rows:
        lp, lq = log_softmax(st, t), log_softmax(te, t)
        kl += sum(math.exp(b) * (b - a) for a, b in zip(lp, lq))
        ce -= log_softmax(st, 1.0)[label]
    return alpha * t * t * kl / len(rows) + (1 - alpha) * ce / len(rows)


@pytest.mark.parametrize("alpha,t", [(0.5, 1.0), (0.3, 2.5), (1.0, 4.0)])
def test_distillation_loss_against_longhand(alpha, t):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 2, 3])
    got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=t)
    assert got.item() == pytest.approx(_longhand_kd(student, teacher, labels, alpha, t, False),
                                       rel=1e-5)
    lm_s, lm_t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    tokens = torch.tensor([[1, 4, 2, 6, -100], [3, 3, 0, -100, -100]])
    got = distillation_loss(lm_s, lm_t, tokens, alpha=alpha, temperature=t, causal=True)
    assert got.item() == pytest.approx(_longhand_kd(lm_s, lm_t, tokens, alpha, t, True),
                                       rel=1e-5)
    # a student equal to its teacher pays only the labels' cross-entropy
    same = distillation_loss(student, student, labels, alpha=alpha, temperature=t)
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert same.item() == pytest.approx((1 - alpha) * ce.item(), abs=1e-6)


class _Widths:
    """Forward hooks noting, per training forward, the FFN width and depth that ran."""

    def __init__(self, loaded):
        self.passes = []
        stack = model_stacks(loaded)[0]
        self.blocks = stack.blocks
        self.first = stack.blocks[0].get_submodule(stack.parts["ffn_in"][0])
        self.first.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if module.training:
            self.passes.append((out.shape[-1], len(self.blocks)))


def test_sampled_training_runs_the_largest_and_the_smallest_every_step(tmp_path):
    ds = load_data("tweets-sentiment", "text-classification", max_samples=32)
    loaded = load_model("tiny:bert", "text-classification", ds.label_names)
    watch = _Widths(loaded)
    full_ffn, depth = model_stacks(loaded)[0].ffn, len(watch.blocks)
    cfg = ElasticConfig(mode="sampled", ffn=[0.25, 0.5, 1.0], heads=[0.5, 1.0], depth=[1, 2],
                        samples=1, max_steps=3, batch_size=8, max_length=32)
    ctx = Context(dataset=ds, workdir=tmp_path / "ckpt", fingerprint="t")
    elastic_finetune(loaded, cfg, ctx)
    steps = [watch.passes[i:i + 3] for i in range(0, len(watch.passes), 3)]
    assert len(steps) == 3 and all(len(s) == 3 for s in steps), watch.passes
    for largest, smallest, other in steps:
        assert largest == (full_ffn, depth) and smallest == (kept(full_ffn, 0.25), 1)
        assert other != largest
    assert type(model_stacks(loaded)[0].blocks[0].get_submodule("output.dense")) is \
        torch.nn.Linear  # the elastic layers are plain again
    assert ctx.report["elastic"]["passes_per_step"] == 3


def test_elastic_artifact_round_trips_and_extracts_from_the_cli(tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "super"
    r = run_cli("finetune", "tiny:bert", "--elastic", "nested", "--ffn", "0.5,1",
                "--heads", "0.5,1", "--data", "tweets-sentiment", "--max-samples", "32",
                "--max-steps", "2", "--batch-size", "8", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    space = json.loads((out / ELASTIC_FILE).read_text())
    assert space["mode"] == "nested" and space["space"]["ffn"] == [0.5, 1.0]
    assert space["space"]["depth"] == [2]  # nested trains widths only by default
    loaded = load_model(str(out))  # every command loads it as the full model
    assert loaded.extra["elastic"].space == space["space"]
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = _inputs(loaded)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, loaded.model(**batch).logits, atol=1e-6)
    small = tmp_path / "small"
    r = run_cli("extract", str(out), "--ffn", "0.5", "--heads", "0.5", "-o", str(small), "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)["steps"][0]["report"]
    assert report["parameters_after"] < report["parameters_before"]
    assert not (small / ELASTIC_FILE).exists()  # a sub-network is no super-network
    # a later step that changes the model drops the space too
    r = run_cli("quantize", str(out), "--bits", "8", "-o", str(tmp_path / "q"))
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "q" / ELASTIC_FILE).exists()


def test_uniform_vit_extraction_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForImageClassification

    loaded = _load("tiny:vit")
    stacks = model_stacks(loaded)
    drop_orders = order_by_importance_(loaded.model, stacks, [_inputs(loaded)])
    loaded.extra["elastic"] = _space(loaded, stacks, drop_orders, [1, 2])
    extract_(loaded, ExtractConfig(ffn=0.5, heads=0.5, depth=1), Context())
    expected = logits(loaded)
    path = write_artifact(loaded, tmp_path / "vit", recipe={"model": "tiny:vit"}, steps=[],
                          metrics=[], fmt=loaded.extra.get("format", "hf-model"))
    assert not (path / "mmkit_prune.json").exists()  # uniform ViT widths: the config says
    plain = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        got = plain(**_inputs(loaded)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert plain.config.intermediate_size == kept(stacks[0].ffn, 0.5)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    """A sampled elastic tiny:bert, trained for two steps."""
    out = tmp_path_factory.mktemp("elastic") / "super"
    run_recipe({"model": "tiny:bert", "data": "tweets-sentiment", "max_samples": 32,
                "steps": [{"step": "finetune", "method": "elastic", "mode": "sampled",
                           "max_steps": 2, "batch_size": 8, "depth": [1, 2]}]}, out)
    return out


def test_bad_inputs_exit_2_with_the_cause(supernet, tmp_path, tiny_artifacts):
    cases = [
        (["extract", str(tiny_artifacts["tiny:bert"]), "--ffn", "0.5"], "mmkit prune"),
        (["extract", str(supernet), "--ffn", "0.3"], "ffn 0.25,0.5,0.75,1"),
        (["extract", str(supernet), "--depth", "5"], "outside the space"),
        (["finetune", "tiny:bert", "--elastic", "nested", "--ffn", "0.25,0.5"],
         "must include 1"),
        (["finetune", "tiny:bert", "--elastic", "sampled", "--depth", "1,7", "--max-samples",
          "16", "--max-steps", "1"], "include 2"),
        (["finetune", "tiny:gpt2", "--elastic", "nested", "--max-samples", "16"],
         "gpt2 model"),
        (["finetune", "tiny:bert", "--elastic", "nested", "--lora"], "two methods"),
        (["finetune", "tiny:bert", "--distill", "--max-samples", "16"], "no trained head"),
    ]
    for args, expected in cases:
        out = tmp_path / f"o{random.random()}"
        r = run_cli(*args, "-o", str(out))
        assert r.exit_code == 2, (args, r.output)
        assert expected in " ".join(r.output.split()), (args, r.output)
        assert "Traceback" not in r.output and not out.exists(), args
    bad = tmp_path / "widths.json"
    bad.write_text(json.dumps({"ffn": [0.5]}))
    r = run_cli("extract", str(supernet), "--per-layer", str(bad), "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "one per layer" in r.output
    bad.write_text(json.dumps({"ffn": [0.5, 0.3]}))
    r = run_cli("extract", str(supernet), "--per-layer", str(bad), "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "outside the space" in r.output
    bad.write_text(json.dumps({"heads": [1, 1]}))  # a width flag beside the file: unused
    r = run_cli("extract", str(supernet), "--per-layer", str(bad), "--ffn", "0.5", "-o",
                str(tmp_path / "x"))
    assert r.exit_code == 2 and "--ffn would go unused" in r.output
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(supernet, damaged)
    (damaged / ELASTIC_FILE).write_text('{"mode": "nested"}')
    r = run_cli("extract", str(damaged), "-o", str(tmp_path / "y"))
    assert r.exit_code == 2 and "damaged" in r.output


def test_distill_learns_from_the_run_input_model(supernet, tmp_path):
    """Recovery after a cut: the teacher is the recipe's input model (before the cut)."""
    result = run_recipe({"model": str(supernet), "data": "tweets-sentiment", "max_samples": 32,
                         "steps": [{"step": "prune", "method": "neurons", "sparsity": 0.5},
                                   {"step": "finetune", "method": "distill", "max_steps": 2,
                                    "batch_size": 8}]}, tmp_path / "r")
    report = result["steps"][1]["report"]
    assert report["teacher"] == "the run's input model" and math.isfinite(report["train_loss"])
    bad = run_cli("finetune", str(result["artifact"]), "--distill", "--teacher", "tiny:llama",
                  "--max-samples", "16", "-o", str(tmp_path / "z"))
    assert bad.exit_code == 2 and "different architectures" in bad.output


def test_search_on_an_elastic_model_extracts_trained_subnetworks(supernet, tmp_path):
    """Joint sub-network x quantization search (SimQ-NAS): every structural point is an
    `extract` of a trained sub-network; a space file may not leave the trained space."""
    import optuna

    out = tmp_path / "s"
    r = run_cli("search", str(supernet), "--data", "tweets-sentiment", "--max-samples", "32",
                "--knobs", "ffn,layers,quant", "--sampler", "random", "--trials", "6",
                "--seq-len", "16", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "search.json").read_text())["settings"]
    assert settings["space"]["ffn"] == [0, 0.25, 0.5, 0.75]  # the trained widths, as removed
    assert settings["space"]["layers"] == [0, 1]  # depths 2 and 1
    study = optuna.load_study(study_name="mmkit-search", storage=f"sqlite:///{out}/study.db")
    extracted = 0
    for t in study.trials:
        steps = t.user_attrs.get("steps", [])
        assert not any(s["step"] == "prune" for s in steps)  # no untrained cuts
        for s in steps:
            if s["step"] == "extract":
                extracted += 1
                assert 1 - s["ffn"] in settings["space"]["ffn"]
    assert extracted
    best = json.loads(r.stdout)["exported"][0]
    assert load_model(best).extra.get("elastic") is None or \
        json.loads(r.stdout)["best"]["params"]["ffn"] == 0
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  ffn: [0, 0.4]\n")
    r = run_cli("search", str(supernet), "--data", "tweets-sentiment", "--max-samples", "32",
                "--space", str(space), "-o", str(tmp_path / "t"))
    assert r.exit_code == 2 and "not trained for" in r.output and not (tmp_path / "t").exists()


@pytest.mark.parametrize("with_teacher", [False, True])
def test_sandwich_loss_against_longhand(with_teacher):
    """One step's loss: the full network's (labels, or the teacher's logits), plus the
    smallest sub-network distilled from the full network (or the teacher)."""
    from mmkit.compression.elastic.training import sandwich_loss

    loaded = _load("tiny:bert")
    stacks = model_stacks(loaded)
    drop_orders = order_by_importance_(loaded.model, stacks, [_inputs(loaded)])
    teacher = None
    if with_teacher:  # another model: its logits differ from the student's
        teacher = _load("tiny:bert").model.eval()
        with torch.no_grad():
            for p in teacher.parameters():
                p.mul_(1 + torch.rand_like(p))
    cfg = ElasticConfig(mode="sampled", ffn=[0.5, 1.0], heads=[0.5, 1.0], depth=[1, 2],
                        samples=0, distill_weight=0.3, temperature=2.0)
    batch = _batch(loaded)
    batch["labels"] = torch.tensor([0, 2])
    small = copy.deepcopy(loaded)
    small.extra["elastic"] = _space(small, stacks, drop_orders, [1, 2])
    extract_(small, ExtractConfig(ffn=0.5, heads=0.5, depth=1), Context())
    with torch.no_grad():
        full = loaded.model(**batch)
        soft = teacher(**batch).logits if with_teacher else full.logits
        kd = dict(alpha=0.3, temperature=2.0)
        expected = (distillation_loss(full.logits, soft, batch["labels"], **kd)
                    if with_teacher else full.loss)
        expected = expected + distillation_loss(small.model(**batch).logits, soft,
                                                batch["labels"], **kd)
    sampler = Sampler("sampled", cfg.ffn, cfg.heads, cfg.depth, 0, seed=0)
    install_(stacks)
    try:
        with torch.no_grad():
            got, _ = sandwich_loss(loaded, stacks, drop_orders, sampler, cfg, teacher)(
                loaded.model, batch)
    finally:
        uninstall_(stacks)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_search_recovery_distils_from_the_unmodified_model(tmp_path, tiny_artifacts,
                                                           monkeypatch):
    import optuna

    from mmkit.search.objective import Trial

    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  ffn: [0, 0.5]\n  recovery: [0, 2]\n")
    out = tmp_path / "s"
    r = run_cli("search", str(tiny_artifacts["tiny:bert"]), "--data", "tweets-sentiment",
                "--max-samples", "32", "--space", str(space), "--sampler", "grid",
                "--trials", "4", "--seq-len", "16", "--export", "none", "-o", str(out))
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="mmkit-search", storage=f"sqlite:///{out}/study.db")
    recovered = [t for t in study.trials if t.params.get("recovery")]
    assert recovered and all(t.state.name == "COMPLETE" and "invalid" not in t.user_attrs
                             for t in recovered)
    for t in recovered:
        assert t.user_attrs["steps"][-1]["method"] == "distill"
        assert t.user_attrs["recovery_trained"] and t.user_attrs["evaluated"]

    # over the budget, a point is timed without its recovery, which is never trained (every
    # point timed: the points no faster than one over the budget are not skipped here)
    monkeypatch.setattr(Trial, "over_budget_points", lambda self, study: [])
    tight = tmp_path / "t"
    r = run_cli("search", str(tiny_artifacts["tiny:bert"]), "--data", "tweets-sentiment",
                "--max-samples", "32", "--space", str(space), "--sampler", "grid",
                "--trials", "4", "--seq-len", "16", "--export", "none",
                "--latency-budget", "0.001ms", "-o", str(tight))
    assert r.exit_code == 1 and "fastest point" in r.output
    study = optuna.load_study(study_name="mmkit-search", storage=f"sqlite:///{tight}/study.db")
    recovered = [t for t in study.trials if t.params.get("recovery")]
    assert recovered and all(t.user_attrs["recovery_trained"] is False
                             and t.user_attrs["latency_ms"] > 0 for t in recovered)
