"""Several peft LoRA adapters of ONE base combined into one LoRA adapter (`mmkit merge
--as-adapter`), whose delta on every adapted layer is Σ wᵢ·ΔWᵢ with ΔWᵢ = Bᵢ·Aᵢ·scalingᵢ (each
adapter's own lora_alpha, r, rsLoRA, rank_pattern / alpha_pattern; the transpose for GPT-2's
Conv1D is the layer's, the same for every adapter, so B·A is combined untransposed).

- `cat` (exact): the ranks are stacked, A = [A₁; A₂; …], B = [c₁B₁, c₂B₂, …] with
  cᵢ = wᵢ·scalingᵢ, so B·A = Σ cᵢBᵢAᵢ. A layer adapted by only some adapters gets only their
  blocks; its rank then differs from others' and is written in rank_pattern.
- `svd`: the same stacked factors, reduced to the best rank-k approximation of their product
  (Eckart–Young) through two thin QRs and the SVD of a small (Σrᵢ)² matrix, so the full
  out × in delta is never formed. Exact when k ≥ the delta's rank.

Both write lora_alpha = r on every layer (alpha_pattern follows rank_pattern) and no rsLoRA, so
the written scaling is exactly 1 and nothing is rescaled when peft loads it. The factors are
computed in float64 and written in float32 (float64 when an input is). Task heads saved whole
(modules_to_save) are averaged with the weights normalised to sum 1. peft's own
`add_weighted_adapter` is not used: it mis-scales rsLoRA, negative weights and mixed ranks
(peft issues #3004, #3761, #3737).

Only the two factors of one layer per adapter are in memory at a time (`reading.TensorFile`);
the result itself is adapter-sized.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ...core.errors import InputError, shown
from .inputs import LORA_KEY, PEFT_PREFIX, _pattern_value
from .reading import TensorFile

__all__ = ["combine_loras", "write_adapter"]

log = logging.getLogger("mmkit")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# initialisations that leave the base's weights as they are (PiSSA, OLoRA, CorDA, LoRA-GA and
# LoftQ rewrite them, MiCA is a variant of its own): only then is the adapter's delta B·A
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
# peft LoraConfig options that make an adapter something other than B·A·scaling on Linear /
# Conv1D layers, with what they are called in messages
NOT_PLAIN = {"use_dora": "DoRA", "lora_bias": "a LoRA bias", "velora_config": "VeLoRA",
             "alora_invocation_tokens": "aLoRA", "monteclora_config": "MonteCLoRA",
             "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
             "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
             "trainable_token_indices": "trainable tokens",
             "target_parameters": "LoRA on parameters (target_parameters)",
             "megatron_config": "Megatron layers"}
FIX = ("Merge it into its base with `mmkit merge ADAPTER -o OUT` and merge the full models "
       "instead, or leave it out of --as-adapter.")


@dataclass
class _Adapter:
    """One input adapter: its config, its open weights file and, per adapted module, the keys
    of lora_A / lora_B and its scaling."""

    name: str
    config: dict
    handle: TensorFile
    lora: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    whole: dict[str, str] = field(default_factory=dict)  # saved module tensors (a task head)


# ------------------------------------------------------------------ public


def combine_loras(folders: list[str], weights: list[float] | None,
                  how: Literal["cat", "svd"], rank: int | None = None,
                  info: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One peft LoRA adapter whose delta is Σ wᵢ·ΔWᵢ of the adapters in `folders` (all
    trained on the same base): (its adapter_config.json as a dict, its state dict under peft's
    saved names). `how="cat"` is exact (output rank Σrᵢ per layer); `how="svd"` keeps the best
    rank-`rank` approximation per layer (default: the largest input rank). Task heads saved
    whole (modules_to_save) are averaged with the weights normalised to sum 1. Weights may be
    negative; None means 1 each. Raises InputError for adapters that are not plain LoRA, or
    that do not fit one base or one task. `info`, when given, receives the layers, their
    largest rank, the heads averaged and their weights, and (svd) the largest relative error
    of a layer's delta."""
    folders, weights = _check_arguments(folders, weights, how, rank)
    with ExitStack() as stack:
        adapters = [_open_adapter(str(folder), stack) for folder in folders]
        _check_compatible(adapters)
        if how == "svd" and rank is None:
            rank = max(_rank(a, m) for a in adapters for m in a.lora)
        state, ranks, worst = {}, {}, (0.0, None)
        for module in _modules(adapters):
            blocks, dtype = _blocks(adapters, weights, module)
            if how == "cat":
                a, b = torch.cat([x for x, _ in blocks]), torch.cat([y for _, y in blocks], 1)
            else:
                a, b, error = _truncate(blocks, rank)
                worst = max(worst, (error, module), key=lambda e: e[0])
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).contiguous()
            ranks[module] = a.shape[0]
        heads = _heads(adapters, weights)
        state.update(heads)
        config = _config(adapters, ranks)
    if how == "svd":
        log.info("merge --as-adapter: SVD to rank %d; largest relative error of a layer's "
                 "delta %.3g (%s)", rank, worst[0], worst[1] or "none")
    if info is not None:
        total = sum(weights)
        info.update({"layers": len(ranks), "max_rank": max(ranks.values(), default=0),
                     **({"heads_averaged": sorted(k.removeprefix(PEFT_PREFIX) for k in heads),
                         "heads_weights": [round(w / total, 6) for w in weights]}
                        if heads else {}),
                     **({"svd_rank": rank, "svd_worst_rel_error": round(worst[0], 6),
                         "svd_worst_layer": worst[1]} if how == "svd" else {})})
    return config, state


