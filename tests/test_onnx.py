"""`mmkit export --onnx` and `mmkit bench --runtime onnxruntime`: the graph ONNX Runtime runs
gives PyTorch's outputs on fresh inputs of other batch sizes and lengths (fed here by hand,
not through the exporter's own check), the int8 graph holds int8 weights and mostly agrees,
the bench's figures have the PyTorch bench's fields, and bad input exits 2 with no output."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict:
    """tiny:bert and tiny:vit with trained-head-shaped classifiers (new heads for the data's
    labels), saved as artifacts."""
    from mmkit.core.recipe import run_recipe

    root = tmp_path_factory.mktemp("classifiers")
    out = {}
    for ref, data in (("tiny:bert", "tweets-sentiment"), ("tiny:vit", "digits")):
        path = root / ref.split(":")[1]
        run_recipe({"model": ref, "data": data, "max_samples": 16,
                    "steps": [{"step": "cast", "dtype": "float32"}]}, path)
        out[ref] = path
    return out


def export(model, out, *more):
    """`mmkit export MODEL --onnx ... -o OUT --json`: its JSON result (the export must work)."""
    result = run_cli("export", model, "--onnx", *more, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def fresh_batch(loaded, batch_size=3, seq_len=9) -> dict:
    """Inputs unlike the exporter's own: random token ids with the last row padded, or
    random pixels; CLIP gets both (4 prompts, 2 images)."""
    gen = torch.Generator().manual_seed(123)
    batch = {}
    config = loaded.model.config
    if loaded.tokenizer is not None:
        vocab = getattr(config, "text_config", config).vocab_size
        n = 4 if loaded.kind == "clip" else batch_size
        ids = torch.randint(5, vocab, (n, seq_len), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, seq_len // 2:] = 0
        batch.update(input_ids=ids, attention_mask=mask)
    if loaded.image_processor is not None:
        vision = getattr(config, "vision_config", config)
        n = 2 if loaded.kind == "clip" else batch_size
        side = vision.image_size
        batch["pixel_values"] = torch.randn(n, 3, side, side, generator=gen)
    return batch


def filler(spec, ids):
    """A graph input the batch lacks: one segment, positions 0.., an empty KV cache."""
    batch, length = ids.shape
    if spec.name == "position_ids":
        return np.tile(np.arange(length), (batch, 1))
    if spec.name.startswith("past_key_values."):
        return np.zeros((batch, spec.shape[1], 0, spec.shape[3]), np.float32)
    return np.zeros_like(ids.numpy())


def ort_outputs(folder, batch) -> dict:
    """Plain onnxruntime on the folder's model.onnx, fed the graph's inputs from `batch`."""
    sess = ort.InferenceSession(str(Path(folder) / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() if i.name in batch else filler(i, batch["input_ids"])
             for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def torch_outputs(loaded, batch, names) -> dict:
    with torch.no_grad():
        out = loaded.model(**batch)
    return {name: getattr(out, name).numpy() for name in names}


def real_positions(batch, name, array):
    """Per-token outputs at real tokens only (padded positions are nobody's answer)."""
    if array.ndim == 3 and "attention_mask" in batch:
        return array[batch["attention_mask"].numpy().astype(bool)]
    return array


CASES = {
    "bert-classifier": ("tiny:bert", ["logits"]),
    "vit-classifier": ("tiny:vit", ["logits"]),
    "llama": ("tiny:llama", ["logits"]),
    "gpt2": ("tiny:gpt2", ["logits"]),
    "clip": ("tiny:clip", ["logits_per_image", "text_embeds", "image_embeds"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_runtime_gives_pytorchs_outputs(case, classifiers, tmp_path):
    from transformers import AutoConfig

    from mmkit.core.loading import load_model

    ref, outputs = CASES[case]
    model = str(classifiers[ref]) if case.endswith("classifier") else ref
    info = export(model, tmp_path / "onnx")
    folder = tmp_path / "onnx"
    names = [o["name"] for o in info["outputs"]]
    # a causal LM's graph also returns its KV cache (checked by the decoding test below)
    if case in ("llama", "gpt2"):
        layers = load_model(model).model.config.num_hidden_layers
        outputs_and_cache = outputs + [f"present.{i}.{kv}" for i in range(layers)
                                       for kv in ("key", "value")]
    assert names == (outputs_and_cache if case in ("llama", "gpt2") else outputs)
    assert info["check"]["fp32"]["passed"] and not info["int8"]
    assert {"model.onnx", "config.json", "mmkit_onnx.json"} <= {p.name for p in folder.iterdir()}
    assert AutoConfig.from_pretrained(folder).model_type == load_model(model).family
    # the batch axis and the sequence axis are named, not fixed
    dims = {d for i in info["inputs"] for d in i["shape"] if isinstance(d, str)}
    assert "sequence" in dims or ref == "tiny:vit"

    loaded = load_model(model, task_head=False)
    batch = fresh_batch(loaded)
    want, got = torch_outputs(loaded, batch, outputs), ort_outputs(folder, batch)
    for name in outputs:
        np.testing.assert_allclose(real_positions(batch, name, got[name]),
                                   real_positions(batch, name, want[name]),
                                   atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_causal_lm_decodes_on_its_exported_kv_cache_as_pytorch_does(family, tmp_path):
    """Greedy decoding in ONNX Runtime, feeding back the presents the graph returns, picks
    PyTorch's tokens with PyTorch's logits at every step (a prompt of another length and
    batch than the exporter's own check)."""
    from mmkit.core.decoding import greedy_decode
    from mmkit.core.loading import load_model
    from mmkit.core.ort_decoding import ort_greedy_decode

    info = export(f"tiny:{family}", tmp_path / "onnx")
    assert info["kv_cache"] is True and info["check"]["fp32"]["decoding"]["within_tolerance"]
    names = [i["name"] for i in info["inputs"]]
    layers = load_model(f"tiny:{family}").model.config.num_hidden_layers
    assert names[:2] == ["input_ids", "attention_mask"]
    assert names[-2 * layers:] == [f"past_key_values.{i}.{kv}" for i in range(layers)
                                   for kv in ("key", "value")]
    assert [o["name"] for o in info["outputs"]] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    loaded = load_model(f"tiny:{family}")
    prompt = torch.randint(0, loaded.model.config.vocab_size, (3, 9),
                           generator=torch.Generator().manual_seed(5))
    want, _, _ = greedy_decode(loaded.model, prompt, 7)
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    got, _, _, steps = ort_greedy_decode(sess, prompt.numpy(), 7)
    np.testing.assert_array_equal(got, want.numpy())
    # every step's logits: PyTorch's forward on the whole sequence so far, without a cache
    with torch.no_grad():
        full = loaded.model(torch.cat([prompt, want], dim=1), use_cache=False).logits
    for step, logits in enumerate(steps):
        np.testing.assert_allclose(logits, full[:, 8 + step].numpy(), atol=1e-4, rtol=1e-4)


def test_bench_generates_in_onnx_runtime_with_the_pytorch_benchs_fields(tmp_path):
    export("tiny:llama", tmp_path / "onnx", "--int8")
    common = ("--generate", 5, "--seq-len", 12, "--repeats", 2, "--warmup", 1, "--threads", 1,
              "--json")
    reference = json.loads(run_cli("bench", "tiny:llama", *common).stdout)
    assert reference["runtime"] == "torch"
    for model in (tmp_path / "onnx", "tiny:llama"):  # an export, and a temporary one
        run = run_cli("bench", model, "--runtime", "onnxruntime", "--batch-size", 1,
                      "--batch-size", 3, *common)
        assert run.exit_code == 0, run.output
        rows = [json.loads(line) for line in run.stdout.strip().splitlines()]
        assert [r["batch_size"] for r in rows] == [1, 3]
        for r in rows:
            assert set(reference) <= set(r) and r["runtime"] == "onnxruntime"
            assert (r["prompt_tokens"], r["new_tokens"]) == (12, 5)
            assert len(r["decode_seconds"]) == 2 and r["decode_tokens_per_s"] > 0
            # the median repeat's rate (not the fastest's: a check that holds on a loaded
            # machine, where two repeats' times can differ several-fold)
            assert r["decode_tokens_per_s"] == pytest.approx(
                r["batch_size"] * 5 / statistics.median(r["decode_seconds"]), rel=1e-9)
        assert rows[0]["dtype"] == ("int8" if model != "tiny:llama" else "float32")
    human = run_cli("bench", tmp_path / "onnx", "--runtime", "onnxruntime", "--generate", 3,
                    "--seq-len", 8, "--repeats", 1)
    assert human.exit_code == 0 and "onnxruntime int8" in human.output and "tokens/s" in \
        human.output


def test_generating_with_an_export_that_cannot_is_refused(classifiers, tmp_path):
    """An encoder's export, and a causal LM exported by an earlier mmkit (no cache)."""
    export(str(classifiers["tiny:bert"]), tmp_path / "bert")
    _refused(run_cli("bench", tmp_path / "bert", "--runtime", "onnxruntime", "--generate", 4,
                     "--seq-len", 8), "needs a causal LM")
    export("tiny:gpt2", tmp_path / "gpt2")
    info_file = tmp_path / "gpt2" / "mmkit_onnx.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "kv_cache": False}))
    _refused(run_cli("bench", tmp_path / "gpt2", "--runtime", "onnxruntime", "--generate", 4,
                     "--seq-len", 8), "without a KV cache")


def _initializer_bytes(path) -> dict:
    """Bytes of the graph's weights by element type."""
    from onnx import numpy_helper

    sizes = {}
    for init in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(init)
        sizes[array.dtype.name] = sizes.get(array.dtype.name, 0) + array.nbytes
    return sizes


def test_int8_graph_has_int8_weights_and_mostly_agrees(tmp_path):
    from mmkit.core.loading import load_model

    fp32 = export("tiny:llama", tmp_path / "fp32")
    int8 = export("tiny:llama", tmp_path / "int8", "--int8")
    assert int8["int8"] and int8["quantization"]["method"] == "onnxruntime dynamic"
    assert int8["onnx_mb"] < fp32["onnx_mb"]
    assert int8["fp32_onnx_mb"] == pytest.approx(fp32["onnx_mb"], rel=0.01)
    before, after = (_initializer_bytes(tmp_path / n / "model.onnx") for n in ("fp32", "int8"))
    # the float weights went to 8-bit codes (4x smaller): every MatMul's (int8) and the
    # embedding table's (uint8); scales and norms stay float
    assert after["int8"] + after["uint8"] >= 0.24 * before["float32"]
    assert after["float32"] < 0.1 * before["float32"]

    loaded = load_model("tiny:llama")
    batch = fresh_batch(loaded, batch_size=4, seq_len=24)
    want = torch_outputs(loaded, batch, ["logits"])["logits"]
    got = ort_outputs(tmp_path / "int8", batch)["logits"]
    mask = batch["attention_mask"].numpy().astype(bool)
    agreement = np.mean(want[mask].argmax(-1) == got[mask].argmax(-1))
    assert agreement >= 0.85
    assert 0 < np.abs(want - got)[mask].max() < 0.5  # quantized: close, not equal
    reported = int8["check"]["int8"]["outputs"]["logits"]
    assert 0.85 <= reported["argmax_agreement"] <= 1 and reported["max_abs_diff"] > 0


def test_an_int8_graph_far_from_pytorch_is_said_so_on_stderr(tmp_path, monkeypatch):
    from mmkit.compression import onnx_export

    monkeypatch.setattr(onnx_export, "FAR_AGREEMENT", 1.01)  # no graph reaches 101%
    result = run_cli("export", "tiny:gpt2", "--onnx", "--int8", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)["check"]["int8"]["outputs"]["logits"]
    assert "strays far from PyTorch" in result.stderr
    assert f"top-1 agreement {reported['argmax_agreement']:.0%}" in result.stderr


def test_a_lora_adapter_is_merged_before_export(tmp_path):
    from mmkit.core.loading import load_model
    from mmkit.core.recipe import run_recipe

    adapter = run_recipe({"model": "tiny:bert", "max_samples": 16, "seed": 0, "steps": [
        {"step": "finetune", "method": "lora", "max_steps": 2, "lr": 1e-2}]},
        tmp_path / "lora")["artifact"]
    info = export(adapter, tmp_path / "onnx")
    assert info["merged_adapter"] == str(adapter) and info["head"] == "logits"

    peft_model = load_model(str(adapter))  # the adapter unmerged, on its base
    assert hasattr(peft_model.model, "peft_config")
    base = load_model("tiny:bert", labels=peft_model.labels, seed=0)
    batch = fresh_batch(peft_model)
    want = torch_outputs(peft_model, batch, ["logits"])["logits"]
    assert not np.allclose(want, torch_outputs(base, batch, ["logits"])["logits"], atol=1e-4)
    np.testing.assert_allclose(ort_outputs(tmp_path / "onnx", batch)["logits"], want,
                               atol=1e-4, rtol=1e-4)


def test_a_causal_lms_classifier_trains_fully_and_exports_its_logits_without_a_kv_cache(
        tmp_path):
    """A Llama with a classification head: full fine-tuning evaluates without the KV cache
    the model would return (the Trainer cannot gather it), and the export is the classifier's
    graph (logits, no cache inputs), not the decoder's."""
    from mmkit.core.loading import load_model
    from mmkit.core.recipe import run_recipe

    tuned = run_recipe({"model": "tiny:llama", "task": "text-classification",
                        "data": "tweets-sentiment", "max_samples": 16, "steps": [
                            {"step": "finetune", "method": "full", "max_steps": 1}]},
                       tmp_path / "tuned")["artifact"]
    loaded = load_model(tuned)
    assert loaded.model.config.use_cache  # as it was before training
    info = export(tuned, tmp_path / "onnx")
    assert info["kv_cache"] is None and info["head"] == "logits"
    assert [o["name"] for o in info["outputs"]] == ["logits"]
    batch = fresh_batch(loaded)
    want = torch_outputs(loaded, batch, ["logits"])["logits"]
    np.testing.assert_allclose(ort_outputs(tmp_path / "onnx", batch)["logits"], want,
                               atol=1e-4, rtol=1e-4)


PROFILE_FIELDS = {"device", "batch_size", "seq_len", "input_shapes", "warmup", "repeats",
                  "latency_ms", "spread", "stable", "measurements", "throughput_per_s",
                  "peak_memory_mb", "peak_memory_kind", "parameters", "weights_mb", "disk_mb",
                  "dtype", "environment", "model", "task", "runtime"}


def test_bench_on_onnx_runtime_reports_what_the_pytorch_bench_does(tmp_path):
    info = export("tiny:bert", tmp_path / "onnx", "--int8")
    common = ("--seq-len", 16, "--repeats", 3, "--warmup", 1, "--threads", 1, "--json")
    torch_run = run_cli("bench", "tiny:bert", *common)
    assert torch_run.exit_code == 0, torch_run.output
    reference = json.loads(torch_run.stdout)
    assert PROFILE_FIELDS <= set(reference) and reference["runtime"] == "torch"

    for model in (tmp_path / "onnx", "tiny:bert"):  # an export, and a model exported first
        run = run_cli("bench", model, "--runtime", "onnxruntime", "--batch-size", 1,
                      "--batch-size", 2, *common)
        assert run.exit_code == 0, run.output
        results = [json.loads(line) for line in run.stdout.strip().splitlines()]
        assert [r["batch_size"] for r in results] == [1, 2]
        for r in results:
            assert set(reference) <= set(r) and r["runtime"] == "onnxruntime"
            assert r["environment"]["threads"] == 1 and r["environment"]["versions"]["onnxruntime"]
            assert r["input_shapes"]["input_ids"] == [r["batch_size"], 16]
            assert r["latency_ms"]["median"] > 0 and r["parameters"] == reference["parameters"]
            assert r["task"] == reference["task"]
    assert results[0]["dtype"] == "float32"  # the temporary export is float32
    int8_run = json.loads(run_cli("bench", tmp_path / "onnx", "--runtime", "onnxruntime",
                                  *common).stdout)
    assert int8_run["dtype"] == "int8"
    assert int8_run["disk_mb"] == pytest.approx(
        (tmp_path / "onnx" / "model.onnx").stat().st_size / 1e6)
    assert info["onnx_mb"] == pytest.approx(int8_run["disk_mb"])


def test_sessions_take_their_threads_and_can_sleep_between_calls(tmp_path):
    from mmkit.core.ort_runtime import session

    export("tiny:bert", tmp_path / "onnx")
    quiet = session(tmp_path / "onnx" / "model.onnx", 2, spin=False).get_session_options()
    assert quiet.intra_op_num_threads == 2
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = session(tmp_path / "onnx" / "model.onnx", 1).get_session_options()
    assert default.intra_op_num_threads == 1
    with pytest.raises(RuntimeError):  # not set: ONNX Runtime's default (spinning)
        default.get_session_config_entry("session.intra_op.allow_spinning")


def _refused(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    quantized = tmp_path / "q"
    made = run_cli("quantize", "tiny:bert", "--method", "rtn", "--bits", 8, "--max-samples", 8,
                   "-o", quantized)
    assert made.exit_code == 0, made.output
    out = tmp_path / "out"
    _refused(run_cli("export", quantized, "--onnx", "-o", out), "QuantLinear", "--int8")
    _refused(run_cli("export", "tiny:bert", "--onnx"), "-o")
    _refused(run_cli("export", "tiny:bert", "-o", out), "--onnx")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    export("tiny:bert", out)
    first = (out / "model.onnx").stat().st_mtime_ns
    _refused(run_cli("export", "tiny:gpt2", "--onnx", "-o", out), "already exists",
             "--overwrite")
    assert (out / "model.onnx").stat().st_mtime_ns == first
    replaced = export("tiny:gpt2", out, "--overwrite")  # its own export: replaced whole
    assert replaced["family"] == "gpt2"
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep")
    _refused(run_cli("export", "tiny:bert", "--onnx", "-o", stranger, "--overwrite"),
             "did not write")
    _refused(run_cli("bench", out), "--runtime onnxruntime")
    _refused(run_cli("bench", out, "--runtime", "onnxruntime", "--task",
                     "text-classification", "--seq-len", 8), "exported for causal-lm")


def test_a_real_subprocess_exports_with_clean_stdout_and_refuses_with_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mmkit.cli.main", "export", "tiny:bert", "--onnx",
               "--int8", "-o", str(tmp_path / "m"), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["int8"]  # nothing else on stdout
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and again.stdout == ""
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_minilm_exports_and_matches_sentence_embeddings(tmp_path):
    from mmkit.core.loading import load_model

    fp32 = export("minilm", tmp_path / "fp32")
    int8 = export("minilm", tmp_path / "int8", "--int8")
    assert [i["name"] for i in fp32["inputs"]] == ["input_ids", "attention_mask",
                                                   "token_type_ids"]
    assert 85 < fp32["onnx_mb"] < 95 and int8["onnx_mb"] < 30

    loaded = load_model("minilm", task_head=False)
    sentences = ["ONNX Runtime runs the exported graph.", "A cat sat on the warm mat today",
                 "Prices fell sharply."]
    enc = loaded.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = loaded.model(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy()[..., None]

    def pooled(hidden):  # the sentence embedding all-MiniLM-L6-v2 is used for
        return (hidden * mask).sum(1) / mask.sum(1)

    got = ort_outputs(tmp_path / "fp32", dict(enc))["last_hidden_state"]
    np.testing.assert_allclose(pooled(got), pooled(want), atol=1e-4)
    got8 = pooled(ort_outputs(tmp_path / "int8", dict(enc))["last_hidden_state"])
    cosine = np.sum(got8 * pooled(want), -1) / (np.linalg.norm(got8, axis=-1)
                                                * np.linalg.norm(pooled(want), axis=-1))
    assert cosine.min() > 0.97


def test_the_tolerance_scales_with_each_rows_largest_value():
    """float32 rounding in a row (one token's logits) grows with its largest values: a logit
    near 0 beside logits of 30 may differ by 1.5e-4 (smollm2's export), a row of small values
    keeps the tight bound, and a real error (0.1) fails either way."""
    from mmkit.compression.onnx_check import compare, within

    ref = np.array([[30.0, 0.01, -2.0], [0.5, 0.01, -0.2]])
    rounding = np.array([[0.0, 2e-4, 0.0], [0.0, 0.0, 0.0]])
    assert within(rounding, ref, 1e-4, 1e-4)  # the first row's bound: 1e-4 + 30e-4
    assert not within(rounding[::-1], ref, 1e-4, 1e-4)  # the second row's: 1.5e-4
    assert not within(np.array([[0.0, 0.1, 0.0], [0.0] * 3]), ref, 1e-4, 1e-4)
    report = compare("logits", [(ref, ref + rounding)], 1e-4, 1e-4)
    assert report["within_tolerance"] and report["argmax_agreement"] == 1.0
    assert report["max_abs_diff"] == pytest.approx(2e-4)
