"""zero-shot-image-classification (CLIP): class names become prompts; accuracy and macro-F1.

Each class is described by its name in one or more templates ("a photo of {}."); with several
templates the class's text embedding is the average of its unit-length prompt embeddings,
normalized again (prompt ensembling). A model that carries learned prompts (CoOp, MaPLe: a
module with `class_text_features`) uses them instead of templates.
"""

from __future__ import annotations

import string

from ..errors import InputError
from .common import as_rgb, batches, classification_metrics, model_device, to_device
from .image_classification import image_size

DEFAULT_TEMPLATE = "a photo of {}."
# Named template sets for `--template NAME`; written for mmkit (not taken from elsewhere).
TEMPLATE_SETS = {
    "default": (DEFAULT_TEMPLATE,),
    "photos": (
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a low resolution photo of a {}.",
        "a bright photo of a {}.",
        "a cropped photo of a {}.",
        "a drawing of a {}.",
    ),
}


def prompts(label_names: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class name."""
    return [template.format(name.replace("_", " ")) for name in label_names]


def resolve_templates(values) -> list[str]:
    """The templates `--template` values name: each a template with one `{}` (where the class
    name goes) or the name of a set in TEMPLATE_SETS. None or empty: the default template."""
    if not values:
        return [DEFAULT_TEMPLATE]
    if isinstance(values, str):
        values = [values]
    out = []
    for value in values:
        if value in TEMPLATE_SETS:
            out += TEMPLATE_SETS[value]
            continue
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:  # a lone { or }
            fields = [f"<{exc}>"]
        if fields != [""]:
            raise InputError(f"--template '{value}' must hold exactly one {{}} where the class "
                             f"name goes (found {len(fields)} replacement field(s): "
                             f"{fields or 'none'}), e.g. 'a photo of a {{}}.'; or name a set: "
                             f"{', '.join(TEMPLATE_SETS)}.")
        out.append(value)
    return list(dict.fromkeys(out))  # a template given twice counts once


def learned_prompts(model):
    """The module of `model` that holds learned text prompts (CoOp, MaPLe), or None."""
    children = getattr(model, "children", None)
    return next((m for m in children() if hasattr(m, "class_text_features")), None) \
        if children else None


def unit(features):
    """Unit-length rows; takes a tensor or a transformers output with `pooler_output`."""
    tensor = features if hasattr(features, "norm") else features.pooler_output
    return tensor / tensor.norm(dim=-1, keepdim=True)


def image_features(model, pixel_values):
    """CLIP's image features (projected, not normalized)."""
    out = model.get_image_features(pixel_values=pixel_values)
    # transformers 5 may return an output object rather than a tensor
    return out if hasattr(out, "norm") else out.pooler_output


def class_embeddings(loaded, label_names: list[str], templates=None, max_length: int = 77):
    """One unit-length text embedding per class, (classes, dim): the learned prompts' when the
    model has them, else the normalized mean over `templates` of each prompt's unit embedding."""
    import torch

    model = loaded.model
    learned = learned_prompts(model)
    if learned is not None:
        if templates:
            raise InputError(f"This model carries learned prompts ({type(learned).__name__}), "
                             "which replace templates; drop --template (evaluate the base "
                             "model to compare with templates).")
        with torch.inference_mode():
            return unit(learned.class_text_features(model, loaded.tokenizer, label_names))
    device = model_device(model)
    limit = min(max_length, model.config.text_config.max_position_embeddings)
    total = None
    for template in resolve_templates(templates):
        text = loaded.tokenizer(prompts(label_names, template), padding=True, truncation=True,
                                max_length=limit, return_tensors="pt")
        with torch.inference_mode():
            emb = unit(model.get_text_features(**to_device(dict(text), device)))
        total = emb if total is None else total + emb
    return unit(total)


def evaluate(loaded, split, batch_size: int = 32, max_length: int = 77,
             label_names: list[str] | None = None, template: str | None = None,
             templates=None) -> dict:
    """Pick, for each image, the class whose text embedding is most similar. `templates` (or
    one `template`) describe the classes; several are averaged (see class_embeddings)."""
    import torch

    model, device = loaded.model, model_device(loaded.model)
    names = label_names or loaded.labels
    if template is not None:
        templates = [template, *(templates or [])]
    text_emb = class_embeddings(loaded, names, templates, max_length)
    dtype = next(model.parameters()).dtype
    preds = []
    for idx in batches(len(split), batch_size):
        pixels = loaded.image_processor(images=[as_rgb(split.inputs[i]) for i in idx],
                                        return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            img_emb = unit(image_features(model, pixels.to(device, dtype)))
        preds += (img_emb @ text_emb.T).argmax(-1).tolist()
    metrics = classification_metrics(split.labels, preds)
    if templates and learned_prompts(model) is None:
        metrics["templates"] = resolve_templates(templates)
    return metrics


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
