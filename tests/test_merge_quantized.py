"""Merging quantized and pruned models: quantized inputs and bases are dequantized, merged in
floating point and the result quantized again in the base's format (mmkit's RTN grid,
bitsandbytes nf4); a pruned base keeps its zeros."""

import pytest
import torch

from conftest import TINY_DATA
from mmkit.compression.merge import tensors as tm
from mmkit.compression.quantize import grid
from mmkit.compression.quantize.qlinear import QuantLinear
from mmkit.core.layers import weight_view
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from test_merge import LABELS, _finetune_copy


def _quantized(ref, source, out, **step):
    recipe = {"model": source, "steps": [{"step": "quantize", **step}]}
    if ref in TINY_DATA and ref != "tiny:gpt2":
        recipe["data"] = TINY_DATA[ref]
    return run_recipe(recipe, out)["artifact"]


def _float_weights(ref):
    """Every Linear / Conv1D / QuantLinear weight of a saved model, dequantized, (out, in)."""
    model = load_model(str(ref)).model
    return {n: (m.weight_float() if isinstance(m, QuantLinear) else weight_view(m)).detach()
            .float() for n, m in model.named_modules()
            if isinstance(m, QuantLinear) or type(m).__name__ in ("Linear", "Conv1D")}


@pytest.mark.parametrize("ref", ["tiny:bert", "tiny:gpt2"])
def test_a_quantized_base_and_inputs_merge_and_come_back_on_the_base_grid(ref, tmp_path):
    rtn = {"method": "rtn", "bits": 4, "group_size": 16}
    models = [_finetune_copy(ref, tmp_path / f"ft{s}", s) for s in (1, 2)]
    base = _finetune_copy(ref, tmp_path / "base", 3, scale=0.0)  # the base, saved as a folder
    qbase = _quantized(ref, base, tmp_path / "qbase", **rtn)
    qone = _quantized(ref, models[0], tmp_path / "q1", method="rtn", bits=8, group_size=None)
    result = run_recipe({"model": qbase, "steps": [{"step": "merge", "method": "task-arithmetic",
                                                    "models": [qone, models[1]],
                                                    "lambda": 0.5}]}, tmp_path / "m")
    report = result["steps"][0]["report"]
    assert report["inputs"][qone] == "dequantized" and report["inputs"][models[1]] == "file"
    assert report["requantized"]["format"] == "mmkit-quantized"
    assert 0 < report["requantized"]["weight_rel_error_max"] < 0.2
    merged = load_model(result["artifact"]).model
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, QuantLinear)}
    assert layers and all(m.bits == 4 and m.scales.shape[1] > 1 for m in layers.values())
    b, x, y = (_float_weights(p) for p in (qbase, qone, models[1]))
    for name, layer in layers.items():  # RTN of the merge of the dequantized weights
        want = tm.task_arithmetic(b[name], [x[name], y[name]], [1.0, 1.0], 0.5)
        codes, scales, zeros = grid.quantize_rows(want, 4, 16, False)
        expected = grid.dequantize(codes, scales.half().float(), zeros.half().float(),
                                   grid.group_index(want.shape[1], 16).long())
        assert torch.allclose(layer.weight_float(), expected, atol=1e-5), name


def test_a_bitsandbytes_base_is_requantized_to_nf4(tmp_path):
    ref = "tiny:llama"
    models = [_finetune_copy(ref, tmp_path / f"ft{s}", s) for s in (1, 2)]
    qbase = _quantized(ref, ref, tmp_path / "qbase", method="nf4")
    result = run_recipe({"model": qbase, "steps": [{"step": "merge", "method": "linear",
                                                    "models": models}]}, tmp_path / "m")
    report = result["steps"][0]["report"]["requantized"]
    assert report["format"] == "bitsandbytes" and report["method"] == "nf4"
    assert report["layers"] > 0 and 0 < report["weight_rel_error_max"] < 0.3
    merged = load_model(result["artifact"]).model
    assert merged.config.quantization_config.bnb_4bit_quant_type == "nf4"
    q = merged.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit"
    want = (_float_weights(models[0])["model.layers.0.self_attn.q_proj"]
            + _float_weights(models[1])["model.layers.0.self_attn.q_proj"]) / 2
    from mmkit.compression.merge.quantized import _bnb_weight

    assert (_bnb_weight(q) - want).norm() / want.norm() < 0.2


def test_a_ptq_base_is_refused_with_what_to_do(tmp_path):
    ptq = run_recipe({"model": "tiny:bert", "data": "tweets-sentiment", "max_samples": 16,
                      "steps": [{"step": "quantize", "method": "ptq",
                                 "calib": "tweets-sentiment", "calib_samples": 4}]},
                     tmp_path / "ptq")["artifact"]
    a = _finetune_copy("tiny:bert", tmp_path / "a", 1)
    from mmkit.core.errors import InputError

    with pytest.raises(InputError, match="activation-quantization grids"):
        run_recipe({"model": ptq, "data": "tweets-sentiment", "max_samples": 16,
                    "steps": [{"step": "merge", "method": "linear", "models": [a]}]},
                   tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_pruned_base_keeps_its_zeros(tmp_path):
    pruned = run_recipe({"model": "tiny:bert", "data": "tweets-sentiment", "max_samples": 16,
                         "steps": [{"step": "prune", "method": "magnitude", "sparsity": 0.5}]},
                        tmp_path / "p")["artifact"]
    models = [_finetune_copy(pruned, tmp_path / f"ft{s}", s, labels=LABELS["tiny:bert"])
              for s in (1, 2)]  # dense fine-tunes: noise fills the zeros
    result = run_recipe({"model": pruned, "steps": [{"step": "merge", "method": "ties",
                                                     "models": models}]}, tmp_path / "m")
    assert result["steps"][0]["report"]["pruned_layers_kept"] > 0
    before, after = _float_weights(pruned), _float_weights(result["artifact"])
    name = "bert.encoder.layer.0.attention.self.query"
    assert (before[name] == 0).float().mean() >= 0.45
    assert torch.equal(after[name][before[name] == 0], torch.zeros(int((before[name] == 0).sum())))
    assert (after[name] != before[name]).any()  # and it did merge


@pytest.mark.parametrize("shape", [(64, 64), (64, 32), (33, 96)])
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("fp4", True)])
def test_4bit_weights_are_read_exactly_on_every_cpu(shape, quant_type, nested):
    """mmkit reads bitsandbytes 4-bit weights itself: bitsandbytes' AVX-512 kernel gets rows
    that are not a multiple of the block wrong. Where its kernel is right (64 x 64) the two
    agree bit for bit; everywhere the error is a 4-bit grid's, not several times that."""
    import bitsandbytes.functional as F

    from mmkit.compression.merge.quantized import dequantize_4bit_exact

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                    compress_statistics=nested)
    mine = dequantize_4bit_exact(packed, state)
    if shape[1] % 64 == 0:
        assert torch.equal(mine, F.dequantize_4bit(packed, state).float())
    assert (mine - w).norm() / w.norm() < 0.13  # nf4 ~0.09, fp4 ~0.12 on Gaussian weights
