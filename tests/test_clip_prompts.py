"""CLIP prompt learning (CoOp, MaPLe), zero-shot template ensembles and the linear probe, on
tiny:clip with the bundled digits: only the prompts train, the prompts sit where they should
(checked against longhand forwards of CLIP's towers), save -> load keeps the logits, and bad
input exits 2."""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import TINY_DATA, run_cli
from mmkit.adapters import clip_prompts, maple
from mmkit.core.artifacts import write_artifact
from mmkit.core.data import load_data
from mmkit.core.loading import load_model
from mmkit.core.registry import Context, build_config, get_method
from mmkit.core.tasks import zero_shot

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASK = "zero-shot-image-classification"
MODULES = {"coop": clip_prompts, "maple": maple}


@pytest.fixture(scope="module")
def digits():
    return load_data(TINY_DATA["tiny:clip"], TASK, max_samples=48)


def fresh():
    return load_model("tiny:clip", TASK)


def attach(loaded, method, names, **settings):
    """Prompts of `method` on a loaded tiny CLIP, untrained (seeded), as apply starts them."""
    cfg = build_config(get_method("finetune", method), settings, "test")
    module = MODULES[method]
    params = module.structure(cfg, loaded.tokenizer, names, loaded.model)
    torch.manual_seed(0)
    module.inject(loaded.model, params)
    learner = getattr(loaded.model, module.MARK)
    if params["context_init"]:
        learner.init_from_phrase(loaded.model, loaded.tokenizer)
    return learner


def train(method, dataset, tmp_path, **settings):
    """`finetune --METHOD` through its registered apply."""
    loaded = fresh()
    m = get_method("finetune", method)
    cfg = build_config(m, {"max_steps": 4, "batch_size": 16, "lr": 2e-2, **settings}, "test")
    ctx = Context(dataset=dataset, workdir=tmp_path / "ckpt", fingerprint="t")
    return m.apply(loaded, cfg, ctx), ctx.report


def pixels(loaded, dataset, split="train", n=16):
    part = dataset.split(split)
    from mmkit.core.tasks.common import as_rgb

    return loaded.image_processor(images=[as_rgb(x) for x in part.inputs[:n]],
                                  return_tensors="pt")["pixel_values"]


def base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "mmkit_" not in k}


# ---------------------------------------------------------------- what trains
@pytest.mark.parametrize("method", ["coop", "maple"])
def test_only_the_prompts_train(method, digits, tmp_path):
    before = base_state(fresh().model)
    loaded, report = train(method, digits, tmp_path)
    after = base_state(loaded.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), \
        [k for k in before if not torch.equal(after[k], before[k])]
    learner = getattr(loaded.model, MODULES[method].MARK)
    assert report["trainable_parameters"] == report["prompt_parameters"] == \
        sum(p.numel() for p in learner.parameters())
    start = attach(fresh(), method, digits.label_names)  # the same seed: the starting prompts
    moved = [n for n, p in learner.named_parameters()
             if not torch.equal(p, dict(start.named_parameters())[n])]
    assert moved == [n for n, _ in learner.named_parameters()]  # every prompt tensor learned
    assert not any(p.requires_grad for p in loaded.model.parameters())


@pytest.mark.parametrize("method,settings", [("coop", {}), ("coop", {"class_specific": True}),
                                             ("maple", {})])