def write_adapter(config: dict, state: dict[str, torch.Tensor], folder) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `folder` (created when
    missing) so that `PeftModel.from_pretrained(base, folder)` loads them. Each file is
    written under a temporary name first and then renamed."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(**config)  # peft's own checks, before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (WEIGHTS_FILE + ".part")
    save_file({k: v.contiguous() for k, v in state.items()}, str(part), metadata={"format": "pt"})
    os.replace(part, folder / WEIGHTS_FILE)
    part = folder / (CONFIG_FILE + ".part")
    part.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(part, folder / CONFIG_FILE)


# ------------------------------------------------------------------ reading and checking


def _check_arguments(folders, weights, how, rank):
    if isinstance(folders, (str, os.PathLike)) or not folders:
        raise InputError("merge --as-adapter needs a list of LoRA adapter folders (at least "
                         "one); pass each adapter as its own model.")
    if weights is None:
        weights = [1.0] * len(folders)
    weights = list(weights)
    if len(weights) != len(folders):
        raise InputError(f"{len(weights)} weights for {len(folders)} adapters: give one weight "
                         "per adapter.")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InputError(f"The weight of adapter {i + 1} is {shown(w)!r}, not a finite "
                             "number; give one number per adapter (negative ones subtract).")
    if how not in ("cat", "svd"):
        raise InputError(f"--as-adapter combines by 'cat' (exact) or 'svd' (reduced rank), not "
                         f"{shown(how)!r}; pick one of the two.")
    if rank is not None and how != "svd":
        raise InputError("A rank only applies to the 'svd' combination ('cat' keeps every "
                         "adapter's rank exactly); drop the rank or choose 'svd'.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"The rank of the combined adapter must be a positive integer, not "
                         f"{shown(rank)!r}.")
    return list(folders), [float(w) for w in weights]


def _open_adapter(folder: str, stack: ExitStack) -> _Adapter:
    """The adapter in `folder`, checked to be a plain LoRA saved as safetensors."""
    try:
        config = json.loads(Path(folder, CONFIG_FILE).read_text())
    except OSError:
        raise InputError(f"'{folder}' has no readable {CONFIG_FILE}: it is not a peft adapter "
                         "folder. Pass the folder that save_pretrained wrote.") from None
    except ValueError as exc:
        raise InputError(f"'{folder}/{CONFIG_FILE}' is not valid JSON ({exc}); re-save the "
                         "adapter.") from None
    _check_plain(folder, config)
    weights = Path(folder, WEIGHTS_FILE)
    if not weights.is_file():
        raise InputError(f"'{folder}' has no {WEIGHTS_FILE} (an adapter_model.bin is not "
                         "read: it is a pickle); load it with peft and save it again with "
                         "save_pretrained(..., safe_serialization=True).")
    adapter = _Adapter(folder, config, stack.enter_context(TensorFile(weights)))
    parts = {}
    for key in adapter.handle.keys():
        body = key.removeprefix(PEFT_PREFIX)
        match = LORA_KEY.match(body)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = key
        elif ".lora_" in body:
            raise InputError(f"The adapter '{folder}' holds {key}, which is not a plain LoRA "
                             f"factor (embedding LoRA, a LoRA bias, DoRA magnitudes). {FIX}")
        else:
            adapter.whole[body] = key
    for module, pair in parts.items():
        adapter.lora[module] = _factor_keys(adapter, module, pair)
    if not adapter.lora:
        raise InputError(f"The adapter '{folder}' has no LoRA factors in {WEIGHTS_FILE}; it "
                         "is empty or not a LoRA adapter. Pass a trained LoRA adapter.")
    return adapter


