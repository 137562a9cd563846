"""Token merging (`mmkit merge-tokens`, ToMe and Token Transforming): the merge against a
longhand reference, size bookkeeping, proportional attention against a longhand attention,
r = 0 exactly the unmodified model, SDPA = eager, save -> load, CLIP's image tower only, later
steps keep it, the search's tokens knob, and bad input."""

import copy
import json
import math

import pytest
import torch
from conftest import run_cli

from mmkit.compression.tokens.matching import match, merge
from mmkit.core.loading import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the merge itself
def _longhand_merge(x, size, metric, r, temperature=None):
    """ToMe / Token Transforming for one batch row, with loops and plain Python choices."""
    n = x.shape[0]
    a, b = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = {(i, j): float(unit[i] @ unit[j]) for i in a for j in b}
    best = {i: max(b, key=lambda j: sim[i, j]) for i in a[1:]}  # the class token never merges
    merged = sorted(best, key=lambda i: -sim[i, best[i]])[:r]
    total = {j: x[j] * size[j] for j in b}
    weight = {j: size[j].clone() for j in b}
    for i in merged:
        if temperature is None:
            shares = {best[i]: 1.0}
        else:
            logits = torch.tensor([sim[i, j] for j in b]) / temperature
            shares = dict(zip(b, torch.softmax(logits, 0).tolist()))
        for j, w in shares.items():
            total[j] = total[j] + w * x[i] * size[i]
            weight[j] = weight[j] + w * size[i]
    kept = [i for i in a if i not in merged]
    rows = [x[i] for i in kept] + [total[j] / weight[j] for j in b]
    sizes = [size[i] for i in kept] + [weight[j] for j in b]
    return torch.stack(rows), torch.stack(sizes)


@pytest.mark.parametrize("temperature", [None, 0.3])
def test_the_merge_equals_a_longhand_reference(temperature):
    torch.manual_seed(0)
    x, metric = torch.randn(2, 11, 6, dtype=torch.float64), torch.randn(2, 11, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 11, 1)).double()
    out, out_size = merge(x, size, metric, 3, temperature)
    assert out.shape == (2, 8, 6) and out_size.shape == (2, 8, 1)
    for row in range(2):
        ref, ref_size = _longhand_merge(x[row], size[row], metric[row], 3, temperature)
        torch.testing.assert_close(out[row], ref)
        torch.testing.assert_close(out_size[row], ref_size)
    assert torch.allclose(out_size.sum(1), size.sum(1))  # no patch lost or counted twice
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1))  # mass kept


def test_two_identical_tokens_merge_into_one_token_of_size_two():
    torch.manual_seed(1)
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    metric = torch.eye(9, dtype=torch.float64)[None] + 0.0  # nothing alike ...
    x[0, 3], metric[0, 3] = x[0, 4], metric[0, 4]  # ... but tokens 4 (in A) and 3 (in B)
    size = torch.ones(1, 9, 1, dtype=torch.float64)
    kept, merged, partner, _ = match(metric, 1)
    assert merged.tolist() == [[2]] and partner.tolist() == [[1]]  # A[2] = 4 joins B[1] = 3
    out, out_size = merge(x, size, metric, 1)
    assert out.shape[1] == 8 and out_size.flatten().tolist() == [1, 1, 1, 1, 1, 2, 1, 1]
    order = [0, 2, 6, 8, 1, 3, 5, 7]  # the kept A tokens in order (class token first), then B
    torch.testing.assert_close(out[0], x[0, order])  # identical tokens: the mean is the token


def test_token_transforming_at_a_low_temperature_is_tome():
    torch.manual_seed(2)
    x, metric, size = torch.randn(3, 15, 8), torch.randn(3, 15, 8), torch.ones(3, 15, 1)
    tome = merge(x, size, metric, 5)
    soft = merge(x, size, metric, 5, temperature=1e-6)
    torch.testing.assert_close(soft, tome)


