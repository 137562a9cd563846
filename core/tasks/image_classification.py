"""image-classification: an image-classification head; accuracy and macro-F1."""

from __future__ import annotations

from .common import as_rgb, batches, classification_metrics, model_device, to_device


def collate(loaded, images: list, labels=None, max_length=None) -> dict:
    """Run the image processor over paths, arrays or PIL images."""
    import torch

    pixels = loaded.image_processor(images=[as_rgb(i) for i in images], return_tensors="pt")
    batch = {"pixel_values": pixels["pixel_values"]}
    if labels is not None:
        batch["labels"] = torch.tensor(labels)
    return batch


def evaluate(loaded, split, batch_size: int = 32, max_length=None) -> dict:
    """Accuracy and macro-F1 of the head's argmax on a labelled split."""
    import torch

    device = model_device(loaded.model)
    dtype = next(loaded.model.parameters()).dtype
    preds = []
    for idx in batches(len(split), batch_size):
        batch = to_device(collate(loaded, [split.inputs[i] for i in idx]), device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.inference_mode():
            preds += loaded.model(**batch).logits.argmax(-1).tolist()
    return classification_metrics(split.labels, preds)


def image_size(config) -> int:
    """The square input side a vision config expects."""
    size = getattr(config, "image_size", 224)
    return size if isinstance(size, int) else size[0]


def dummy_batch(loaded, batch_size: int, seq_len=None) -> dict:
    """Random pixels of the model's input size for latency measurements."""
    import torch

    side = image_size(loaded.model.config)
    channels = getattr(loaded.model.config, "num_channels", 3)
    return {"pixel_values": torch.randn(batch_size, channels, side, side,
                                        generator=torch.Generator().manual_seed(0))}
