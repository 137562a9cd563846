"""quantize: the grid and packing, RTN and GPTQ against float64 references, GPTQ beating RTN
on real activations, save / load equality, bitsandbytes, mixed bits, CLI and bad input."""

import json

import numpy as np
import pytest
import torch

from conftest import CALIB, TINY, logits, row_problems, run_cli, with_rows
from mmkit.compression.quantize import grid
from mmkit.compression.quantize.gptq import HessianCollector, gptq_quantize
from mmkit.compression.quantize.qlinear import QuantLinear
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.tasks import get_task


# ---------------------------------------------------------------- grid and packing
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (5, 37), generator=torch.Generator().manual_seed(bits))
    packed = grid.pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-37 * bits // 32))
    assert torch.equal(grid.unpack(packed, bits, 37), codes)


def _rtn_reference(w, bits, group, symmetric):
    """RTN in float64 numpy, one group at a time, written from the definition."""
    w = w.double().numpy()
    maxq = 2 ** bits - 1
    out = np.empty_like(w)
    for start in range(0, w.shape[1], group):
        block = w[:, start:start + group]
        lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
        if symmetric:
            scale = 2 * np.maximum(-lo, hi) / maxq
            zero = np.full_like(scale, (maxq + 1) / 2)
        else:
            scale = (hi - lo) / maxq
        scale = scale.astype(np.float16).astype(np.float64)  # stored in fp16
        if not symmetric:
            zero = np.round(-lo / scale)
        q = np.clip(np.round(block / scale[:, None]) + zero[:, None], 0, maxq)
        out[:, start:start + group] = (q - zero[:, None]) * scale[:, None]
    return torch.from_numpy(out)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 16, False), (3, 32, True), (8, 64, False),
                                                  (2, 64, True)])
def test_rtn_matches_a_float64_reference(bits, group, symmetric):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = grid.quantize_rows(w, bits, group, symmetric)
    layer = QuantLinear.from_codes(codes, scales, zeros, grid.group_index(64, group), bits)
    assert torch.allclose(layer.weight_float().double(), _rtn_reference(w, bits, group, symmetric),
                          atol=1e-6)


def _gptq_reference(w, h, bits, group, damp=0.01):
    """GPTQ without blocks or lazy updates: round one column, push its error onto every later
    column through the Cholesky factor of H^-1, in float64."""
    w = w.double().clone()
    h = h.double() + damp * torch.mean(torch.diag(h.double())) * torch.eye(h.shape[0])
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % group == 0:
            scale, zero = grid.fit_grid(w[:, i:i + group], bits, False)
        q = grid.from_codes(grid.to_codes(w[:, i:i + 1], scale, zero, bits), scale, zero)[:, 0]
        out[:, i] = q
        w[:, i:] -= ((w[:, i] - q) / u[i, i]).unsqueeze(1) * u[i, i:].unsqueeze(0)
    return out


def _inputs(n=512, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) * torch.linspace(0.1, 3, d)  # correlated, skewed
    return torch.randn(n, d, generator=gen) @ mix


def test_gptq_blocked_equals_the_unblocked_reference():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    hc = HessianCollector(64)
    hc.add(_inputs())
    codes, scales, zeros, g_idx = gptq_quantize(w, hc.h, 4, 16, False, block=32)
    ours = grid.dequantize(codes, scales, zeros, g_idx)
    assert torch.allclose(ours, _gptq_reference(w, hc.h, 4, 16), atol=1e-5)


def test_gptq_with_an_identity_hessian_is_rtn():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    codes, scales, zeros, g_idx = gptq_quantize(w, torch.eye(32, dtype=torch.float64), 4, 8, False)
    rtn_codes, _, _ = grid.quantize_rows(w.double(), 4, 8, False)
    assert torch.equal(codes, rtn_codes)


