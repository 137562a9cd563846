"""The saved form of RTN / GPTQ / dynamic-int8 models ("mmkit-quantized").

The folder holds config.json, `model.safetensors` (the model's state dict: QuantLinear layers
as `qweight` int32 words + `scales`, `zeros`, `g_idx`, `bias`; every other tensor as is) and
`mmkit_quant.json` ({"format_version": 1, "layers": {name: {bits, in_features, out_features,
groups, bias, kernel}}}). Loading builds the model from its config, swaps those layers for
QuantLinear and loads the state dict strictly: the same outputs as before saving.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...core.errors import InputError

QUANT_JSON = "mmkit_quant.json"
FORMAT_VERSION = 1


def save_quantized(model, folder: Path) -> None:
    """Write a model holding QuantLinear layers."""
    from safetensors.torch import save_file

    from ...core.train import _tied_duplicates
    from .qlinear import QuantLinear

    layers = {name: {"bits": m.bits, "in_features": m.in_features,
                     "out_features": m.out_features, "groups": m.scales.shape[1],
                     "bias": m.bias is not None, "kernel": m.kernel}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = model.state_dict()
    for key in _tied_duplicates(state):
        del state[key]
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / QUANT_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                 "layers": layers}, indent=2))


def is_quantized_folder(path) -> bool:
    """True for a folder written by save_quantized."""
    return path is not None and Path(path, QUANT_JSON).is_file()


def load_quantized(cls, folder, config):
    """Rebuild a saved mmkit-quantized model of class `cls` (an Auto class)."""
    from safetensors.torch import load_file

    from .qlinear import QuantLinear, set_module

    spec = json.loads(Path(folder, QUANT_JSON).read_text())
    if spec.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{folder} was quantized by a newer mmkit (format version "
                         f"{spec['format_version']}); upgrade mmkit to load it.")
    model = cls.from_config(config)
    for name, s in spec["layers"].items():
        set_module(model, name, QuantLinear(s["in_features"], s["out_features"], s["bits"],
                                            s["groups"], s["bias"], s["kernel"]))
    state = load_file(str(Path(folder, "model.safetensors")))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied and "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise InputError(f"{folder} does not match its own config (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); the artifact is damaged. "
                         "Re-create it.")
    model.tie_weights()
    return model.eval()
