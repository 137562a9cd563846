"""Examples and batches for training and calibration: a split turned into the model's inputs
(tokenized text, LM windows, or images with labels), and the collator that pads them."""

from __future__ import annotations


class _Items:
    """A list of dict examples as a torch map-style dataset."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _text_items(loaded, split, max_length):
    if len(split) == 0:  # a tokenizer fails on no text
        return []
    enc = loaded.tokenizer(split.inputs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    items = [{k: enc[k][i] for k in keys} for i in range(len(split))]
    if split.labels is not None:  # calibration text may have none
        for item, label in zip(items, split.labels):
            item["labels"] = label
    return items


def _lm_items(loaded, split, max_length):
    from .causal_lm import max_positions, token_stream, windows

    seq = min(max_length, max_positions(loaded.model.config))
    return [{"input_ids": w} for w in windows(token_stream(loaded, split.inputs), seq)]


def build_items(loaded, split, max_length):
    """Training examples for the loaded model's task."""
    if loaded.task == "text-classification":
        return _Items(_text_items(loaded, split, max_length))
    if loaded.task == "causal-lm":
        return _Items(_lm_items(loaded, split, max_length))
    labels = split.labels if split.labels is not None else [None] * len(split.inputs)
    return _Items([{"image": x, **({} if y is None else {"labels": y})}
                   for x, y in zip(split.inputs, labels)])


class Collator:
    """Pads a batch to its longest member (dynamic padding); runs image processors lazily."""

    def __init__(self, loaded):
        self.loaded = loaded

    def __call__(self, batch):
        import torch

        if "image" in batch[0]:
            from .common import as_rgb

            pixels = self.loaded.image_processor(images=[as_rgb(b["image"]) for b in batch],
                                                 return_tensors="pt")["pixel_values"]
            if "labels" not in batch[0]:  # calibration images
                return {"pixel_values": pixels}
            return {"pixel_values": pixels, "labels": torch.tensor([b["labels"] for b in batch])}
        pad = self.loaded.tokenizer.pad_token_id or 0
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": torch.full((len(batch), width), pad, dtype=torch.long),
               "attention_mask": torch.zeros(len(batch), width, dtype=torch.long)}
        if "token_type_ids" in batch[0]:
            out["token_type_ids"] = torch.zeros(len(batch), width, dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][row, :n] = torch.tensor(b["input_ids"])
            out["attention_mask"][row, :n] = 1
            if "token_type_ids" in b:
                out["token_type_ids"][row, :n] = torch.tensor(b["token_type_ids"])
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([b["labels"] for b in batch])
        else:  # causal LM: predict every real token, ignore padding
            out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out
