"""The bad-input corpus: broken model folders, bad data, bad recipes and option values, bad
stdin. Every case exits 2 with one message naming the cause, no traceback, and writes
nothing (no output, no temporary or lock files)."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmkit.cli.main import cli
from mmkit.core.recipe import run_recipe


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_artifacts):
    """Fixtures for every case, built once: {name: path}."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("corpus")
    good = tiny_artifacts["tiny:bert"]
    f = {}

    def model(name):  # a plain HF copy of a good tiny BERT (no manifest to catch edits)
        path = root / name
        shutil.copytree(good, path)
        (path / "mmkit.json").unlink()
        f[name] = path
        return path

    save_file({}, str(model("no-tensors") / "model.safetensors"))
    _edit_json(model("wrong-shapes") / "config.json", hidden_size=64, intermediate_size=128)
    _edit_json(model("config-type") / "config.json", num_hidden_layers="two")
    (model("config-json") / "config.json").write_text("{not json")
    _edit_json(model("num-labels") / "config.json", num_labels=5)
    bare = model("no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    for name, files in (("manifest-list", None), ("manifest-outside", "outside"),
                        ("manifest-files", "all")):
        path = model(name)
        manifest = json.loads((good / "mmkit.json").read_text())
        if files == "outside":
            manifest["files"]["../../etc/passwd"] = {"sha256": "0", "bytes": 1}
        elif files:
            manifest["files"] = files
        (path / "mmkit.json").write_text(json.dumps(manifest if files else []))
    onnx = model("onnx-export")  # as `mmkit export --onnx` lays it out, its graph cut short
    (onnx / "model.safetensors").unlink()
    (onnx / "model.onnx").write_bytes(b"\x08\x07" + b"\xff" * 64)
    (onnx / "mmkit_onnx.json").write_text(json.dumps(
        {"task": "text-classification", "inputs": [], "outputs": [], "int8": False}))
    cut = root / "onnx-cut"
    shutil.copytree(onnx, cut)
    _edit_json(cut / "mmkit_onnx.json", files={"model.onnx": {"sha256": "0", "bytes": 9000}})
    f["onnx-cut"] = cut
    quant = root / "quant"
    run_recipe({"model": "tiny:llama", "steps": [{"step": "quantize", "method": "rtn"}]}, quant)
    for name, text in (("quant-empty", ""), ("quant-json", "{"), ("quant-layer",
                       '{"format_version": 1, "layers": {"nope.proj": {"bits": 4}}}')):
        shutil.copytree(quant, root / name)
        (root / name / "mmkit.json").unlink()
        (root / name / "mmkit_quant.json").write_text(text)
        f[name] = root / name

    data = root / "data"
    data.mkdir()
    rows = [{"text": f"t {i}", "label": i % 2} for i in range(20)]

    def jsonl(name, row3):
        lines = [json.dumps(r) for r in rows]
        lines[3] = row3
        (data / name).write_text("\n".join(lines))
        f[name] = data / name

    jsonl("nan.jsonl", '{"text": "x", "label": NaN}')
    jsonl("list.jsonl", '{"text": "x", "label": [1]}')
    jsonl("dict.jsonl", '{"text": "x", "label": {"a": 1}}')
    jsonl("text-dict.jsonl", '{"text": {"a": 1}, "label": 1}')
    jsonl("deep.jsonl", "[" * 100_000 + "]" * 100_000)
    (data / "two-rows.csv").write_text("text,label\nhello,0\nbye,1\n")
    f["two-rows.csv"] = data / "two-rows.csv"
    (data / "nan.csv").write_text("text,label\n" + "\n".join(
        f"t{i},{'NaN' if i == 3 else i % 2}" for i in range(20)))
    f["nan.csv"] = data / "nan.csv"
    images = data / "not-images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            (images / cls / f"{i}.png").write_text("not an image")
    f["not-images"] = images
    (data / "missing.csv").write_text("image,label\n" + "\n".join(
        f"gone{i}.png,{i % 2}" for i in range(6)))
    f["missing.csv"] = data / "missing.csv"

    files = root / "files"
    files.mkdir()
    # six anchors, each nine copies of the last: 9^6 = 531,441 strings from ~300 bytes
    bomb = "model: tiny:bert\nanchors:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &{k} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, k in zip("abcde", "bcdef"))
    texts = {
        "latin1.yaml": "model: tiny:bert\n# caf\xe9\n".encode("latin-1"),
        "deep.yaml": ("model: " + "[" * 200_000 + "]" * 200_000 + "\n").encode(),
        "bomb.yaml": (bomb.replace("anchors:", "seed:") + "steps:\n  - step: cast\n    dtype: "
                      "*f\n").encode(),
        "bomb-key.yaml": bomb.encode(),
        "seed-neg.yaml": b"model: tiny:bert\nseed: -1\n",
        "seed-huge.yaml": b"model: tiny:bert\nseed: 1.0e+26\n",
        "steps-int.yaml": b"model: tiny:bert\nsteps: 5\n",
        "nan-lr.yaml": b"model: tiny:bert\nsteps:\n  - {step: finetune, lr: .nan}\n",
        "key-twice.yaml": b"model: tiny:bert\nmodel: tiny:gpt2\n",
        "samples-true.yaml": b"model: tiny:bert\nmax_samples: true\n",
        "steps-true.yaml": b"model: tiny:bert\nsteps:\n  - {step: finetune, max_steps: true}\n",
        "bits-frac.yaml": b"default: 4.7\n",
        "bits-bool.yaml": b"default: true\n",
        "bits-latin.yaml": b"default: 4 # \xe9\n",
        "bits-deep.yaml": ("default: " + "[" * 200_000 + "]" * 200_000).encode(),
    }
    for name, text in texts.items():
        (files / name).write_bytes(text)
        f[name] = files / name
    return f


