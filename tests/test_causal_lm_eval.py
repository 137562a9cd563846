"""Perplexity: micro-batched so its logits stay small, and equal to a reference computed
another way (transformers' own loss, window by window) at any batch size."""

import math

import pytest
import torch

from mmkit.core.data import Split
from mmkit.core.loading import load_model
from mmkit.core.tasks import causal_lm

# about 1,300 byte-level tokens: some twenty windows of 64
TEXTS = Split([f"Report {i}: the committee met on day {i} and agreed on {i * 7} new rules, "
               "after a long debate about budgets." for i in range(12)])


def _reference(loaded, split, seq_len):
    """Token-weighted mean of the model's own loss (labels = inputs) over each window."""
    wins = causal_lm.windows(causal_lm.token_stream(loaded, split.inputs), seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            loss = loaded.model(input_ids=ids, labels=ids).loss
            nll += float(loss.double()) * (len(w) - 1)
            count += len(w) - 1
    return nll / count, count


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
@pytest.mark.parametrize("batch_size,budget", [(1, None), (8, None), (8, 3)])
def test_perplexity_equals_the_models_own_loss(ref, batch_size, budget, monkeypatch):
    loaded = load_model(ref)
    split = TEXTS
    if budget:  # room for the logits of `budget` windows only: several micro-batches
        monkeypatch.setattr(causal_lm, "LOGIT_BUDGET",
                            budget * 64 * loaded.model.config.vocab_size)
    ours = causal_lm.evaluate(loaded, split, batch_size=batch_size, max_length=64)
    nll, count = _reference(loaded, split, 64)
    assert ours["tokens"] == count
    assert ours["nll"] == pytest.approx(nll, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_micro_batches_hold_a_bounded_number_of_logits(monkeypatch):
    loaded = load_model("tiny:llama")
    split = TEXTS
    vocab = loaded.model.config.vocab_size
    monkeypatch.setattr(causal_lm, "LOGIT_BUDGET", 2 * 32 * vocab)
    widest = []
    hook = loaded.model.lm_head.register_forward_hook(
        lambda m, a, out: widest.append(out.shape[0]))
    causal_lm.evaluate(loaded, split, batch_size=64, max_length=32)
    hook.remove()
    assert len(widest) > 1 and max(widest) == 2


def test_a_prompt_tuned_model_scores_the_same_at_any_batch_size():
    import peft

    loaded = load_model("tiny:llama")
    config = peft.PromptTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=5)
    torch.manual_seed(0)
    loaded.model = peft.get_peft_model(loaded.model, config).eval()
    split = TEXTS
    one = causal_lm.evaluate(loaded, split, batch_size=1, max_length=48)
    eight = causal_lm.evaluate(loaded, split, batch_size=8, max_length=48)
    assert one["tokens"] == eight["tokens"]
    assert one["nll"] == pytest.approx(eight["nll"], rel=1e-5)
