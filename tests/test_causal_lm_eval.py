"""Perplexity: micro-batched so its logits stay small, and equal to a reference computed
another way (the model's own loss, window by window) at any batch size, on plain, quantized,
bitsandbytes and prompt- / prefix-tuned models."""

import math

import pytest
import torch

from mmkit.core.data import Split
from mmkit.core.loading import load_model
from mmkit.core.registry import Context, get_method
from mmkit.core.tasks import causal_lm

# about 1,300 byte-level tokens: some twenty windows of 64, the last one short (padded)
TEXTS = Split([f"Report {i}: the committee met on day {i} and agreed on {i * 7} new rules, "
               "after a long debate about budgets." for i in range(12)])
SEQ = 64


def _quantized(step: str, method: str, **params):
    """tiny:llama after one registered method."""
    m = get_method(step, method)
    return m.apply(load_model("tiny:llama"), m.config(**params), Context())


def _peft(config_class):
    """tiny:llama with a fresh peft prompt-learning adapter (random, seeded virtual tokens)."""
    import peft

    loaded = load_model("tiny:llama")
    torch.manual_seed(0)
    config = config_class(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=5)
    loaded.model = peft.get_peft_model(loaded.model, config).eval()
    return loaded


MODELS = {
    "llama": lambda: load_model("tiny:llama"),
    "gpt2": lambda: load_model("tiny:gpt2"),
    "rtn-4": lambda: _quantized("quantize", "rtn", bits=4, group_size=8),
    "nf4": lambda: _quantized("quantize", "nf4"),
    "prompt": lambda: _peft(__import__("peft").PromptTuningConfig),
    "prefix": lambda: _peft(__import__("peft").PrefixTuningConfig),
}


def _reference(loaded, split, seq_len):
    """Token-weighted mean of the model's own loss over each window, one window at a time.

    The first label is masked: a plain model never predicts it, and under prompt tuning peft
    would otherwise score it from the virtual tokens (perplexity leaves it out)."""
    wins = causal_lm.windows(causal_lm.token_stream(loaded, split.inputs), seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            labels = ids.clone()
            labels[0, 0] = -100
            loss = loaded.model(input_ids=ids, labels=labels).loss
            nll += float(loss.double()) * (len(w) - 1)
            count += len(w) - 1
    return nll / count, count


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    """Each model kind, built once for its batch sizes."""
    return MODELS[request.param]()


@pytest.mark.parametrize("batch_size,budget", [(1, None), (8, None), (8, 3)],
                         ids=["batch1", "batch8", "batch8-budget3"])
def test_perplexity_equals_the_models_own_loss(model, batch_size, budget, monkeypatch):
    # the float path for quantized layers: their fast kernels are chosen per number of rows
    # (bf16 ones agree to ~1e-3, tests/test_quant_kernels.py), and this compares batch 8 with
    # one window at a time to 1e-5
    monkeypatch.setenv("MMKIT_QUANT_KERNEL", "dequant")
    if budget:  # room for the logits of `budget` windows only: several micro-batches
        monkeypatch.setattr(causal_lm, "LOGIT_BUDGET",
                            budget * SEQ * model.model.config.vocab_size)
    ours = causal_lm.evaluate(model, TEXTS, batch_size=batch_size, max_length=SEQ)
    nll, count = _reference(model, TEXTS, SEQ)
    assert (ours["tokens"], ours["seq_len"]) == (count, SEQ)
    assert ours["windows"] == len(causal_lm.windows(
        causal_lm.token_stream(model, TEXTS.inputs), SEQ))
    assert ours["nll"] == pytest.approx(nll, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_the_reference_tells_a_misaligned_target_apart():
    """Guards the tolerance above: scoring each position against the wrong token (off by one)
    moves the nll of a random tiny model far more than rel=1e-5."""
    loaded = load_model("tiny:llama")
    ids = torch.tensor([causal_lm.token_stream(loaded, TEXTS.inputs)[:SEQ]])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].double(), -1)
    right = -logp[:-1].gather(1, ids[0, 1:, None]).mean()
    wrong = -logp[1:-1].gather(1, ids[0, 1:-1, None]).mean()
    assert abs(float(wrong / right) - 1) > 1e-3


def test_micro_batches_hold_a_bounded_number_of_logits(monkeypatch):
    loaded = load_model("tiny:llama")
    vocab = loaded.model.config.vocab_size
    monkeypatch.setattr(causal_lm, "LOGIT_BUDGET", 2 * 32 * vocab)
    widest = []
    hook = loaded.model.lm_head.register_forward_hook(
        lambda m, a, out: widest.append(out.shape[0]))
    causal_lm.evaluate(loaded, TEXTS, batch_size=64, max_length=32)
    hook.remove()
    assert len(widest) > 1 and max(widest) == 2


def test_half_precision_logits_are_scored_in_fp32():
    """A float16 model's logits are cast for the loss, and agree with its own loss closely."""
    loaded = _quantized("cast", "dtype", dtype="float16")
    ours = causal_lm.evaluate(loaded, TEXTS, batch_size=8, max_length=SEQ)
    nll, count = _reference(loaded, TEXTS, SEQ)
    assert ours["tokens"] == count and ours["nll"] == pytest.approx(nll, rel=1e-3)