# ---------------------------------------------------------------- on a model
@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A 4-block ViT classifier with 65 tokens (64 px images, patches of 8), random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = [str(i) for i in range(10)]  # the bundled digits' classes
    config = ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=96, image_size=64, patch_size=8,
                       id2label=dict(enumerate(labels)), label2id={k: i for i, k in
                                                                   enumerate(labels)})
    folder = tmp_path_factory.mktemp("vit") / "m"
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return folder


def _images(n=3, px=64):
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(5))


def _merged(folder, tmp_path, *flags, name="t"):
    result = run_cli("merge-tokens", folder, *flags, "--data", "digits", "--max-samples", "8",
                     "-o", tmp_path / name, "--json")
    assert result.exit_code == 0, result.stderr
    return tmp_path / name, json.loads(result.stdout)


def _logits(loaded, pixels):
    with torch.no_grad():
        return loaded.model(pixel_values=pixels).logits


def _hidden(loaded, pixels):
    with torch.no_grad():
        return loaded.model.vit(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_r_0_is_exactly_the_unmodified_model(vit, tmp_path, attn):
    out, _ = _merged(vit, tmp_path, "--r", "0")
    plain, merged = load_model(str(vit)), load_model(str(out))
    for m in (plain, merged):
        m.model.set_attn_implementation(attn)
    assert type(merged.model.vit.layers[0]).__name__.startswith("TokenMerging")  # it runs
    assert torch.equal(_logits(plain, _images()), _logits(merged, _images()))


def test_fewer_tokens_after_each_block_and_sdpa_equals_eager(vit, tmp_path):
    out, result = _merged(vit, tmp_path, "--r", "8,8,4,4")
    report = result["steps"][0]["report"]
    assert report["tokens_after_each_block"] == [57, 49, 45, 41]
    _, clamped = _merged(vit, tmp_path, "--r", "20", name="c")  # as ToMe: late blocks merge
    assert clamped["steps"][0]["report"]["tokens_after_each_block"] == [45, 25, 13, 7]  # less
    loaded = load_model(str(out))
    assert _hidden(loaded, _images()).shape[1] == 41
    eager = copy.deepcopy(loaded)  # a copy keeps merging
    eager.model.set_attn_implementation("eager")
    loaded.model.set_attn_implementation("sdpa")
    torch.testing.assert_close(_logits(eager, _images()), _logits(loaded, _images()),
                               atol=1e-5, rtol=1e-5)
    plain = load_model(str(vit))
    assert not torch.allclose(_logits(plain, _images()), _logits(loaded, _images()), atol=1e-3)


def test_proportional_attention_against_a_longhand_block(vit, tmp_path):
    out, _ = _merged(vit, tmp_path, "--r", "0")
    loaded = load_model(str(out))  # proportional attention on (a classifier)
    block = loaded.model.vit.layers[1]
    torch.manual_seed(3)
    x = torch.randn(2, 10, 48)
    size = torch.randint(1, 5, (2, 10, 1)).float()
    block._mmkit_tokens.run.size = size  # as block 0 would leave it after merging
    with torch.no_grad():
        got = block(x)
        att, heads = block.attention, 4
        h = block.layernorm_before(x)
        q, k, v = (p(h).view(2, 10, heads, 12).transpose(1, 2)
                   for p in (att.q_proj, att.k_proj, att.v_proj))
        logits = q @ k.transpose(-1, -2) / math.sqrt(12) + size.log().view(2, 1, 1, 10)
        mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 48)
        y = x + att.o_proj(mixed)
        want = y + block.mlp(block.layernorm_after(y))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    block._mmkit_tokens.run.size = None
    off, _ = _merged(vit, tmp_path, "--r", "0", "--no-proportional-attention", name="off")
    block = load_model(str(off)).model.vit.layers[1]
    block._mmkit_tokens.run.size = size
    with torch.no_grad():  # off: the sizes do not reach the attention
        assert not torch.allclose(block(x), want, atol=1e-3)


