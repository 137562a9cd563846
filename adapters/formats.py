"""The two adapter formats: peft's (`adapter_config.json`) and mmkit's own
(`mmkit_adapter.json`: AdaptFormer, VPT, SVFit, CoOp, MaPLe). Both go on top of a base model that
`load_model` loads first."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError
from ..core.formats import Format, register_format

PEFT_CONFIG = "adapter_config.json"


def _peft_base(folder: Path) -> str | None:
    try:
        return json.loads(Path(folder, PEFT_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _load_peft(model, adapter):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter.path), {}
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"Cannot load the adapter '{adapter.ref}' onto its base: {exc}") from None


def _load_own(model, adapter):
    from .own import attach_adapter, read_spec

    spec = read_spec(adapter.path)
    return attach_adapter(model, adapter.path), {"format": "mmkit-adapter", "adapter": spec}


def _save_own(loaded, folder: Path) -> None:
    from .own import save_adapter

    save_adapter(loaded, folder)


def _own_base(folder: Path) -> str | None:
    from .own import read_spec

    return read_spec(folder).get("base_model")


register_format(Format(
    "mmkit-adapter", detect=lambda folder: (folder / "mmkit_adapter.json").is_file(),
    load=_load_own, save=_save_own, adapter=True, base=_own_base,
    summary="mmkit's own adapters (AdaptFormer, VPT, SVFit, CoOp, MaPLe) on top of their base"))
register_format(Format(
    "peft-adapter", detect=lambda folder: (folder / PEFT_CONFIG).is_file(),
    load=_load_peft, save=lambda loaded, folder: loaded.model.save_pretrained(folder),
    adapter=True, base=_peft_base, summary="a peft adapter on top of its base"))