@pytest.mark.parametrize("bits,group,act_order", [(3, 128, False), (4, 32, True), (4, None, False)])
def test_gptq_beats_rtn_on_real_minilm_activations(bits, group, act_order):
    loaded = load_model("minilm", labels=["a", "b"])
    layer = loaded.model.bert.encoder.layer[2].intermediate.dense
    hc = HessianCollector(layer.in_features)
    handle = layer.register_forward_hook(lambda m, a, o: hc.add(a[0]))
    texts = ["I love this phone, the battery lasts all day", "worst service I have ever had",
             "meh, it is fine I guess", "the update broke everything again"] * 8
    with torch.no_grad():
        loaded.model(**loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    handle.remove()
    w = layer.weight.detach()
    x = torch.linalg.cholesky(hc.h + 1e-6 * torch.eye(hc.h.shape[0], dtype=torch.float64))

    def output_error(q):  # ||(W - Q) X|| through the Hessian's factor
        return float(((w.double() - q.double()) @ x).norm())

    codes, scales, zeros, g_idx = gptq_quantize(w, hc.h, bits, group, False, act_order)
    gptq_err = output_error(grid.dequantize(codes, scales, zeros, g_idx))
    rtn_codes, rs, rz = grid.quantize_rows(w, bits, group, False)
    rtn_err = output_error(grid.dequantize(rtn_codes, rs, rz, grid.group_index(w.shape[1], group)))
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


# ---------------------------------------------------------------- methods on models
# One row per registered quantize method; a method without one fails
# test_every_registered_quantize_method_has_a_row.
#   params: the recipe step's parameters besides step and method (gptq also gets --calib)
#   refs: the tiny families the save / load matrix quantizes (none: tested on its own below)
TEXT_AND_LM = ("tiny:bert", "tiny:llama")
QUANTIZE = {
    # a chooser, not a quantizer: test_cli_quantize_picks_a_method_and_says_so,
    # test_auto_pick_avoids_dynamic_activations_on_causal_lms
    ("quantize", "auto"): {"params": None, "refs": ()},
    ("quantize", "rtn"): {"params": {"bits": 4, "group_size": 16}, "refs": TINY},
    ("quantize", "gptq"): {"params": {"bits": 4, "group_size": 16, "act_order": True,
                                      "calib_samples": 8}, "refs": TEXT_AND_LM},
    ("quantize", "dynamic-int8"): {"params": {}, "refs": TINY},
    # simulated activation PTQ keeps float weights: test_ptq_w8a8_stays_close_and_reloads
    ("quantize", "ptq"): {"params": None, "refs": ()},
    ("quantize", "nf4"): {"params": {}, "refs": TEXT_AND_LM},
    ("quantize", "fp4"): {"params": {}, "refs": TEXT_AND_LM},
    ("quantize", "int8"): {"params": {}, "refs": TEXT_AND_LM},
}
CASES = [(m.name, ref) for m, row in with_rows("quantize", QUANTIZE) for ref in row["refs"]]


def test_every_registered_quantize_method_has_a_row():
    problems = row_problems("quantize", QUANTIZE, "QUANTIZE in tests/test_quantize.py")
    assert not problems, "\n".join(problems)


# bitsandbytes' 4-bit layers run on both of its CPU paths, whatever this CPU has
PATHS = [(m, r, p) for m, r in CASES
         for p in (("generic", "avx512bf16") if m in ("nf4", "fp4") else (None,))]


@pytest.mark.parametrize("method,ref,bnb_cpu_path", PATHS, indirect=["bnb_cpu_path"],
                         ids=[f"{m}-{r[5:]}" + (f"-{p}" if p else "") for m, r, p in PATHS])
def test_quantized_model_saves_and_loads_to_the_same_outputs(method, ref, bnb_cpu_path,
                                                             tmp_path):
    step = {"step": "quantize", "method": method, **QUANTIZE[("quantize", method)]["params"]}
    if method == "gptq":
        step["calib"] = CALIB[ref]
    result = run_recipe({"model": ref, "max_samples": 16, "steps": [step]}, tmp_path / "q")
    report = result["steps"][0]["report"]
    assert report["layers_quantized"] > 0
    assert report["weights_mb_after"] < report["weights_mb_before"]
    reloaded = load_model(result["artifact"])
    assert torch.allclose(logits(reloaded), logits(load_model(result["artifact"])))
    # close to the float model (same seed, so the same new head): changed, but not wildly
    original = load_model(ref, labels=reloaded.labels)
    ref_out, q_out = logits(original), logits(reloaded)
    rel = float((q_out - ref_out).norm() / ref_out.norm())
    assert 0 < rel < (0.05 if "8" in method else 0.5), rel
    if method in ("rtn", "gptq"):
        assert all(layer["bits"] == 4 for layer in report["layers"].values())


def test_save_load_equals_the_in_memory_model(tmp_path):
    from mmkit.compression.quantize.methods import RTNConfig, rtn_
    from mmkit.core.artifacts import write_artifact
    from mmkit.core.registry import Context

    loaded = load_model("tiny:llama")
    loaded = rtn_(loaded, RTNConfig(bits=3, group_size=8), Context())
    expected = logits(loaded)
    out = write_artifact(loaded, tmp_path / "a", recipe={"model": "tiny:llama"}, steps=[],
                         metrics=[], fmt="mmkit-quantized")
    assert torch.equal(logits(load_model(str(out))), expected)


def test_dynamic_int8_runs_integer_matmuls(tmp_path):
    result = run_recipe({"model": "tiny:bert", "max_samples": 8, "steps": [
        {"step": "quantize", "method": "dynamic-int8"}]}, tmp_path / "d")
    loaded = load_model(result["artifact"])
    logits(loaded)
    layer = loaded.model.bert.encoder.layer[0].attention.self.query
    assert type(layer._int8).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(3, layer.in_features)
    float_out = torch.nn.functional.linear(x, layer.weight_float(), layer.bias)
    assert torch.allclose(layer(x), float_out, atol=0.05 * float(float_out.abs().max()))


def test_bitsandbytes_artifact_opens_with_plain_transformers(tmp_path, bnb_cpu_path):
    from transformers import AutoModelForCausalLM

    from mmkit.core.bnb_cpu import fit_cpu_kernels_

    result = run_recipe({"model": "tiny:llama", "steps": [
        {"step": "quantize", "method": "nf4"}]}, tmp_path / "n")
    plain = AutoModelForCausalLM.from_pretrained(result["artifact"], device_map="cpu")
    assert type(plain.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(plain.lm_head).__name__ == "Linear"
    # tiny layers are narrower than bitsandbytes' AVX512-BF16 packing; only down_proj fits
    narrow = fit_cpu_kernels_(plain)
    assert bool(narrow) == (bnb_cpu_path == "avx512bf16")
    assert not any(n.endswith("down_proj") for n in narrow)
    ours = load_model(result["artifact"])
    batch = get_task("causal-lm").dummy_batch(ours, 2, 8)
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours.model(**batch).logits)


def test_mixed_bits_follow_the_mapping(tmp_path):
    bits = {"self_attn.*": 8, "mlp.down_proj": 16, "default": 3}
    result = run_recipe({"model": "tiny:llama", "steps": [
        {"step": "quantize", "method": "rtn", "bits": bits, "group_size": 8}]}, tmp_path / "m")
    layers = result["steps"][0]["report"]["layers"]
    assert layers["model.layers.0.self_attn.q_proj"]["bits"] == 8
    assert layers["model.layers.1.mlp.up_proj"]["bits"] == 3
    assert not any(n.endswith("down_proj") for n in layers)  # 16: kept in floating point
    loaded = load_model(result["artifact"])
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert loaded.model.model.layers[0].self_attn.q_proj.bits == 8


# ---------------------------------------------------------------- CLI
def test_cli_quantize_picks_a_method_and_says_so(tmp_path):
    result = run_cli("quantize", "tiny:bert", "--bits", "8", "--max-samples", "8", "--eval",
                     "-o", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.stderr
    assert "using dynamic-int8" in result.stderr
    row = json.loads(result.stdout)
    assert row["steps"][0]["method"] == "dynamic-int8" and row["metrics"][0]["split"] == "test"
    result = run_cli("quantize", "tiny:llama", "--bits", "4", "--calib", "bbc-text",
                     "--calib-samples", "4", "--group-size", "0", "-o", tmp_path / "g", "--json")
    assert result.exit_code == 0, result.stderr
    assert "using gptq" in result.stderr
    assert json.loads(result.stdout)["steps"][0]["params"]["group_size"] is None


def test_cli_quantize_bad_input(tmp_path):
    quantized = tmp_path / "already"
    assert run_cli("quantize", "tiny:bert", "--bits", "4", "--max-samples", "8",
                   "-o", quantized).exit_code == 0
    mapping = tmp_path / "bits.yaml"
    mapping.write_text("nothing_like_this: 4\ndefault: 4\n")
    cases = {
        "nf4 at 8 bits": (["tiny:llama", "--bits", "8", "--method", "nf4"], "nf4 takes bits 4"),
        "rtn at 9 bits": (["tiny:llama", "--bits", "9", "--method", "rtn"], "takes bits 2, 3"),
        "gptq without calib": (["tiny:llama", "--bits", "4", "--method", "gptq"],
                               "needs calibration data"),
        "already quantized": ([quantized, "--bits", "4"], "quantized already"),
        "pattern matches nothing": (["tiny:llama", "--bits", mapping], "nothing_like_this"),
        "option for another method": (["tiny:llama", "--bits", "4", "--method", "rtn",
                                       "--act-order"], "--act-order does not apply"),
        "bad mapping": (["tiny:llama", "--bits", "mlp=four"], "whole number of bits"),
        "skip matches nothing": (["tiny:llama", "--bits", "4", "--skip", "nope"], "--skip nope"),
    }
    for name, (args, needle) in cases.items():
        result = run_cli("quantize", *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert not (tmp_path / "out").exists()


def test_model_without_linear_layers_is_refused():
    from mmkit.compression.quantize.methods import check_quantizable
    from mmkit.core.errors import InputError

    loaded = load_model("tiny:bert", labels=["a", "b"])
    for name, module in list(loaded.model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(loaded.model.get_submodule(parent) if parent else loaded.model, child,
                    torch.nn.Identity())
    with pytest.raises(InputError, match="no Linear layers"):
        check_quantizable(loaded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nf4_on_cuda(tmp_path):
    result = run_recipe({"model": "tiny:llama", "steps": [{"step": "quantize", "method": "nf4"}]},
                        tmp_path / "n", device="cuda")
    loaded = load_model(result["artifact"], device="cuda")
    assert next(loaded.model.parameters()).is_cuda


# ---------------------------------------------------------------- activation PTQ
def _calib(ref):
    from mmkit.compression.calibration import calibration_batches
    from mmkit.core.data import load_data

    name, task = {"tiny:vit": ("digits", "image-classification"),
                  "tiny:bert": ("tweets-sentiment", "text-classification")}[ref]
    data = load_data(name, task, max_samples=32)
    loaded = load_model(ref, labels=data.label_names)
    return name, loaded, calibration_batches(loaded, data, 16, 64)


def test_layernorm_reparameterization_keeps_the_function_and_equalizes_channels():
    from mmkit.compression.quantize import ptq

    _, loaded, batches = _calib("tiny:vit")
    with torch.no_grad():
        before = torch.cat([loaded.model(**b).logits for b in batches])
    linears = [n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)]
    stats = ptq._calibrate(loaded, batches, linears)
    groups = ptq._pre_norm_groups(loaded.model)
    assert len(groups) == 2 * len(loaded.model.vit.layers)
    for ln, readers in groups:
        lo = torch.stack([stats[n][0] for n in readers]).min(0).values
        hi = torch.stack([stats[n][1] for n in readers]).max(0).values
        ptq._fold(loaded.model, ln, readers, lo, hi)
    with torch.no_grad():
        after = torch.cat([loaded.model(**b).logits for b in batches])
    assert torch.allclose(before, after, atol=1e-5)
    folded = ptq._calibrate(loaded, batches, [groups[0][1][0]])  # q_proj's input, post-fold
    spread = folded[groups[0][1][0]][1] - folded[groups[0][1][0]][0]
    assert torch.allclose(spread, spread.mean().expand_as(spread), rtol=1e-4)


def test_log2_softmax_gives_powers_of_two():
    from mmkit.compression.quantize.ptq import log2_softmax_attention

    module = torch.nn.Module()
    module.mmkit_softmax_bits = 3
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    _, probs = log2_softmax_attention(module, q, k, v, None)
    nonzero = probs[probs > 0]
    assert torch.equal(nonzero, torch.exp2(torch.round(torch.log2(nonzero))))
    assert nonzero.min() >= 2.0 ** -6  # 3 bits: codes 0..6 are 2^-code, code 7 is zero


@pytest.mark.parametrize("ref", ["tiny:vit", "tiny:bert"])
def test_ptq_w8a8_stays_close_and_reloads(ref, tmp_path):
    calib, loaded, batches = _calib(ref)
    with torch.no_grad():
        before = torch.cat([loaded.model(**b).logits for b in batches])
    result = run_recipe({"model": ref, "data": calib, "max_samples": 32, "steps": [
        {"step": "quantize", "method": "ptq", "calib": calib, "calib_samples": 16,
         "calib_length": 64}]}, tmp_path / "p")
    report = result["steps"][0]["report"]
    assert report["simulated"] and report["a_bits"] == 8
    if ref == "tiny:vit":
        assert report["layernorms_reparameterized"] == 4
    else:  # post-norm: per-channel ranges are simulated, not folded
        assert report["layernorms_reparameterized"] == 0
        assert report["per_channel_activation_layers"] > 0
    a, b = load_model(result["artifact"]), load_model(result["artifact"])
    assert a.model.config._attn_implementation == "mmkit_log2_softmax"
    with torch.no_grad():
        out = torch.cat([a.model(**x).logits for x in batches])
        assert torch.equal(out, torch.cat([b.model(**x).logits for x in batches]))
    assert 0 < float((out - before).norm() / before.norm()) < 0.1


@pytest.mark.parametrize("method", ["gptq", "ptq"])
def test_a_classifier_calibrates_on_unlabelled_text(method, tmp_path):
    """Calibration reads inputs only: a text corpus without labels (bbc-text) calibrates a
    text classifier as well as its own labelled data does."""
    from mmkit.compression.calibration import calibration_batches
    from mmkit.core.data import load_data

    loaded = load_model("tiny:bert", labels=["a", "b"])
    corpus = load_data("bbc-text", "text-classification", max_samples=4)
    assert corpus.split("train").labels is None
    batches = calibration_batches(loaded, corpus, 4, 16)
    assert sum(len(b["input_ids"]) for b in batches) == 4 and "labels" not in batches[0]
    result = run_recipe({"model": "tiny:bert", "data": "tweets-sentiment", "max_samples": 16,
                         "steps": [{"step": "quantize", "method": method, "bits": 8,
                                    "calib": "bbc-text", "calib_samples": 4,
                                    "calib_length": 16}]}, tmp_path / "q")
    assert result["steps"][0]["report"]["method"] == method


def test_ptq_refuses_other_families(tmp_path):
    result = run_cli("quantize", "tiny:llama", "--bits", "8", "--method", "ptq", "--calib",
                     "bbc-text", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "rtn, gptq or dynamic-int8" in result.stderr


def test_auto_pick_avoids_dynamic_activations_on_causal_lms():
    from mmkit.compression.quantize.auto import pick

    def pick_method(bits, device, calib, kind):
        return pick({"bits": bits, "calib": calib}, kind, device)

    assert pick_method(8, "cpu", None, "text-encoder")[0] == "dynamic-int8"
    assert pick_method(8, "cpu", None, "causal-lm")[0] == "rtn"
    assert pick_method(4, "cpu", "bbc-text", "causal-lm")[0] == "gptq"
    assert pick_method(4, "cuda", None, "causal-lm")[0] == "nf4"
