"""compressed-tensors: packing against a bit-by-bit reference and the package's own packer;
RTN / GPTQ artifacts that plain transformers (with the compressed-tensors package) loads to
bit-identical weights and the same logits, and that mmkit reads back to the in-memory model
without the package; files in the layouts llm-compressor wrote before; which models stay in
mmkit's format and why (auto), and exit 2 for an explicit request the format cannot meet."""

import json
import sys

import pytest
import torch

from conftest import CALIB, logits, read_manifest, run_cli
from mmkit.compression.quantize import compressed_tensors as ct
from mmkit.compression.quantize.qlinear import QuantLinear
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.core.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- packing
def _as_int32(words: list[list[int]]):
    t = torch.tensor(words, dtype=torch.int64)
    return torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32)


def _dense_reference(values, bits):
    """Each row as one big integer, value i at bit i * bits, cut into 32-bit words."""
    out = []
    for row in values.tolist():
        big = sum(v << (i * bits) for i, v in enumerate(row))
        out.append([(big >> (32 * j)) & 0xFFFFFFFF for j in range(-(-len(row) * bits // 32))])
    return _as_int32(out)


@pytest.mark.parametrize("byteorder", ["little", "big"])  # byte-level or word-level path
@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_matches_a_bit_by_bit_reference(bits, byteorder, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(ct, "sys", SimpleNamespace(byteorder=byteorder))
    values = torch.randint(0, 2 ** bits, (3, 45), generator=torch.Generator().manual_seed(bits))
    packed = ct.pack(values, bits)
    assert torch.equal(packed, _dense_reference(values, bits))
    assert torch.equal(ct.unpack(packed, bits, 45), values)
    # zero points are packed down the columns: a transposed (strided) view
    assert torch.equal(ct.pack(values.T, bits), _dense_reference(values.T, bits))


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_the_older_whole_code_layout_reads_back(bits):
    """Before compressed-tensors 0.18, floor(32 / bits) whole values per word."""
    per = 32 // bits
    values = torch.randint(0, 2 ** bits, (2, 23), generator=torch.Generator().manual_seed(bits))
    words = [[sum(v << (k * bits) for k, v in enumerate(row[j:j + per]))
              for j in range(0, len(row), per)] for row in values.tolist()]
    assert torch.equal(ct.unpack(_as_int32(words), bits, 23, dense=False), values)


def _package_packer():
    pytest.importorskip("compressed_tensors")
    try:  # compressed-tensors 0.18+
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32)
    return pack_to_int32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_equals_the_packages_own(bits):
    pack_to_int32 = _package_packer()
    values = torch.randint(0, 2 ** bits, (6, 40), generator=torch.Generator().manual_seed(0))
    signed = (values - 2 ** (bits - 1)).to(torch.int8)  # its values: mmkit's codes - 2^(b-1)
    assert torch.equal(ct.pack(values, bits), pack_to_int32(signed, bits))
    # zero points are packed along the output dimension
    assert torch.equal(ct.pack(values.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))


# ---------------------------------------------------------------- artifacts transformers loads
def _quantize(ref, params, out):
    """Quantize in memory, write the artifact: (the in-memory model, its logits, the step
    report, the artifact path)."""
    from mmkit.core.artifacts import write_artifact
    from mmkit.core.registry import Context
    from mmkit.core.steps import apply_steps, check_steps

    params = dict(params)
    steps = [{"step": "cast", "dtype": params.pop("cast")}] if "cast" in params else []
    loaded = load_model(ref, labels=["a", "b"] if ref in ("tiny:bert", "tiny:vit") else None)
    loaded, done = apply_steps(loaded, check_steps([*steps, {"step": "quantize", **params}]),
                               Context(), announce=False)
    expected = logits(loaded)
    path = write_artifact(loaded, out, recipe={"model": ref}, steps=done, metrics=[],
                          fmt=loaded.extra["format"])
    return loaded, expected, done[-1]["report"], path


SYM = {"method": "rtn", "symmetric": True}
WRITTEN = {  # case: (model, quantize parameters); asymmetric ones only when asked for
    "llama-rtn4-g32-sym": ("tiny:llama", {**SYM, "bits": 4, "group_size": 32}),
    "llama-rtn4-g32-asym": ("tiny:llama", {"method": "rtn", "bits": 4, "group_size": 32,
                                           "format": "compressed-tensors"}),
    "llama-rtn8-channel-sym": ("tiny:llama", {**SYM, "bits": 8, "group_size": None}),
    "llama-mixed-bits-sym": ("tiny:llama", {**SYM, "bits": {"self_attn.*": 8, "default": 4},
                                            "group_size": 32}),
    "llama-gptq4-act-order-channel": ("tiny:llama", {
        "method": "gptq", "bits": 4, "group_size": None, "symmetric": True, "act_order": True,
        "calib": CALIB["tiny:llama"], "calib_samples": 4, "calib_length": 32}),
    "llama-rtn4-g32-sym-float16": ("tiny:llama", {**SYM, "bits": 4, "group_size": 32,
                                                  "cast": "float16"}),
    "bert-rtn4-g32-sym": ("tiny:bert", {**SYM, "bits": 4, "group_size": 32}),
    "clip-rtn4-g32-sym": ("tiny:clip", {**SYM, "bits": 4, "group_size": 32}),
    "bert-gptq8-channel-asym": ("tiny:bert", {
        "method": "gptq", "bits": 8, "group_size": None, "act_order": True,
        "calib": CALIB["tiny:bert"], "calib_samples": 4, "calib_length": 32,
        "format": "compressed-tensors"}),
}


DEQUANTIZE_WARNING = "ignore:You passed `quantization_config`:UserWarning"  # dequantize=True


@pytest.mark.filterwarnings(DEQUANTIZE_WARNING)
@pytest.mark.parametrize("case", WRITTEN)
def test_written_model_loads_in_transformers_and_in_mmkit_alike(case, tmp_path, monkeypatch):
    ref, params = WRITTEN[case]
    loaded, expected, report, path = _quantize(ref, params, tmp_path / "q")
    assert report["format"] == "compressed-tensors" and "format_note" not in report
    assert read_manifest(path)["format"] == "compressed-tensors"
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert not (path / "mmkit_quant.json").exists()
    schemes = [g["weights"] for g in qc["config_groups"].values()]
    assert {s["symmetric"] for s in schemes} == {params.get("symmetric", False)}
    # mmkit reads it back without the package: the same layers, the same logits
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "compressed_tensors", None)  # any import of it would fail
        again = load_model(str(path))
    assert again.extra["format"] == "compressed-tensors"
    ours = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in again.model.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == report["layers_quantized"]
    for name, layer in ours.items():
        back = theirs[name]
        assert back.bits == layer.bits and torch.equal(back.codes(), layer.codes())
        assert torch.equal(back.weight_float(), layer.weight_float())
    if "cast" in params:  # the cast step leaves llama's rotary inv_freq in float16 in memory;
        # a model built from the files keeps it float32, as transformers does
        assert logits(again).dtype == expected.dtype == torch.float16
        torch.testing.assert_close(logits(again), expected, rtol=0, atol=1e-3)
    else:
        assert torch.equal(logits(again), expected)
    # plain transformers with the compressed-tensors package
    pytest.importorskip("compressed_tensors")
    import transformers

    cls = {"tiny:llama": transformers.AutoModelForCausalLM, "tiny:clip": transformers.AutoModel,
           "tiny:bert": transformers.AutoModelForSequenceClassification}[ref]
    options = {}
    if not params.get("symmetric"):  # packed zero points: see compressed_tensors.ASYMMETRIC
        options["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    plain = cls.from_pretrained(str(path), **options).eval()
    batch = get_task(again.task).dummy_batch(again, 2, 12)
    monkeypatch.setenv("MMKIT_QUANT_KERNEL", "dequant")  # float matmuls, as transformers does
    with torch.no_grad():
        got, want = plain(**batch), again.model(**batch)
    got, want = ((o.logits if "logits" in o else o.logits_per_image) for o in (got, want))
    for name, layer in ours.items():  # transformers decompressed to float: bit-identical
        weight = plain.get_submodule(name).weight
        assert torch.equal(weight, layer.weight_float().to(weight.dtype)), name
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_several_schemes_are_one_config_group_each(tmp_path):
    *_, path = _quantize("tiny:llama", WRITTEN["llama-mixed-bits-sym"][1], tmp_path / "q")
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert sorted(by_bits) == [4, 8]
    assert "model.layers.1.self_attn.o_proj" in by_bits[8]
    assert "model.layers.0.mlp.down_proj" in by_bits[4] and qc["ignore"] == []
    *_, one = _quantize("tiny:llama", WRITTEN["llama-rtn4-g32-sym"][1], tmp_path / "one")
    qc = json.loads((one / "config.json").read_text())["quantization_config"]
    # 32-wide layers (one group) and 64-wide down_proj (two) share group size 32
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    assert group["weights"]["strategy"] == "group" and group["weights"]["group_size"] == 32


# ---------------------------------------------------------------- files mmkit did not write
@pytest.mark.filterwarnings(DEQUANTIZE_WARNING)
def test_reads_what_the_package_writes(tmp_path):
    """A checkpoint compressed by the compressed-tensors package itself (asymmetric groups),
    read by mmkit, against the package's own decompression through transformers."""
    pytest.importorskip("compressed_tensors")
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)

    from mmkit.compression.quantize import grid
    from mmkit.core.tiny import byte_tokenizer, tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=16)
    apply_quantization_config(model, QuantizationConfig(config_groups={
        "group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):  # a min-max grid (mmkit's RTN) as calibration
            _, scales, zeros = grid.quantize_rows(module.weight.detach(), 4, 16, False)
            module.weight_scale.data.copy_(scales)
            module.weight_zero_point.data.copy_((zeros - 8).to(module.weight_zero_point.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "ct")
    compressor.update_config(tmp_path / "ct")
    byte_tokenizer("causal").save_pretrained(tmp_path / "ct")
    ours = load_model(str(tmp_path / "ct"))
    assert ours.extra["format"] == "compressed-tensors"
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    for name, layer in ours.model.named_modules():
        if isinstance(layer, QuantLinear):
            assert torch.equal(plain.get_submodule(name).weight, layer.weight_float()), name


def test_reads_act_order_files_of_older_versions(tmp_path):
    """compressed-tensors before 0.19 stored act-order GPTQ's permuted groups as
    `weight_g_idx` (actorder "group"); mmkit reads them to the same model."""
    from safetensors.torch import save_file

    loaded, expected, report, path = _quantize("tiny:llama", {
        "method": "gptq", "bits": 4, "group_size": 16, "symmetric": True, "act_order": True,
        "calib": CALIB["tiny:llama"], "calib_samples": 4, "calib_length": 32}, tmp_path / "g")
    assert report["format"] == "mmkit-quantized" and "act-order" in report["format_note"]
    state = {k: v for k, v in loaded.model.state_dict().items()}
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    tensors = {k: v.contiguous() for k, v in state.items() if k.rpartition(".")[0] not in layers}
    for name, layer in layers.items():
        tensors[f"{name}.weight_packed"] = ct.pack(layer.codes(), 4)
        tensors[f"{name}.weight_scale"] = layer.scales.float()
        tensors[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        tensors[f"{name}.weight_g_idx"] = layer.g_idx.clone()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    loaded.model.config.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.12.2",
        "quantization_status": "compressed", "ignore": ["lm_head"], "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                "group_size": 16, "actorder": "group", "dynamic": False}}}}
    (folder / "config.json").write_text(json.dumps(config))
    again = load_model(str(folder))
    for name, layer in layers.items():
        assert torch.equal(again.model.get_submodule(name).g_idx, layer.g_idx)
    assert torch.equal(logits(again), expected)


# ---------------------------------------------------------------- what stays in mmkit's format
KEPT = {  # case: (model, quantize parameters, the reason the report gives)
    "3-bit": ("tiny:llama", {**SYM, "bits": 3, "group_size": 32}, "3-bit codes"),
    "act-order groups": ("tiny:llama", {
        "method": "gptq", "bits": 4, "group_size": 16, "symmetric": True,
        "calib": CALIB["tiny:llama"], "calib_samples": 4, "calib_length": 32}, "act-order"),
    "partial groups": ("tiny:llama", {**SYM, "bits": 4, "group_size": 24}, "not a multiple"),
    "asymmetric": ("tiny:llama", {"method": "rtn", "bits": 4, "group_size": 32}, "asymmetric"),
    "gpt2 Conv1D": ("tiny:gpt2", {**SYM, "bits": 4, "group_size": 16}, "Conv1D"),
    "vit renamed weights": ("tiny:vit", {**SYM, "bits": 4, "group_size": 16}, "renames"),
    "quantized embeddings": ("tiny:llama", {**SYM, "bits": 4, "group_size": 32,
                                            "embeddings": 8}, "token-embedding"),
    "bfloat16": ("tiny:llama", {**SYM, "bits": 4, "group_size": 32, "cast": "bfloat16"},
                 "bfloat16"),
}


@pytest.mark.parametrize("case", KEPT)
def test_auto_keeps_mmkit_format_and_says_why(case, tmp_path):
    ref, params, why = KEPT[case]
    loaded, expected, report, path = _quantize(ref, params, tmp_path / "q")
    assert report["format"] == "mmkit-quantized" and why in report["format_note"]
    assert (path / "mmkit_quant.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    if "cast" not in params:  # (mmkit's own format reloads a bfloat16 model as float32)
        assert torch.equal(logits(load_model(str(path))), expected)


REFUSED = {  # flags on top of `mmkit quantize MODEL --format compressed-tensors`
    "3-bit": (["tiny:llama", "--bits", "3", "--method", "rtn"], "3-bit codes"),
    "act-order groups": (["tiny:llama", "--bits", "4", "--method", "gptq", "--calib",
                          "bbc-text", "--group-size", "16"], "act-order"),
    "embeddings": (["tiny:llama", "--bits", "4", "--method", "rtn", "--embeddings", "8"],
                   "token-embedding"),
    "partial groups": (["tiny:llama", "--bits", "4", "--method", "rtn", "--group-size", "24"],
                       "not a multiple of the group size 24"),
    "gpt2 Conv1D": (["tiny:gpt2", "--bits", "4", "--method", "rtn"], "Conv1D"),
    "vit": (["tiny:vit", "--bits", "8", "--group-size", "0"], "renames"),
}


def test_an_explicit_request_on_a_bfloat16_model_is_refused(tmp_path):
    from mmkit.core.errors import InputError

    with pytest.raises(InputError, match="bfloat16.*cast it to float32"):
        run_recipe({"model": "tiny:llama", "steps": [
            {"step": "cast", "dtype": "bfloat16"},
            {"step": "quantize", "method": "rtn", "bits": 4, "group_size": 32,
             "format": "compressed-tensors"}]}, tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("case", REFUSED)
def test_an_explicit_request_it_cannot_meet_exits_2(case, tmp_path):
    args, why = REFUSED[case]
    result = run_cli("quantize", *args, "--format", "compressed-tensors", "-o", tmp_path / "q")
    assert result.exit_code == 2, result.output
    assert why in result.stderr and "--format mmkit" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "q").exists()


def test_cli_says_which_format(tmp_path):
    result = run_cli("quantize", "tiny:llama", "--bits", "4", "--group-size", "32",
                     "--symmetric", "-o", tmp_path / "ct")
    assert result.exit_code == 0, result.stderr
    assert "using rtn" in result.stderr and "format: compressed-tensors" in result.stdout
    result = run_cli("quantize", "tiny:llama", "--bits", "4", "--group-size", "32",
                     "--symmetric", "--format", "mmkit", "-o", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["steps"][0]["report"]
    assert report["format"] == "mmkit-quantized" and "--format mmkit" in report["format_note"]
    assert read_manifest(tmp_path / "m")["format"] == "mmkit-quantized"


# ---------------------------------------------------------------- a real model
@pytest.mark.slow
def test_smollm2_loads_in_transformers_with_mmkits_perplexity(tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    import transformers

    from mmkit.core.data import load_data
    from mmkit.core.evaluate import evaluate

    # SmolLM2's 576-wide layers take groups of 64 (not mmkit's default 128)
    result = run_recipe({"model": "smollm2", "steps": [
        {"step": "quantize", "method": "rtn", "bits": 4, "group_size": 64,
         "symmetric": True}]}, tmp_path / "q")
    assert result["steps"][0]["report"]["format"] == "compressed-tensors"
    monkeypatch.setenv("MMKIT_QUANT_KERNEL", "dequant")
    data = load_data("bbc-text", "causal-lm", max_samples=2)
    ours = load_model(result["artifact"])
    mmkit_ppl = evaluate(ours, data, "test", max_length=128, batch_size=4)["perplexity"]
    ours.model = transformers.AutoModelForCausalLM.from_pretrained(result["artifact"]).eval()
    plain_ppl = evaluate(ours, data, "test", max_length=128, batch_size=4)["perplexity"]
    assert 1 < mmkit_ppl < 200
    assert plain_ppl == pytest.approx(mmkit_ppl, rel=1e-4)


def test_a_compressed_tensors_artifact_counts_as_quantized(tmp_path):
    from mmkit.core.inspect import applicable_methods

    *_, path = _quantize("tiny:llama", WRITTEN["llama-rtn4-g32-sym"][1], tmp_path / "q")
    methods = applicable_methods(load_model(str(path)))
    assert not [m for m in methods if m.split(":")[0] in ("prune", "quantize", "finetune")]
    for args, why in ((["prune", path, "--method", "magnitude"], "quantized already"),
                      (["quantize", path, "--bits", "4"], "quantized already")):
        result = run_cli(*args, "-o", tmp_path / "again")
        assert result.exit_code == 2 and why in result.stderr, result.output
    # and the library's own check, for a caller that applies the step directly
    from mmkit.core.errors import InputError
    from mmkit.core.registry import Context
    from mmkit.core.steps import apply_steps, check_steps

    with pytest.raises(InputError, match="is a quantized model"):
        apply_steps(load_model(str(path)), check_steps([{"step": "prune",
                                                         "method": "magnitude"}]), Context())