def _check_plain(folder: str, config: dict) -> None:
    """Refuse what is not B·A·scaling added to an unchanged base."""
    kind = config.get("peft_type")
    if kind != "LORA":
        raise InputError(f"The adapter '{folder}' is a {shown(kind)} adapter, not LoRA; only "
                         f"LoRA adapters combine into one LoRA. {FIX}")
    used = [label for option, label in NOT_PLAIN.items() if config.get(option)]
    if used:
        raise InputError(f"The adapter '{folder}' uses {', '.join(used)}, so its change is "
                         f"not the plain LoRA product B·A. {FIX}")
    if config.get("bias", "none") != "none":
        raise InputError(f"The adapter '{folder}' also trains biases (bias="
                         f"{config['bias']!r}), which are saved whole, not as a change to the "
                         f"base. {FIX}")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        raise InputError(f"The adapter '{folder}' was initialised with {shown(init)!r}, which "
                         "changes the base weights too (or is a LoRA variant), so B·A alone is "
                         "not its change. Save it converted to plain LoRA (peft's "
                         "path_initial_model_for_weight_conversion), or merge it into its base "
                         "and merge full models.")


def _factor_keys(adapter: _Adapter, module: str, pair: dict) -> tuple[str, str, float]:
    """(lora_A key, lora_B key, scaling) of one adapted module, checked against the config."""
    if set(pair) != {"A", "B"}:
        raise InputError(f"The adapter '{adapter.name}' has lora_{next(iter(pair))} but not the "
                         f"other half for {module}: the adapter file is damaged; save it again.")
    a_shape, b_shape = adapter.handle.shape(pair["A"]), adapter.handle.shape(pair["B"])
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise InputError(f"The adapter '{adapter.name}' adapts {module} with factors of shapes "
                         f"{a_shape} and {b_shape}: not a LoRA of a Linear layer (convolution "
                         f"LoRA is not combined). {FIX}")
    config, r = adapter.config, a_shape[0]
    stated = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if stated != r:
        raise InputError(f"The adapter '{adapter.name}' says rank {stated} for {module} but its "
                         f"factors have rank {r}; the config and weights do not belong "
                         "together. Save the adapter again.")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                           config.get("lora_alpha", 8))
    # peft's scaling, as LoraLayer.update_layer sets it
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return pair["A"], pair["B"], scaling


def _check_compatible(adapters: list[_Adapter]) -> None:
    """One base, one task, one shape per adapted layer, the same saved task-head modules."""
    first = adapters[0]
    for other in adapters[1:]:
        for key, what in (("base_model_name_or_path", "base model"), ("revision", "revision"),
                          ("task_type", "task type")):
            mine, theirs = first.config.get(key), other.config.get(key)
            if mine != theirs and (key == "task_type" or (mine and theirs)):
                raise InputError(f"The adapters '{first.name}' and '{other.name}' differ in "
                                 f"{what} ({shown(mine)!r} vs {shown(theirs)!r}); only "
                                 "adapters trained on the same base for the same task combine "
                                 "into one. Merge adapters of one base and task.")
        if set(other.whole) != set(first.whole):
            extra = sorted(set(first.whole) ^ set(other.whole))
            raise InputError(f"The adapters '{first.name}' and '{other.name}' do not save the "
                             f"same whole modules (they differ in {', '.join(extra[:4])}): "
                             "they train different task heads. Combine adapters trained for "
                             "the same task.")
    for module in _modules(adapters):
        shapes = {(a.name, _in_out(a, module)) for a in adapters if module in a.lora}
        if len({shape for _, shape in shapes}) > 1:
            listed = "; ".join(f"'{n}': {i} in, {o} out" for n, (i, o) in sorted(shapes))
            raise InputError(f"The adapters change {module} with different shapes ({listed}): "
                             "they were trained on different base models. Combine adapters "
                             "of one base.")


def _rank(adapter: _Adapter, module: str) -> int:
    return adapter.handle.shape(adapter.lora[module][0])[0]


def _in_out(adapter: _Adapter, module: str) -> tuple[int, int]:
    a, b, _ = adapter.lora[module]
    return adapter.handle.shape(a)[1], adapter.handle.shape(b)[0]


def _modules(adapters: list[_Adapter]) -> list[str]:
    """Every adapted module, in the order the adapters list them."""
    return list(dict.fromkeys(m for a in adapters for m in a.lora))


# ------------------------------------------------------------------ the math


def _blocks(adapters, weights, module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                                 torch.dtype]:
    """(Aᵢ, wᵢ·scalingᵢ·Bᵢ) in float64 for each adapter that adapts `module`, and the dtype to
    write them in: float32, or float64 when an input is (the folded scalings must not be
    rounded to an input's bfloat16)."""
    out, dtype = [], torch.float32
    for adapter, weight in zip(adapters, weights):
        if module in adapter.lora:
            a, b = (adapter.handle.get(key) for key in adapter.lora[module][:2])
            if torch.float64 in (a.dtype, b.dtype):
                dtype = torch.float64
            out.append((a.double(), b.double() * (weight * adapter.lora[module][2])))
    return out, dtype


