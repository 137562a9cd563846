"""The inputs an ONNX export is traced and checked on, and how its outputs are compared with
PyTorch's: a few real sentences through the model's tokenizer and a few drawn images through
its image processor, in batches of several sizes and lengths (the graph's axes are dynamic)."""

from __future__ import annotations

import numpy as np

from ..core.families import length_limit

TEXTS = (
    "The battery lasts all day and charges quickly.",
    "Terrible service; we waited an hour and left hungry.",
    "Shares rose three percent after the quarterly report.",
    "A quiet film about two sisters and a lighthouse.",
    "Will it rain in Lisbon tomorrow?",
    "ok",
    "The committee meets again on Tuesday to vote on the budget.",
    "Best. Purchase. Ever!",
)
N_IMAGES = 6
MAX_TOKENS = 48  # per checked text: enough to cover padding, short enough for tiny models
# (first, last) of the texts and of the images in each batch: the first batch traces the
# graph, the others check it (CLIP's text and image batches differ in size)
TRACE = ((0, 2), (0, 2))
CHECKS = (((0, 6), (0, 4)), ((6, 7), (4, 5)), ((7, 8), (5, 6)))


def images() -> list:
    """Drawn RGB images: gradients, stripes, blocks and noise, of different sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(N_IMAGES):
        h, w = 40 + 8 * i, 56 - 4 * i
        y, x = np.mgrid[0:h, 0:w]
        if i % 3 == 0:
            pixels = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
        elif i % 3 == 1:
            pixels = np.stack([(x // (3 + i)) % 2 * 255, (y // 5) % 2 * 200, 60 * np.ones_like(x)], -1)
        else:
            pixels = rng.integers(0, 256, (h, w, 3))
        out.append(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    return out


def _text_batch(loaded, first: int, last: int, names) -> dict:
    config = loaded.model.config
    limit = length_limit(getattr(config, "text_config", config)) or MAX_TOKENS
    enc = loaded.tokenizer(list(TEXTS[first:last]), padding=True, truncation=True,
                           max_length=min(MAX_TOKENS, limit), return_tensors="pt")
    return {k: v for k, v in enc.items() if k in names}


def _image_batch(loaded, first: int, last: int) -> dict:
    pixels = loaded.image_processor(images()[first:last], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels.float()}


def batches(loaded, names: list[str]) -> tuple[dict, list[dict]]:
    """(the batch the graph is traced on, the batches it is checked on), each holding the
    graph's inputs `names` as torch tensors."""
    def make(texts, pics):
        batch = {}
        if "input_ids" in names:
            batch.update(_text_batch(loaded, *texts, names))
        if "pixel_values" in names:
            batch.update(_image_batch(loaded, *pics))
        return batch

    return make(*TRACE), [make(texts, pics) for texts, pics in CHECKS]


def per_position(batch: dict, array: np.ndarray) -> np.ndarray:
    """The rows of a (batch, sequence, ...) output at real tokens (padding dropped); any other
    output whole, one row per example."""
    mask = batch.get("attention_mask")
    if mask is not None and array.ndim >= 3 and array.shape[:2] == tuple(mask.shape):
        return array[mask.numpy().astype(bool)]
    return array


def within(diff: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> bool:
    """Every difference within atol + rtol x the largest |reference| of its row (one token's
    logits, one position's hidden state): float32 rounding grows with the size of the values
    a row is summed from, not with each value, so a logit near 0 among logits of 30 may differ
    by what its neighbours do (smollm2: 1.5e-4, the mean 1.2e-5, the same top-1 token)."""
    scale = np.abs(reference).max(axis=-1, keepdims=True)
    return bool(np.all(diff <= atol + rtol * scale))


def compare(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], atol: float,
            rtol: float) -> dict:
    """How far ONNX Runtime's values of one output stray from PyTorch's over the checked
    batches, each pair (reference, got) already cut to real tokens by `per_position`.

    Returns the largest and mean absolute difference, the largest reference magnitude,
    `within_tolerance` (every value within atol + rtol x its row's largest |reference|:
    `within`)
    and: for scores over classes, tokens or texts, how often the two agree on the top one;
    for embeddings and hidden states, their lowest and mean cosine similarity.
    """
    rows = [(r.reshape(-1, r.shape[-1]).astype(np.float64),
             g.reshape(-1, g.shape[-1]).astype(np.float64)) for r, g in pairs]
    diffs = [np.abs(g - r) for r, g in rows]
    out = {"max_abs_diff": float(max(d.max() for d in diffs)),
           "mean_abs_diff": float(np.mean(np.concatenate([d.ravel() for d in diffs]))),
           "max_abs_reference": float(max(np.abs(r).max() for r, _ in rows)),
           "rows": int(sum(len(r) for r, _ in rows)),
           "within_tolerance": all(within(d, r, atol, rtol) for d, (r, _) in zip(diffs, rows))}
    if name.startswith("logits"):
        same = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in rows])
        out["argmax_agreement"] = float(same.mean())
    else:
        cosines = [np.sum(r * g, -1) / np.maximum(np.linalg.norm(r, axis=-1)
                                                  * np.linalg.norm(g, axis=-1), 1e-12)
                   for r, g in rows]
        out["min_cosine"] = float(min(c.min() for c in cosines))
        out["mean_cosine"] = float(np.mean(np.concatenate(cosines)))
    return out
