"""zero-shot-image-classification (CLIP): class names become prompts; accuracy and macro-F1."""

from __future__ import annotations

from .common import as_rgb, batches, classification_metrics, model_device, to_device
from .image_classification import image_size

DEFAULT_TEMPLATE = "a photo of {}."


def prompts(label_names: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class name."""
    return [template.format(name.replace("_", " ")) for name in label_names]


def evaluate(loaded, split, batch_size: int = 32, max_length: int = 77,
             label_names: list[str] | None = None, template: str = DEFAULT_TEMPLATE) -> dict:
    """Pick, for each image, the class whose prompt embedding is most similar."""
    import torch

    model, device = loaded.model, model_device(loaded.model)
    names = label_names or loaded.labels
    text = loaded.tokenizer(prompts(names, template), padding=True, truncation=True,
                            max_length=min(max_length, model.config.text_config.max_position_embeddings),
                            return_tensors="pt")
    with torch.inference_mode():
        text_emb = _unit(model.get_text_features(**to_device(dict(text), device)))
    dtype = next(model.parameters()).dtype
    preds = []
    for idx in batches(len(split), batch_size):
        pixels = loaded.image_processor(images=[as_rgb(split.inputs[i]) for i in idx],
                                        return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            img_emb = _unit(model.get_image_features(pixel_values=pixels.to(device, dtype)))
        preds += (img_emb @ text_emb.T).argmax(-1).tolist()
    return classification_metrics(split.labels, preds)


def _unit(features):
    # transformers 5 may return an output object rather than a tensor
    tensor = features if hasattr(features, "norm") else features.pooler_output
    return tensor / tensor.norm(dim=-1, keepdim=True)


def dummy_batch(loaded, batch_size: int, seq_len: int) -> dict:
    """Random prompts and pixels, both towers at once, for latency measurements."""
    import torch

    cfg = loaded.model.config
    gen = torch.Generator().manual_seed(0)
    seq_len = min(seq_len, cfg.text_config.max_position_embeddings)
    ids = torch.randint(5, cfg.text_config.vocab_size, (batch_size, seq_len), generator=gen)
    side = image_size(cfg.vision_config)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch_size, 3, side, side, generator=gen)}
