"""evaluate and profile: checked against references computed another way."""

import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_DATA
from mmkit.core.data import load_data
from mmkit.core.evaluate import evaluate
from mmkit.core.loading import load_model, peek
from mmkit.core.profile import profile
from mmkit.core.tasks.causal_lm import token_stream, windows
from mmkit.core.tasks.common import classification_metrics


def _load(ref, max_samples=16):
    task = peek(ref)[3]
    ds = load_data(TINY_DATA[ref], task, max_samples=max_samples)
    labels = None if task.startswith("zero-shot") else ds.label_names
    return load_model(ref, task, labels), ds


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        t, p = rng.integers(0, 4, 50).tolist(), rng.integers(0, 5, 50).tolist()
        m = classification_metrics(t, p)
        assert m["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert m["macro_f1"] == pytest.approx(f1_score(t, p, average="macro"))


@pytest.mark.parametrize("ref", TINY)
def test_evaluate_every_tiny_family(ref):
    loaded, ds = _load(ref)
    result = evaluate(loaded, ds, "test", batch_size=4)
    if loaded.task == "causal-lm":
        assert 1 < result["perplexity"] < 2 * loaded.model.config.vocab_size
    else:
        assert 0 <= result["accuracy"] <= 1 and result["examples"] == 16
    assert result["environment"]["versions"]["torch"]


def test_batched_classification_equals_one_by_one():
    loaded, ds = _load("tiny:bert", max_samples=24)
    ds.splits["test"].inputs[0] = "a much longer text " * 10  # forces padding in its batch
    result = evaluate(loaded, ds, "test", batch_size=5)
    preds = []
    for text in ds.splits["test"].inputs:
        enc = loaded.tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
        with torch.no_grad():
            preds.append(int(loaded.model(**enc).logits.argmax(-1)))
    assert result["accuracy"] == classification_metrics(ds.splits["test"].labels, preds)["accuracy"]


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_perplexity_matches_float64_reference(ref):
    loaded, ds = _load(ref, max_samples=3)
    result = evaluate(loaded, ds, "test", batch_size=3, max_length=64)
    model = loaded.model.double()
    total, count = 0.0, 0
    for w in windows(token_stream(loaded, ds.splits["test"].inputs), 64):
        ids = torch.tensor([w])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
        count += len(w) - 1
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_zero_shot_picks_the_most_similar_prompt():
    loaded, ds = _load("tiny:clip", max_samples=8)
    result = evaluate(loaded, ds, "test")
    from mmkit.core.tasks.common import as_rgb
    from mmkit.core.tasks.zero_shot import prompts

    text = loaded.tokenizer(prompts(ds.label_names), padding=True, return_tensors="pt")
    pix = loaded.image_processor(images=[as_rgb(x) for x in ds.splits["test"].inputs],
                                 return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = loaded.model(**text, pixel_values=pix)
    preds = out.logits_per_image.argmax(-1).tolist()
    assert result["accuracy"] == classification_metrics(ds.splits["test"].labels, preds)["accuracy"]


@pytest.mark.parametrize("ref", TINY)
def test_profile_reports_consistent_figures(ref):
    loaded = load_model(ref, task_head=False)
    r = profile(loaded, "cpu", batch_size=2, seq_len=16, warmup=1, repeats=5)
    lat = r["latency_ms"]
    assert 0 < lat["min"] <= lat["median"] <= lat["p90"]
    assert r["throughput_per_s"] == pytest.approx(2 / (lat["median"] / 1e3))
    assert r["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert r["weights_mb"] > 0 and r["peak_memory_mb"] > 0
    assert next(iter(r["input_shapes"].values()))[0] == 2


def test_profile_rejects_bad_numbers_and_missing_gpu():
    from mmkit.core.errors import InputError

    loaded = load_model("tiny:gpt2")
    with pytest.raises(InputError, match="batch-size"):
        profile(loaded, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            profile(loaded, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_on_cuda_uses_cuda_events():
    loaded = load_model("tiny:llama")
    r = profile(loaded, "cuda", batch_size=4, seq_len=32, repeats=5)
    assert r["device"].startswith("cuda") and r["peak_memory_kind"] == "cuda_max_allocated"


@pytest.mark.slow
def test_minilm_eval_on_real_tweets():
    task = peek("minilm")[3]
    ds = load_data("tweets-sentiment", task, max_samples=64)
    loaded = load_model("minilm", task, ds.label_names)
    r = evaluate(loaded, ds, "test")
    assert r["examples"] == 64 and 0 <= r["accuracy"] <= 1 and loaded.fresh_head


@pytest.mark.slow
def test_smollm2_perplexity_on_bbc_text():
    ds = load_data("bbc-text", "causal-lm", max_samples=2)
    loaded = load_model("smollm2", "causal-lm")
    r = evaluate(loaded, ds, "test", max_length=128, batch_size=4)
    # a real pretrained LM: far better than uniform over its 49,152-token vocabulary
    assert 1 < r["perplexity"] < 200


def test_unsteady_timings_are_measured_again_and_flagged(monkeypatch):
    import logging

    from mmkit.core import profile as prof
    from mmkit.core.loading import load_model

    loaded = load_model("tiny:gpt2")
    busy, calm = [0.01] * 8 + [0.5, 0.5], [0.01] * 10  # p90 50x the median, then steady
    answers = [busy, calm]
    monkeypatch.setattr(prof, "_time_calls", lambda *a: answers.pop(0))
    steadied = prof.profile(loaded, "cpu", 1, 8, repeats=10)
    assert steadied["stable"] and steadied["measurements"] == 2
    assert steadied["latency_ms"]["p90"] == pytest.approx(10.0)
    monkeypatch.setattr(prof, "_time_calls", lambda *a: list(busy))
    # A handler on mmkit's own logger sees the warning whether or not an earlier CLI test
    # turned propagation to the root logger (and so pytest's caplog) off.
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("mmkit").addHandler(handler)
    try:
        flagged = prof.profile(loaded, "cpu", 1, 8, repeats=10)
    finally:
        logging.getLogger("mmkit").removeHandler(handler)
    assert not flagged["stable"] and flagged["measurements"] == prof.ATTEMPTS
    assert any("unsteady" in message for message in seen)
    env = flagged["environment"]
    assert env["threads"] >= 1 and "load_per_cpu" in env


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file at `path`."""
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux's /proc only")
def test_a_model_is_timed_in_its_own_memory_not_mapped_from_its_file(tmp_path):
    """transformers maps a safetensors file and serves the weights from it, so a model's
    speed depended on how the page cache held its file (13% between two identical BERTs).
    profile copies them into the process's own memory first: same values, ties kept."""
    from transformers import LlamaForCausalLM

    from mmkit.core.tiny import byte_tokenizer, tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    byte_tokenizer("llama").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ranges = _mapped_ranges(tmp_path / "model.safetensors")

    def mapped():
        return [n for n, p in loaded.model.named_parameters()
                if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]

    assert mapped(), "transformers no longer maps the weights: own_memory_ may be moot"
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    batch = {"input_ids": torch.randint(0, 200, (1, 8))}
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    profile(loaded, seq_len=8, warmup=0, repeats=2)
    assert mapped() == []
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, before[n]), n
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
