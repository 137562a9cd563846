"""text-classification: a sequence-classification head; accuracy and macro-F1."""

from __future__ import annotations

from .common import batches, classification_metrics, model_device, to_device

DEFAULT_MAX_LENGTH = 128


def collate(loaded, texts: list[str], labels=None, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """Tokenize with dynamic padding (to the longest text in the batch)."""
    import torch

    batch = dict(loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                  return_tensors="pt"))
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


def evaluate(loaded, split, batch_size: int = 32, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """Accuracy and macro-F1 of the head's argmax on a labelled split."""
    import torch

    device = model_device(loaded.model)
    preds = [0] * len(split)
    for idx in batches(len(split), batch_size, [len(t) for t in split.inputs]):
        batch = to_device(collate(loaded, [split.inputs[i] for i in idx], None, max_length), device)
        with torch.inference_mode():
            logits = loaded.model(**batch).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            preds[i] = p
    return classification_metrics(split.labels, preds)


def dummy_batch(loaded, batch_size: int, seq_len: int) -> dict:
    """Random token ids of shape (batch, seq_len) for latency measurements."""
    import torch

    vocab = loaded.model.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
