"""`mmkit search --runtime onnxruntime`: every candidate exported and measured in ONNX Runtime
(ONNX Runtime's int8 as the quant knob), the best exported as an ONNX folder and measured
again there; the ONNX Runtime model wrapper against PyTorch; the runtime's bad inputs."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mmkit.cli.main import cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BASE = ["tiny:bert", "--data", "tweets-sentiment", "--max-samples", "48", "--seq-len", "16",
        "--runtime", "onnxruntime"]


def _search(*args):
    return CliRunner().invoke(cli, ["search", *[str(a) for a in args]])


def test_the_onnx_model_scores_and_times_like_the_pytorch_one(tmp_path):
    """The wrapper the search measures through: same logits as PyTorch, so evaluate() gives
    the same accuracy through it."""
    from mmkit.compression.onnx_export import temporary_export
    from mmkit.core.data import load_data
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.ort_model import as_onnx
    from mmkit.core.tasks import get_task

    data = load_data("tweets-sentiment", "text-classification", max_samples=48)
    loaded = load_model("tiny:bert", labels=data.label_names)
    batch = get_task(loaded.task).dummy_batch(loaded, 3, 12)
    with torch.no_grad():
        expected = loaded.model(**batch).logits
    torch_accuracy = evaluate(loaded, data, "test")["accuracy"]
    with temporary_export(loaded) as folder:
        onnx = as_onnx(loaded, folder)
        assert np.allclose(onnx.model(**batch).logits, expected, atol=1e-4)
        assert evaluate(onnx, data, "test")["accuracy"] == torch_accuracy


def test_search_in_onnxruntime_end_to_end(tmp_path, monkeypatch):
    from mmkit.compression import onnx_export

    # every int8 graph is "far" now: the trials score their accuracy and must not say so
    monkeypatch.setattr(onnx_export, "FAR_AGREEMENT", 1.01)
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  layers: [0, 1]\n  quant: [none, ort-int8]\n")
    out = tmp_path / "s"
    r = _search(*BASE, "--space", space, "--trials", 4, "--latency-budget", "5x", "-o", out,
                "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    rows = {(t["params"]["layers"], t["params"]["quant"]): t
            for t in [result["best"], *result["front"]]}
    settings = json.loads((out / "search.json").read_text())["settings"]
    assert settings["runtime"] == "onnxruntime"
    # sizes are the ONNX graphs': ONNX Runtime's int8 shrinks the weights (a tiny model's
    # graph is mostly structure, so by a quarter here; MiniLM's by 4x)
    import optuna

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    sizes = {(t.params["layers"], t.params["quant"]): t.user_attrs["size_mb"]
             for t in study.trials if t.state.name == "COMPLETE"}
    assert len(sizes) == 4 and rows
    assert sizes[(0, "ort-int8")] < 0.85 * sizes[(0, "none")]
    assert sizes[(1, "none")] < sizes[(0, "none")]
    # the unmodified model against its own export: a ratio near 1
    unmodified = [t for t in study.trials if t.params == {"layers": 0, "quant": "none"}][0]
    assert 0.5 < unmodified.user_attrs["latency_ratio"] < 2
    best = out / "best"
    info = json.loads((best / "mmkit_onnx.json").read_text())
    assert (best / "model.onnx").is_file()
    assert info["int8"] == (result["best"]["params"]["quant"] == "ort-int8")
    assert r.stderr.count("strays far from PyTorch") == int(info["int8"])  # the export's own
    again = result["best_remeasured"]
    assert again["runtime"] == "onnxruntime" and "accuracy" in again["test_metrics"]
    assert again["ratio"] > 0


@pytest.mark.parametrize("space,runtime,message", [
    ("knobs:\n  quant: [none, rtn-8]\n", "onnxruntime", "PyTorch quantizer"),
    ("knobs:\n  quant: [none, ort-int8]\n", "torch", "--runtime onnxruntime"),
])
def test_quantizers_of_the_other_runtime_are_refused(tmp_path, space, runtime, message):
    path = tmp_path / "space.yaml"
    path.write_text(space)
    r = _search("tiny:bert", "--data", "tweets-sentiment", "--max-samples", "24", "--runtime",
                runtime, "--space", path, "-o", tmp_path / "s")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_default_quant_values_follow_the_runtime():
    from mmkit.search import space as spaces

    chosen = spaces.from_knob_names("layers,quant")
    assert spaces.for_runtime(chosen, "onnxruntime", False)["quant"] == ["none", "ort-int8"]
    assert "ort-int8" not in spaces.for_runtime(chosen, "torch", False)["quant"]
    assert spaces.steps_for({"layers": 0, "quant": "ort-int8"}, 2, None) == []


def test_a_candidate_whose_graph_does_not_export_is_an_invalid_trial(tmp_path, monkeypatch):
    """One cut the exporter fails on must not end a long search: that trial is recorded as
    invalid (with the reason) and the others go on."""
    import optuna

    from mmkit.compression import onnx_export
    from mmkit.core.errors import RuntimeFailure

    real = onnx_export.temporary_export

    def fails_when_cut(loaded, **kwargs):
        if len(loaded.model.bert.encoder.layer) < 2:
            raise RuntimeFailure("the graph does not reproduce PyTorch's outputs")
        return real(loaded, **kwargs)

    monkeypatch.setattr(onnx_export, "temporary_export", fails_when_cut)
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  layers: [0, 1]\n  heads: [0, 0.5]\n")
    out = tmp_path / "s"
    # the trials are what is checked: no export of the best (two more graphs) needed
    r = _search(*BASE, "--space", space, "--trials", 4, "--latency-budget", "5x", "--export",
                "none", "-o", out)
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    cut = [t for t in study.trials if t.params.get("layers") == 1]
    assert cut and all("does not reproduce" in t.user_attrs["invalid"] for t in cut)
    assert all(t.state.name == "PRUNED" for t in cut)
    assert {(0, 0), (0, 0.5)} <= {(t.params["layers"], t.params["heads"]) for t in study.trials
                                  if t.state.name == "COMPLETE"}