def test_prompts_learn_to_match_a_teacher_and_only_they_get_gradients(method, settings, digits):
    """The random tiny CLIP gives nearly the same feature to every digit (cosine > 0.97), so
    its labels cannot be learned; a teacher can: the same model with other prompt values
    (drawn at 50x the initial scale). The student's KL divergence to the teacher's class
    probabilities must fall below half its start in 20 Adam steps."""
    teacher_model = fresh()
    teacher = attach(teacher_model, method, digits.label_names, **settings)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(std=1.0)
    loaded = fresh()
    model = loaded.model
    for p in model.parameters():
        p.requires_grad_(False)
    learner = attach(loaded, method, digits.label_names, **settings)
    x = pixels(loaded, digits, n=32)
    with torch.no_grad():
        target = clip_prompts.prompt_classifier(teacher_model.model, teacher, loaded.tokenizer,
                                                digits.label_names)(x)["logits"].softmax(-1)
    student = clip_prompts.prompt_classifier(model, learner, loaded.tokenizer,
                                             digits.label_names)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        log_p = student(x)["logits"].log_softmax(-1)
        loss = (target * (target.log() - log_p)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {f"{MODULES[method].MARK}.{n}" for n, _ in learner.named_parameters()}
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------- where the prompts sit
def plain_text_features(loaded, texts):
    """CLIP's own text features of `texts`, one at a time (no padding at all)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = loaded.tokenizer([text], return_tensors="pt")
            out = loaded.model.get_text_features(**ids)
            rows.append(out if torch.is_tensor(out) else out.pooler_output)
    return torch.cat(rows)


@pytest.mark.parametrize("settings", [{}, {"class_specific": True}])
def test_coop_started_from_a_phrase_is_the_template_zero_shot(settings, digits):
    loaded = fresh()
    names = ["cat", "aeroplane", "traffic_light"]  # names of different lengths: padding
    learner = attach(loaded, "coop", names, context_init="a photo of", **settings)
    assert learner.ctx.shape[1] == len(loaded.tokenizer("a photo of",
                                                        add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        learned = learner.class_text_features(loaded.model, loaded.tokenizer, names)
    reference = plain_text_features(loaded, zero_shot.prompts(names, "a photo of {}."))
    assert torch.allclose(learned, reference, atol=1e-5), (learned - reference).abs().max()
    # and the zero-shot evaluation takes the learned prompts: the same predictions
    prompted, plain = fresh(), fresh()
    attach(prompted, "coop", digits.label_names, context_init="a photo of", **settings)
    names, test = digits.label_names, digits.split("test")
    templated = zero_shot.evaluate(plain, test, label_names=names, template="a photo of {}.")
    assert templated.pop("templates") == ["a photo of {}."]
    assert zero_shot.evaluate(prompted, test, label_names=names) == templated


def longhand_text(model, embeds, mask, deep=None):
    """CLIP's text tower by hand from input embeddings: position embeddings, an explicit
    causal + padding mask, each layer (with `deep[i]` at positions 1..M of layer i's input),
    the final LayerNorm."""
    text = model.text_model
    length = embeds.shape[1]
    h = embeds + text.embeddings.position_embedding.weight[:length]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    allowed = causal[None] & mask[:, None, :].bool()
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None]
    for i, layer in enumerate(text.encoder.layers):
        if deep and i in deep:
            h = h.clone()
            h[:, 1:1 + deep[i].shape[0]] = deep[i]
        h = layer(h, additive)
    return text.final_layer_norm(h)


def test_coop_pools_at_each_prompts_eos(digits):
    loaded = fresh()
    tok = loaded.tokenizer
    names = ["cat", "aeroplane", "traffic_light"]
    learner = attach(loaded, "coop", names, context_tokens=5, class_specific=True)
    with torch.no_grad():
        learner.ctx.normal_()  # clearly not token embeddings
        got = learner.class_text_features(loaded.model, tok, names)
        ids, mask, eos = clip_prompts.prompt_ids(tok, names, 5, None, 64)
        # EOS follows BOS, the 5 context vectors and the name's tokens in "X <name>."
        for row, name, pos in zip(ids.tolist(), names, eos.tolist()):
            after = tok(f"X {name.replace('_', ' ')}.")["input_ids"][2:]
            assert row[pos] == tok.eos_token_id and pos == 1 + 5 + len(after) - 1
            assert row[6:pos + 1] == after
        assert mask.sum(1).tolist() == (eos + 1).tolist()
        embeds = loaded.model.text_model.embeddings.token_embedding(ids).clone()
        embeds[:, 1:6] = learner.ctx
        hidden = longhand_text(loaded.model, embeds, mask)
        want = loaded.model.text_projection(hidden[torch.arange(3), eos])
        wrong = loaded.model.text_projection(hidden[:, -1])  # the padded end: not the EOS
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got[:2], wrong[:2], atol=1e-3)  # the first two are padded


def test_maple_text_prompts_match_coop_and_a_longhand_forward(digits):
    names = ["cat", "aeroplane", "traffic_light"]
    loaded = fresh()
    coop = attach(loaded, "coop", names, context_tokens=3)
    other = fresh()
    deep = attach(other, "maple", names, context_tokens=3, prompt_depth=2)
    with torch.no_grad():
        deep.ctx.copy_(coop.ctx)
        deep.deep_text[0].normal_()
        got = deep.class_text_features(other.model, other.tokenizer, names)
        ids, mask, eos = clip_prompts.prompt_ids(other.tokenizer, names, 3, None, 64)
        embeds = other.model.text_model.embeddings.token_embedding(ids).clone()
        embeds[:, 1:4] = deep.ctx
        hidden = longhand_text(other.model, embeds, mask, {1: deep.deep_text[0]})
        want = other.model.text_projection(hidden[torch.arange(3), eos])
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        # at depth 1 MaPLe's text side is CoOp's
        shallow = fresh()
        one = attach(shallow, "maple", names, context_tokens=3, prompt_depth=1)
        one.ctx.copy_(coop.ctx)
        assert torch.allclose(one.class_text_features(shallow.model, shallow.tokenizer, names),
                              coop.class_text_features(loaded.model, loaded.tokenizer, names),
                              atol=1e-6)


def test_maple_deep_prompt_equal_to_what_layer_leaves_changes_nothing():
    """Under the causal mask the context positions see only BOS and the context, so layer 0's
    output there is the same for every class; a layer-1 prompt equal to it is an identity."""
    names = ["cat", "aeroplane", "traffic_light"]
    shallow, deep = fresh(), fresh()
    one = attach(shallow, "maple", names, context_init="a photo of", prompt_depth=1)
    two = attach(deep, "maple", names, context_init="a photo of", prompt_depth=2)
    m = one.ctx.shape[1]
    seen = []
    hook = shallow.model.text_model.encoder.layers[0].register_forward_hook(
        lambda mod, args, out: seen.append(out[:, 1:1 + m].detach().clone()))
    with torch.no_grad():
        reference = one.class_text_features(shallow.model, shallow.tokenizer, names)
        hook.remove()
        assert torch.allclose(seen[0], seen[0][:1].expand_as(seen[0]), atol=1e-6)
        two.deep_text[0].copy_(seen[0][0])
        same = two.class_text_features(deep.model, deep.tokenizer, names)
        assert torch.allclose(same, reference, atol=1e-5)
        # and the phrase-started depth-1 prompts are the template's zero-shot text features
        plain = plain_text_features(fresh(), zero_shot.prompts(names, "a photo of {}."))
        assert torch.allclose(reference, plain, atol=1e-5)
        # the same values written one position later (over the class name's first token)
        # do change the features: the identity is not blind to where the prompt goes
        def shifted(module, args):
            h = args[0].clone()
            h[:, 2:2 + m] = seen[0][0]
            return (h, *args[1:])

        hook = shallow.model.text_model.encoder.layers[1].register_forward_pre_hook(shifted)
        off = one.class_text_features(shallow.model, shallow.tokenizer, names)
        hook.remove()
        assert not torch.allclose(off, reference, atol=1e-3)


def test_maple_vision_prompts_against_a_longhand_tower(digits):
    loaded = fresh()
    model = loaded.model
    learner = attach(loaded, "maple", digits.label_names, context_tokens=3, prompt_depth=2)
    x = pixels(loaded, digits, n=4)
    vision = model.vision_model
    with torch.no_grad():
        got = zero_shot.image_features(model, x)
        # by hand: the patch embeddings, the coupled prompts appended, pre-LN, each layer with
        # layer 1's input ending in coupling_1(text prompt 1), CLS, post-LN, projection
        emb = vision.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
        cls = vision.embeddings.class_embedding.expand(4, 1, -1)
        h = torch.cat([cls, emb], 1) + vision.embeddings.position_embedding.weight
        p0 = learner.ctx[0] @ learner.coupling[0].weight.T + learner.coupling[0].bias
        p1 = learner.deep_text[0] @ learner.coupling[1].weight.T + learner.coupling[1].bias
        h = vision.pre_layrnorm(torch.cat([h, p0.expand(4, -1, -1)], 1))
        h = vision.encoder.layers[0](h, None)
        h = torch.cat([h[:, :-3], p1.expand(4, -1, -1)], 1)
        h = vision.encoder.layers[1](h, None)
        want = model.visual_projection(vision.post_layernorm(h[:, 0]))
        plain = zero_shot.image_features(fresh().model, x)
        copied = copy.deepcopy(model)  # a copy's hooks read the copy's own prompts
        getattr(copied, maple.MARK).coupling[0].weight.normal_()
        after_copy = zero_shot.image_features(model, x)
        copied_out = zero_shot.image_features(copied, x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)  # the prompts matter
    assert torch.equal(after_copy, got) and not torch.allclose(copied_out, got, atol=1e-3)


# ---------------------------------------------------------------- save -> load, the CLI
@pytest.mark.parametrize("method", ["coop", "maple"])
def test_adapter_saves_small_and_reloads_with_the_same_logits(method, digits, tmp_path):
    from safetensors.torch import load_file

    loaded, _ = train(method, digits, tmp_path, class_specific=True) if method == "coop" \
        else train(method, digits, tmp_path)
    x = pixels(loaded, digits, "test")
    learner = getattr(loaded.model, MODULES[method].MARK)

    def logits(l, prompts):
        with torch.no_grad():
            return clip_prompts.prompt_classifier(l.model, prompts, l.tokenizer,
                                                  digits.label_names)(x)["logits"]

    expected = logits(loaded, learner)
    out = write_artifact(loaded, tmp_path / "art", recipe={"model": "tiny:clip", "seed": 0},
                         steps=[], metrics=[], fmt=loaded.extra["format"])
    spec = json.loads((out / "mmkit_adapter.json").read_text())
    assert spec["method"] == method and spec["params"]["classnames"] == digits.label_names
    tensors = load_file(str(out / "mmkit_adapter.safetensors"))
    assert set(tensors) == {f"{MODULES[method].MARK}.{n}" for n, _ in learner.named_parameters()}
    assert not (out / "model.safetensors").exists()
    reloaded = load_model(str(out))
    again = getattr(reloaded.model, MODULES[method].MARK)
    assert torch.allclose(logits(reloaded, again), expected, atol=1e-5)
    names, test = digits.label_names, digits.split("test")
    assert zero_shot.evaluate(reloaded, test, label_names=names) == \
        zero_shot.evaluate(loaded, test, label_names=names)


def test_cli_finetune_then_eval_uses_the_learned_prompts(digits, tmp_path):
    out = tmp_path / "coop"
    result = run_cli("finetune", "tiny:clip", "--coop", "--context-tokens", 4, "--max-steps", 2,
                     "--max-samples", 48, "--batch-size", 16, "-o", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["steps"][0]["report"]["prompt_parameters"] == 4 * 32
    result = run_cli("eval", out, "--max-samples", 48, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    scores = json.loads(result.stdout)
    loaded = load_model(str(out))
    direct = zero_shot.evaluate(loaded, digits.split("test"), label_names=digits.label_names)
    assert scores["accuracy"] == direct["accuracy"]
    assert scores["accuracy"] == row["metrics"][0]["accuracy"]
    exported = run_cli("export", out, "--onnx", "-o", tmp_path / "onnx")  # would drop them
    assert exported.exit_code == 2 and "coop adapter" in exported.stderr
    assert not (tmp_path / "onnx").exists()


# ---------------------------------------------------------------- templates, linear probe
def test_template_ensemble_is_the_mean_of_unit_embeddings(digits):
    loaded = fresh()
    names = ["cat", "aeroplane", "traffic_light"]
    templates = ["a photo of a {}.", "a blurry photo of a {}.", "{}"]
    got = zero_shot.class_embeddings(loaded, names, templates)
    per_template = []
    for t in templates:
        f = plain_text_features(loaded, [t.format(n.replace("_", " ")) for n in names])
        per_template.append(f / f.norm(dim=-1, keepdim=True))
    mean = torch.stack(per_template).mean(0)
    assert torch.allclose(got, mean / mean.norm(dim=-1, keepdim=True), atol=1e-5)
    assert zero_shot.resolve_templates(["photos", "a photo of a {}."]) == \
        list(zero_shot.TEMPLATE_SETS["photos"])  # a template given twice counts once
    # the evaluation predicts with the ensemble: argmax of image . class embeddings by hand
    x = pixels(loaded, digits, "test", n=len(digits.split("test")))
    emb = zero_shot.class_embeddings(loaded, digits.label_names, templates)
    with torch.no_grad():
        img = zero_shot.unit(zero_shot.image_features(loaded.model, x))
    want = (img @ emb.T).argmax(-1).numpy()
    acc = float(np.mean(want == np.array(digits.split("test").labels)))
    got_eval = zero_shot.evaluate(loaded, digits.split("test"), label_names=digits.label_names,
                                  templates=templates)
    assert got_eval["accuracy"] == acc and got_eval["templates"] == templates


def test_linear_probe_matches_sklearn_on_the_same_features(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mmkit.core.linear_probe import C_GRID, linear_probe

    loaded = fresh()
    report = linear_probe(loaded, digits)
    feats, labels = {}, {}
    for split in ("train", "validation", "test"):
        x = pixels(loaded, digits, split, n=len(digits.split(split)))
        with torch.no_grad():
            feats[split] = zero_shot.image_features(loaded.model, x).double().numpy()
        labels[split] = np.array(digits.split(split).labels)
    scaler = StandardScaler().fit(feats["train"])
    clf = LogisticRegression(max_iter=1000, random_state=0, warm_start=True)
    val = []
    for c in C_GRID:  # ascending, each fit starting from the one before
        clf.set_params(C=c).fit(scaler.transform(feats["train"]), labels["train"])
        val.append((float(np.mean(clf.predict(scaler.transform(feats["validation"]))
                                  == labels["validation"])), -c,
                    clf.predict(scaler.transform(feats["test"]))))
    best_acc, neg_c, test_pred = max(val, key=lambda v: (v[0], v[1]))  # best, then smaller C
    test_acc = float(np.mean(test_pred == labels["test"]))
    probe = report["linear_probe"]
    assert probe["C"] == -neg_c and probe["validation_accuracy"] == best_acc
    assert report["accuracy"] == test_acc and report["examples"] == len(labels["test"])
    assert probe["feature_dim"] == 32 and probe["train_examples"] == len(labels["train"])


def test_linear_probe_reads_a_vit_heads_input():
    from mmkit.core.linear_probe import image_features

    ds = load_data("digits", "image-classification", max_samples=8)
    loaded = load_model("tiny:vit", "image-classification", ds.label_names)
    got = image_features(loaded, ds.split("test"))
    x = pixels(loaded, ds, "test", n=len(ds.split("test")))
    with torch.no_grad():
        hidden = loaded.model.vit(pixel_values=x).last_hidden_state[:, 0]
    assert np.allclose(got, hidden.double().numpy(), atol=1e-5)


# ---------------------------------------------------------------- bad input
def test_bad_input_exits_2_naming_the_cause(tmp_path):
    coop = tmp_path / "coop"
    made = run_cli("finetune", "tiny:clip", "--coop", "--class-specific", "--context-tokens", 2,
                   "--max-steps", 1, "--max-samples", 16, "-o", coop, "-q")
    assert made.exit_code == 0, made.stderr
    cases = {
        "coop on a ViT": (["finetune", "tiny:vit", "--coop"], "applies to clip"),
        "maple on text": (["finetune", "tiny:bert", "--maple"], "applies to clip"),
        "depth over the layers": (["finetune", "tiny:clip", "--maple", "--prompt-depth", 3,
                                   "--max-samples", 16], "at most 2"),
        "phrase and length disagree": (["finetune", "tiny:clip", "--coop", "--context-init",
                                        "a photo of", "--context-tokens", 4,
                                        "--max-samples", 16], "the phrase sets"),
        "merge prompts": (["finetune", "tiny:clip", "--coop", "--merge"], "cannot be merged"),
        "depth for coop": (["finetune", "tiny:clip", "--coop", "--prompt-depth", 1],
                           "--prompt-depth does not apply"),
        "template without {}": (["eval", "tiny:clip", "--template", "a photo"], "exactly one {}"),
        "template with a name": (["eval", "tiny:clip", "--template", "a {name}"], "exactly one"),
        "template for a ViT": (["eval", "tiny:vit", "--template", "a {}"], "CLIP zero-shot"),
        "template on learned prompts": (["eval", coop, "--template", "a {}",
                                         "--max-samples", 16], "drop --template"),
        "class-specific prompts on other classes": (["eval", coop, "--data", "textile",
                                                     "--max-samples", 8], "learned for"),
        "probe on validation": (["eval", "tiny:clip", "--linear-probe", "--split",
                                 "validation"], "test split only"),
        "probe of a text model": (["eval", "tiny:bert", "--linear-probe", "--max-samples", 8],
                                  "image features"),
    }
    for name, (args, needle) in cases.items():
        result = run_cli(*args, *(["-o", tmp_path / "out"] if args[0] == "finetune" else []))
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoints").exists()