def test_save_load_keeps_the_setting_and_the_outputs(vit, tmp_path):
    out, _ = _merged(vit, tmp_path, "--method", "transform", "--keep", "0.5",
                     "--temperature", "0.05")
    setting = json.loads((out / "mmkit_tokens.json").read_text())
    assert setting["method"] == "transform" and sum(setting["r"]) == 65 - 32
    first = load_model(str(out))
    again = run_cli("quantize", out, "--bits", "8", "--method", "dynamic-int8", "--data", "digits",
                    "-o", tmp_path / "q")
    assert again.exit_code == 0, again.stderr  # a later step keeps the setting
    assert json.loads((tmp_path / "q" / "mmkit_tokens.json").read_text()) == setting
    quantized = load_model(str(tmp_path / "q"))
    assert _hidden(quantized, _images()).shape[1] == 32
    reloaded = load_model(str(out))
    assert torch.equal(_logits(first, _images()), _logits(reloaded, _images()))
    evaluated = run_cli("eval", out, "--data", "digits", "--max-samples", "8", "--json")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] >= 0


def test_clip_merges_its_image_tower_only(tmp_path):
    out, result = _merged("tiny:clip", tmp_path, "--r", "4")
    assert result["steps"][0]["report"]["proportional_attention"] is False  # CLIP: off
    plain, merged = load_model("tiny:clip"), load_model(str(out))
    ids = plain.tokenizer(["a cat", "a dog"], return_tensors="pt", padding=True)
    pixels = _images(2, 32)
    with torch.no_grad():
        text = [m.model.get_text_features(**ids).pooler_output for m in (plain, merged)]
        assert torch.equal(*text)  # the text tower is untouched
        tokens = merged.model.vision_model(pixel_values=pixels).last_hidden_state.shape[1]
        assert tokens == 17 - 8
        assert not torch.allclose(plain.model(**ids, pixel_values=pixels).logits_per_image,
                                  merged.model(**ids, pixel_values=pixels).logits_per_image)


def test_merge_tokens_bad_input(vit, tmp_path):
    cases = {
        ("--r", "40"): "at most 32",  # more than half the tokens in one block
        ("--r", "30,30,0,0"): "block 2",  # fits block 1, not block 2
        ("--r", "4,4"): "4 blocks",
        ("--r", "4", "--keep", "0.5"): "not both",
        (): "either --r",
        ("--keep", "0.01"): "--keep 0.",
        ("--r", "-1"): "at least 0",
    }
    for flags, needle in cases.items():
        result = run_cli("merge-tokens", vit, *flags, "--data", "digits", "-o", tmp_path / "bad")
        assert result.exit_code == 2 and needle in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()
    text = run_cli("merge-tokens", "tiny:bert", "--r", "2", "-o", tmp_path / "bad")
    assert text.exit_code == 2 and "image transformers" in text.stderr
    out, _ = _merged(vit, tmp_path, "--r", "2")
    twice = run_cli("merge-tokens", out, "--r", "2", "--data", "digits", "-o", tmp_path / "bad")
    assert twice.exit_code == 2 and "already" in twice.stderr
    (out / "mmkit_tokens.json").write_text('{"format_version": 1, "r": [1]}')
    assert "does not match the hash" in run_cli("inspect", out).stderr  # the manifest sees it
    (out / "mmkit.json").unlink()  # a plain folder: the setting's own check
    damaged = run_cli("inspect", out)
    assert damaged.exit_code == 2 and "does not fit this model" in damaged.stderr
    (out / "mmkit_tokens.json").write_text("{not json")
    assert run_cli("inspect", out).exit_code == 2


def test_the_search_tokens_knob(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  tokens: [1.0, 0.6, 0.3]\n")
    result = run_cli("search", "tiny:vit", "--data", "digits", "--max-samples", "24",
                     "--space", space, "--trials", "3", "--sampler", "random", "-o",
                     tmp_path / "s", "--json")
    assert result.exit_code == 0, result.stderr
    best = json.loads((tmp_path / "s" / "search.json").read_text())
    assert best["settings"]["space"] == {"tokens": [1.0, 0.6, 0.3]}
    text = run_cli("search", "tiny:bert", "--space", space, "--trials", "2", "-o", tmp_path / "t")
    assert text.exit_code == 2 and "tokens knob" in text.stderr