def _truncate(blocks, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors (A, B) of D = Σ Bᵢ·Aᵢ, and ‖D − B·A‖_F / ‖D‖_F.

    With the stacked factors D = B·A (B out × R, A R × in, R = Σrᵢ small): B = Q_b·R_b and
    Aᵀ = Q_a·R_a (thin QR), so D = Q_b·(R_b·R_aᵀ)·Q_aᵀ and the SVD of the small middle matrix
    gives D's. The kept singular values are split √S into both factors."""
    a = torch.cat([x for x, _ in blocks])
    b = torch.cat([y for _, y in blocks], 1)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root
    new_a = root[:, None] * (vh[:k] @ q_a.T)
    total = float(s.square().sum())
    error = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return new_a, new_b, error


def _heads(adapters: list[_Adapter], weights: list[float]) -> dict[str, torch.Tensor]:
    """The modules saved whole (a task head), averaged with the weights normalised to sum 1."""
    names = list(adapters[0].whole)
    if not names:
        return {}
    total = sum(weights)
    if abs(total) < 1e-12 * max(abs(w) for w in weights):
        raise InputError("The adapters save task heads (" + ", ".join(names[:4]) + "), which "
                         "are averaged with the weights normalised to sum 1, but the weights "
                         "sum to 0. Give weights with a nonzero sum.")
    out = {}
    for name in names:
        shapes = {a.name: a.handle.shape(a.whole[name]) for a in adapters}
        if len(set(shapes.values())) > 1:
            listed = "; ".join(f"'{n}': {s}" for n, s in shapes.items())
            raise InputError(f"The adapters save {name} with different shapes ({listed}): "
                             "they were trained for different tasks (other labels). Combine "
                             "adapters of one task, or merge full models, which keep each "
                             "task's head.")
        tensors = [a.handle.get(a.whole[name]) for a in adapters]
        mean = sum(t.double() * (w / total) for t, w in zip(tensors, weights))
        out[PEFT_PREFIX + name] = mean.to(tensors[0].dtype)
    log.info("merge --as-adapter: averaged the saved modules %s with weights %s (normalised "
             "to sum 1)", ", ".join(names), [round(w / total, 6) for w in weights])
    return out


# ------------------------------------------------------------------ the output config


def _config(adapters: list[_Adapter], ranks: dict[str, int]) -> dict:
    """The combined adapter's config as peft writes adapter_config.json: every layer at
    lora_alpha = its rank (scaling exactly 1), the most common rank as r and the others in
    rank_pattern / alpha_pattern under their full module names."""
    from peft import LoraConfig

    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = _rank_pattern(ranks, r)
    first = adapters[0].config
    saved = list(dict.fromkeys(m for a in adapters for m in a.config.get("modules_to_save")
                               or []))
    config = LoraConfig(
        task_type=first.get("task_type"),
        base_model_name_or_path=next((a.config["base_model_name_or_path"] for a in adapters
                                      if a.config.get("base_model_name_or_path")), None),
        revision=first.get("revision"), auto_mapping=first.get("auto_mapping"),
        r=r, lora_alpha=r, use_rslora=False,
        target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
        fan_in_fan_out=any(a.config.get("fan_in_fan_out") for a in adapters),
        lora_dropout=first.get("lora_dropout", 0.0), bias="none",
        modules_to_save=saved or None, init_lora_weights=True, inference_mode=True,
        ensure_weight_tying=any(a.config.get("ensure_weight_tying") for a in adapters),
    ).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _rank_pattern(ranks: dict[str, int], default: int) -> dict[str, int]:
    """rank_pattern for the layers whose rank is not `default`, keyed so that peft resolves
    every layer in `ranks` to its own rank whatever the keys' order (peft's save_pretrained
    sorts them).

    peft takes the first key k for which re.match(rf"(.*\\.)?({k})$", name) holds: a key is a
    regular expression for the name's tail. A layer's full name is its key unless that would
    also match another layer (its dots match any character, or the other name ends in
    ".<this name>"); then the key is the escaped name behind (?<!\\.), which only the name
    itself matches."""
    names = list(ranks)

    def key(name):
        if any(o != name and _pattern_value({name: 1}, o, 0) for o in names):
            return r"(?<!\.)" + re.escape(name)
        return name

    pattern = {key(m): ranks[m] for m in sorted(names) if ranks[m] != default}
    for order in (pattern, dict(reversed(pattern.items()))):  # the guarantee, checked
        for name in names:
            if _pattern_value(order, name, default) != ranks[name]:
                raise RuntimeError(f"rank_pattern resolves {name} wrongly; please report this")
    return pattern