OUT = "OUT"  # replaced by the case's output path


def _cases(f):
    """name -> (arguments, stdin, what the message must say)."""
    run = lambda name: ["run", f[name], "-o", OUT]  # noqa: E731
    return {
        # model folders
        "weights without tensors": (["eval", f["no-tensors"]], "", "lack 41"),
        "weights of other shapes": (["eval", f["wrong-shapes"]], "", "do not fit its config"),
        "config field of the wrong type": (["eval", f["config-type"]], "", "num_hidden_layers"),
        "config not JSON": (["eval", f["config-json"]], "", "not a valid model config"),
        "num_labels against the head": (["eval", f["num-labels"]], "", "classifier."),
        "no tokenizer": (["eval", f["no-tokenizer"]], "", "no usable tokenizer"),
        "manifest not an object": (["eval", f["manifest-list"]], "", "not an mmkit manifest"),
        "manifest file outside": (["eval", f["manifest-outside"]], "", "outside its own"),
        "manifest files not a map": (["eval", f["manifest-files"]], "", "not an mmkit manifest"),
        "empty mmkit_quant.json": (["eval", f["quant-empty"]], "", "mmkit_quant.json"),
        "corrupt mmkit_quant.json": (["eval", f["quant-json"]], "", "mmkit_quant.json"),
        "mmkit_quant.json layer": (["eval", f["quant-layer"]], "", "nope.proj"),
        "reference too long": (["inspect", "m" * 5000], "", "not a usable path"),
        "ONNX export scored": (["eval", f["onnx-export"]], "", "is an ONNX export"),
        "ONNX graph damaged": (["bench", f["onnx-export"], "--runtime", "onnxruntime"], "",
                               "cannot load"),
        "ONNX graph cut short": (["bench", f["onnx-cut"], "--runtime", "onnxruntime"], "",
                                 "not the size it was written at"),
        # data
        "NaN label in JSONL": (["eval", "tiny:bert", "--data", f["nan.jsonl"]], "", "row 4"),
        "NaN label in CSV": (["eval", "tiny:bert", "--data", f["nan.csv"]], "", "NaN"),
        "list label": (["eval", "tiny:bert", "--data", f["list.jsonl"]], "", "a list or an"),
        "object label": (["eval", "tiny:bert", "--data", f["dict.jsonl"]], "", "a list or an"),
        "object text": (["eval", "tiny:bert", "--data", f["text-dict.jsonl"]], "", "text column"),
        "JSONL nested too deep": (["eval", "tiny:bert", "--data", f["deep.jsonl"]], "",
                                  "too deeply"),
        "folder of non-images": (["eval", "tiny:vit", "--data", f["not-images"]], "",
                                 "not an image"),
        "image paths missing": (["eval", "tiny:vit", "--data", f["missing.csv"]], "",
                                "does not exist"),
        "calibration data missing": (["quantize", "tiny:llama", "--bits", "4", "--calib",
                                      "nope.txt", "-o", OUT], "", "nope.txt"),
        "calibration data of images": (["prune", "tiny:bert", "--method", "wanda", "--calib",
                                        "digits", "-o", OUT], "", "holds images"),
        # recipes
        "recipe not UTF-8": (run("latin1.yaml"), "", "not UTF-8"),
        "recipe nested too deep": (run("deep.yaml"), "", "too deeply"),
        "recipe alias bomb": (run("bomb.yaml"), "", "'seed'"),
        "recipe alias bomb key": (run("bomb-key.yaml"), "", "unknown key"),
        "recipe seed -1": (run("seed-neg.yaml"), "", "'seed'"),
        "recipe seed 1e26": (run("seed-huge.yaml"), "", "'seed'"),
        "recipe steps not a list": (run("steps-int.yaml"), "", "'steps'"),
        "recipe lr NaN": (run("nan-lr.yaml"), "", "finite"),
        "recipe key twice": (run("key-twice.yaml"), "", "'model' is given twice"),
        "recipe max_samples true": (run("samples-true.yaml"), "", "'max_samples'"),
        "recipe step number true": (run("steps-true.yaml"), "", "not true"),
        "data too small to split": (["finetune", "tiny:bert", "--data", f["two-rows.csv"], "-o",
                                     OUT], "", "too small to split"),
        "prefix beyond the positions": (["finetune", "tiny:bert", "--prefix", "-o", OUT], "",
                                        "virtual tokens"),
        # options
        "--seed -1": (["eval", "tiny:bert", "--seed", "-1"], "", "--seed"),
        "--seed 1e26": (["eval", "tiny:bert", "--seed", str(10 ** 26)], "", "--seed"),
        "--max-length beyond the model": (["eval", "tiny:bert", "--max-length", "100000"], "",
                                          "128 positions"),
        "finetune --max-length beyond": (["finetune", "tiny:bert", "--max-length", "5000",
                                          "-o", OUT], "", "128 positions"),
        "--seq-len beyond the model": (["bench", "tiny:gpt2", "--seq-len", "100000"], "",
                                       "256 positions"),
        "merge --lambda beyond float32": (["merge", "tiny:bert", "tiny:bert", "--base",
                                           "tiny:bert", "--method", "task-arithmetic",
                                           "--lambda", "1e39", "-o", OUT], "", "too large"),
        "merge --weights whose sum overflows": (["merge", "tiny:bert", "tiny:bert", "--weights",
                                                 "1e308,1e308", "-o", OUT], "", "too large"),
        "--lora --dora": (["finetune", "tiny:bert", "--lora", "--dora", "-o", OUT], "",
                          "exclude each other"),
        "--bits twice": (["quantize", "tiny:bert", "--bits", "4", "--bits", "8", "-o", OUT],
                         "", "given 2 times"),
        "--bits 4.7": (["quantize", "tiny:bert", "--bits", "4.7", "-o", OUT], "", "4.7"),
        "--bits 16 (float) alone": (["quantize", "tiny:llama", "--method", "rtn", "--bits",
                                     "16", "-o", OUT], "", "per-layer map"),
        "--skip every layer": (["quantize", "tiny:llama", "--bits", "4", "--skip", "*",
                                "-o", OUT], "", "every Linear layer"),
        "bits file 4.7": (["quantize", "tiny:bert", "--bits", f["bits-frac.yaml"], "-o", OUT],
                          "", "whole number"),
        "bits file true": (["quantize", "tiny:bert", "--bits", f["bits-bool.yaml"], "-o", OUT],
                           "", "whole number"),
        "bits file not UTF-8": (["quantize", "tiny:bert", "--bits", f["bits-latin.yaml"], "-o",
                                 OUT], "", "cannot read"),
        "bits file nested too deep": (["quantize", "tiny:bert", "--bits", f["bits-deep.yaml"],
                                       "-o", OUT], "", "cannot read"),
        "--epochs inf": (["finetune", "tiny:bert", "--epochs", "inf", "-o", OUT], "", "finite"),
        "--lr nan": (["finetune", "tiny:bert", "--lr", "nan", "-o", OUT], "", "finite"),
        "--sparsity nan": (["prune", "tiny:bert", "--sparsity", "nan", "-o", OUT], "", "finite"),
        "-o empty": (["quantize", "tiny:bert", "--bits", "8", "-o", ""], "", "-o"),
        "-o the root": (["quantize", "tiny:bert", "--bits", "8", "-o", "/"], "", "names no"),
        # stdin
        "stdin two paths, one OUT": (["prune", "-", "-o", OUT], "tiny:bert\ntiny:gpt2\n",
                                     "2 artifact paths"),
        "stdin artifact 5": (["eval", "-"], '{"artifact": 5}\n', "'artifact' key"),
        "stdin artifact null": (["eval", "-"], '{"artifact": null}\n', "'artifact' key"),
        "stdin JSON array": (["eval", "-"], "[1, 2]\n", "'artifact' key"),
        "stdin 5 MB line": (["eval", "-"], "y" * 5_000_000 + "\n", "not a usable path"),
        "stdin deep JSON": (["eval", "-"], "[" * 100_000 + "\n", "not valid JSON"),
    }


def test_every_bad_input_exits_2_with_its_cause_and_writes_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    failures = []
    for name, (args, stdin, needle) in _cases(corpus).items():
        args = [str(out) if a == OUT else str(a) for a in args]
        before = sorted(p.name for p in tmp_path.iterdir())
        result = CliRunner().invoke(cli, args, input=stdin)
        problems = []
        if result.exit_code != 2:
            problems.append(f"exit {result.exit_code}")
        if needle not in result.stderr:
            problems.append(f"no '{needle}'")
        if "Traceback" in result.stderr or result.stdout:
            problems.append("traceback or stdout")
        if len(result.stderr) > 2500:
            problems.append(f"{len(result.stderr)} characters of message")
        if sorted(p.name for p in tmp_path.iterdir()) != before:
            problems.append("wrote something")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {result.stderr[:300]}")
    assert not failures, "\n".join(failures)


def test_the_corpus_is_large_enough_to_mean_something(corpus):
    assert len(_cases(corpus)) >= 50
