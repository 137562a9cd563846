"""The merge step: the recipe's model is the base; the models the step names are read one
tensor at a time (`inputs`) and combined by the tensor math of `tensors`, written into the
base's own tensors. The result is a plain model, so every later step works on it.

Which tensors merge: the base's floating-point tensors, each shared (tied) tensor once; integer
buffers (position ids) stay the base's. Every input must have each of them with the base's
shape, or the merge stops naming the first that differs. Task heads (`classifier`, `score`)
merge with the method only when the base's head is trained and every input's head serves its
labels (model soups of one task). Otherwise the inputs are grouped by their labels, each group
gives one head (its members' mean; heads of different tasks are never averaged), the group
with the base's labels (else the first model's) becomes the model's head and the others are
kept as extra heads in the layout of `core.heads`.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from contextlib import ExitStack

from ...adapters.merging import has_adapter, merge_adapter_
from ...core.errors import InputError, shown
from ...core.heads import head_name, set_head
from ...core.layers import is_task_head, new_heads
from ...core.loading import peek
from ...core.train import tied_duplicates
from . import tensors as tm
from .inputs import open_input
from .quantized import dequantize_, requantize_
from .streamed import tied_sources

log = logging.getLogger("mmkit")
CHUNK_ENTRIES = 1 << 20  # 1M entries: a float32 temporary of a block is at most 4 MB


def tensor_seed(seed: int, name: str) -> int:
    """The seed of DARE's random drop for one tensor: the run's seed and the tensor's name,
    so a tensor's draw does not depend on which other tensors the merge visits."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _combiner(method: str, cfg, weights: list[float], seed: int, thresholds: list | None):
    """The function merging one tensor: (name, base tensor, the models' tensors, per-model
    trim thresholds or None) -> tensor."""
    import torch

    lam = getattr(cfg, "lam", None)
    if method == "linear":
        return lambda name, base, xs, cuts: tm.linear(xs, weights)
    if method == "task-arithmetic":
        return lambda name, base, xs, cuts: tm.task_arithmetic(base, xs, weights, lam)
    if method == "ties":
        def ties(name, base, xs, cuts):
            cuts = cuts or thresholds
            scope = {"trim_scope": "model", "threshold": cuts} if cuts else {}
            return tm.ties(base, xs, weights, lam, cfg.density, **scope, sign=cfg.sign,
                           divide=cfg.divide, tie=cfg.tie)

        return ties
    if method in ("dare-linear", "dare-ties"):
        extra = ({"then": "ties", "sign": cfg.sign, "divide": cfg.divide, "tie": cfg.tie}
                 if method == "dare-ties" else {"then": "linear"})

        def dare(name, base, xs, cuts):
            generator = torch.Generator().manual_seed(tensor_seed(seed, name))
            return tm.dare(base, xs, weights, lam, cfg.density, generator, rescale=cfg.rescale,
                           **extra)

        return dare
    if method == "slerp":
        return lambda name, base, xs, cuts: tm.slerp(xs[0], xs[1], cfg.t)
    raise ValueError(method)


def blocks(shape) -> list[slice] | None:
    """Row blocks of a tensor with more than CHUNK_ENTRIES entries (None for a smaller one):
    the entry-wise methods merge a large tensor (an embedding) block by block, so their
    temporaries stay small. DARE draws each block's drop with the block's own seed."""
    numel = 1
    for size in shape:
        numel *= size
    if numel <= CHUNK_ENTRIES or not shape:
        return None
    step = max(1, CHUNK_ENTRIES // (numel // shape[0]))
    return [slice(i, i + step) for i in range(0, shape[0], step)]


def parts_of(method: str, shape) -> list:
    """The row blocks a tensor merges in ([None]: whole; slerp needs the whole tensor's
    norms and angle)."""
    return (None if method == "slerp" else blocks(tuple(shape))) or [None]


def merge_block(method: str, cfg, combine, inputs, name: str, i, rows, base, cuts) -> None:
    """Merge block `rows` of tensor `name` (its i-th; None: the whole tensor) into `base`,
    that block of the base, in place; the inputs' blocks are read now."""
    xs = [_on(inp.tensor(name, base, rows), base) for inp in inputs]
    label = name if rows is None else f"{name}[{i}]"  # DARE draws with the block's own seed
    try:
        base.copy_(combine(label, base, xs, cuts).to(base.dtype))
    except ValueError as exc:
        raise InputError(f"merge {method}, tensor {name}: {exc}.") from None


def tensor_cuts(method: str, cfg, inputs, name: str, shape, base_of) -> list | None:
    """TIES at tensor scope on a tensor merged in blocks: each model's threshold over the
    whole tensor, read block by block."""
    if method != "ties" or cfg.trim_scope != "tensor" or cfg.density >= 1:
        return None
    parts = parts_of(method, shape)
    if parts == [None]:
        return None
    return [tm.magnitude_threshold(lambda inp=inp: tau_blocks(inp, name, shape, base_of),
                                   cfg.density) for inp in inputs]


def tau_blocks(inp, name: str, shape, base_of):
    """An input's task vector of one tensor, block by block. `base_of(name, rows)`: the
    base's block."""
    for rows in blocks(tuple(shape)) or [None]:
        base = base_of(name, rows)
        yield tm.task_vectors(base, [_on(inp.tensor(name, base, rows), base)])[0]


def _merge_tensor(method: str, cfg, combine, inputs, name: str, base) -> None:
    """Merge one in-memory tensor `base` in place, block by block when it is large."""
    def base_of(_, rows):
        return base if rows is None else base[rows]

    cuts = tensor_cuts(method, cfg, inputs, name, base.shape, base_of)
    for i, rows in enumerate(parts_of(method, base.shape)):
        merge_block(method, cfg, combine, inputs, name, i, rows, base_of(name, rows), cuts)


def _weights(method: str, cfg) -> list[float] | None:
    """The weights as the tensor math takes them: linear's normalised to sum 1 (a mean), the
    task-vector methods' as given (default 1 each, the papers' setting); none for slerp."""
    if method == "slerp":
        return None
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(cfg.models)
    if method == "linear":
        total = sum(weights)
        weights = [w / total for w in weights]
    return weights


def _base_identity(loaded, ctx):
    """The source and seed of the base's weights before any adapter it carried."""
    source = loaded.source
    if source.is_adapter:  # the recipe's model is an adapter: its base
        seed = (source.manifest.get("parent") or {}).get("seed", ctx.seed)
        return peek(source, loaded.task)[0], seed
    return source, ctx.seed


def _plan_tensors(loaded, inputs):
    """(names to merge with the method, the head groups or None), after checking every input
    has every body tensor with the base's shape.

    The heads merge with the method when the base has a trained head and every input's head
    serves its labels (a soup of one task); otherwise they are grouped by labels (`_heads`)."""
    state = loaded.model.state_dict()
    meta = any(t.is_meta for t in state.values())  # a lazy base: no addresses to compare
    tied = set(tied_sources(loaded.model)) if meta else set(tied_duplicates(state))
    floats = [n for n, t in state.items() if n not in tied and t.is_floating_point()]
    heads = [n for n in floats if is_task_head(n.rsplit(".", 1)[0], new_heads())]
    body = [n for n in floats if n not in heads]
    for inp in inputs:
        for name in body:
            shape, want = inp.shape(name, state[name].shape), tuple(state[name].shape)
            if shape != want:
                what = f"lacks the tensor {name}" if shape is None else (
                    f"has {name} of shape {shape}, the base {want}")
                raise InputError(f"'{shown(inp.ref)}' does not fit the base "
                                 f"'{loaded.source.ref}': it {what}. Different architectures, "
                                 "shapes or vocabulary sizes cannot be merged tensor by tensor; "
                                 "merge models fine-tuned from the same base.")
    if not heads:
        return body, None
    trained = loaded.labels is not None and not loaded.fresh_head
    if trained and all(inp.labels == loaded.labels and all(
            inp.shape(n, state[n].shape) == tuple(state[n].shape) for n in heads)
            for inp in inputs):
        return body + heads, "method"
    groups: dict[tuple, list] = {}
    for inp in inputs:
        if inp.labels and all(inp.shape(n, state[n].shape) is not None for n in heads):
            groups.setdefault(tuple(inp.labels), []).append(inp)
    return body, (heads, groups)


def _heads(loaded, heads: list[str], groups: dict, manifests: dict) -> dict:
    """Heads of several tasks: each group of inputs with the same labels gives one head (the
    mean of its members' heads: heads of different tasks are never averaged). The group with
    the base's trained labels (else the first model's) becomes the model's head; the others
    are kept as extra heads (`core.heads`). Returns the report's account."""
    trained = loaded.labels is not None and not loaded.fresh_head
    main = tuple(loaded.labels) if trained else next(iter(groups), None)
    state = loaded.model.state_dict()
    extra, said = {}, {"main": {"labels": loaded.labels, "from": "base"}, "extra": {}}
    for labels, members in groups.items():
        w = [1.0 / len(members)] * len(members)
        tensors = {n: tm.linear([m.tensor(n, state[n]).float() for m in members], w)
                   for n in heads}
        refs = [m.ref for m in members]
        if labels == main:
            set_head(loaded, tensors, list(labels))
            said["main"] = {"labels": list(labels), "from": refs}
            loaded.extra["main_head_from"] = refs
            continue
        name = head_name(refs[0], manifests[refs[0]], set(extra))
        extra[name] = {"labels": list(labels), "task": loaded.task, "from": refs,
                       "tensors": tensors}
        said["extra"][name] = {"labels": list(labels), "from": refs}
    if extra:
        loaded.extra["heads"] = extra
        log.info("merge: kept %d extra task heads (%s) beside the main one", len(extra),
                 ", ".join(extra))
    return said


def _thresholds(names, shapes, base_of, inputs, density: float) -> list[float]:
    """TIES at model scope: each model's magnitude threshold over all its task vectors, read
    block by block a few times (`tensors.magnitude_threshold`). `base_of(name, rows)`: the
    base's block."""
    def taus(inp):
        return lambda: (tau for n in names for tau in tau_blocks(inp, n, shapes[n], base_of))

    return [tm.magnitude_threshold(taus(inp), density) for inp in inputs]


def _on(tensor, like):
    return tensor if tensor.device == like.device else tensor.to(like.device)


def open_inputs(method: str, loaded, cfg, ctx, stack: ExitStack):
    """Ready the base (an adapter it carries folded in; a quantized one dequantized) and open
    every model of `cfg.models` for reading (`inputs.open_input`). Returns (the inputs, how
    to quantize the result again, or None)."""
    stream_adapters = not has_adapter(loaded)  # a LoRA input's own base is the one loaded
    if not stream_adapters:
        merge_adapter_(loaded, "mmkit merge")
    requantize = dequantize_(loaded, f"the base '{loaded.source.ref}'")
    base_source, base_seed = _base_identity(loaded, ctx)
    inputs = [open_input(ref, ctx.models[ref], loaded, base_source, base_seed, ctx.seed,
                         stream_adapters, method not in ("linear", "slerp", "greedy-soup"),
                         stack, ctx.allow_pickle, ctx.trust_remote_code) for ref in cfg.models]
    return inputs, requantize


def finish_(loaded, masks, requantize, ctx) -> None:
    """After the weights are merged: a pruned base's zeros back in place, and a quantized
    base's format again (the error reported). A quantized base has no masks: its grid
    rounds many weights to exactly zero, which is no pruning."""
    from ...core.sparsity import reapply_

    reapply_(masks)
    if masks:
        ctx.report["pruned_layers_kept"] = len(masks)
    if requantize is not None:
        ctx.report["requantized"] = requantize_(loaded, requantize, ctx)


def merge_heads(loaded, grouped, cfg, ctx):
    """The heads part of a merge, after the body: the report's account of the heads."""
    if not isinstance(grouped, tuple):
        return "merged" if grouped == "method" else None
    manifests = {ref: (ctx.models[ref].adapter or ctx.models[ref]).manifest
                 for ref in cfg.models}
    return _heads(loaded, *grouped, manifests)


def merge_(method: str, loaded, cfg, ctx):
    """Merge `cfg.models` into the loaded base (see the module's docstring); a lazily loaded
    base is merged file to file (`streamed`). A base whose Linear layers hold pruned zeros
    keeps them; `lambda: auto` merges at 1, then picks the scale on the validation data
    (`tuned.choose_lambda`)."""
    import torch

    from ...core.loading import materialize
    from ...core.sparsity import zero_masks
    from . import streamed

    start = time.perf_counter()
    weights = _weights(method, cfg)
    if getattr(cfg, "as_adapter", None):
        return _as_adapter(method, materialize(loaded), cfg, ctx, weights, start)
    auto = getattr(cfg, "lam", None) == "auto"
    if auto:
        cfg = cfg.model_copy(update={"lam": 1.0})
    with ExitStack() as stack, torch.no_grad():
        files = streamed.open_base(loaded, stack) if loaded.extra.get("lazy") else None
        inputs, requantize = open_inputs(method, loaded, cfg, ctx, stack)
        names, grouped = _plan_tensors(loaded, inputs)
        if loaded.extra.get("lazy") and (files is None or isinstance(grouped, tuple)):
            loaded, files = materialize(loaded), None  # heads of several tasks: in memory
            names, grouped = _plan_tensors(loaded, inputs)
        masks = zero_masks(loaded.model) if files is None and requantize is None else []
        state = loaded.model.state_dict()
        if files is not None:
            base_of = files.tensor
        else:
            def base_of(name, rows):
                return state[name] if rows is None else state[name][rows]
        thresholds = None
        if method == "ties" and cfg.trim_scope == "model":
            shapes = {n: tuple(state[n].shape) for n in names}
            thresholds = _thresholds(names, shapes, base_of, inputs, cfg.density)
        combine = _combiner(method, cfg, weights, ctx.seed, thresholds)
        if files is not None:
            merge = functools.partial(merge_block, method, cfg, combine, inputs)
            cuts = functools.partial(tensor_cuts, method, cfg, inputs)
            ctx.report.update(streamed.stream(loaded, files, names, merge, cuts,
                                              functools.partial(parts_of, method), ctx.out))
        else:
            before = {n: state[n].detach().clone() for n in names} if auto else None
            for name in names:
                _merge_tensor(method, cfg, combine, inputs, name, state[name])
        heads = merge_heads(loaded, grouped, cfg, ctx)
    if auto:
        from .tuned import choose_lambda

        ctx.report["lambda_auto"] = choose_lambda(loaded, before, cfg, ctx)
        cfg = cfg.model_copy(update={"lam": ctx.report["lambda_auto"]["chosen"]})
    finish_(loaded, masks, requantize, ctx)
    ctx.report.update({
        "method": method, "models": list(cfg.models), "weights": weights,
        "lambda": getattr(cfg, "lam", None), "density": getattr(cfg, "density", None),
        "t": getattr(cfg, "t", None), "inputs": {inp.ref: inp.kind for inp in inputs},
        "tensors_merged": len(names), "heads": heads,
        "thresholds": thresholds, "seconds": round(time.perf_counter() - start, 3)})
    ctx.report = {k: v for k, v in ctx.report.items() if v is not None}
    return loaded


def _as_adapter(method: str, loaded, cfg, ctx, weights, start):
    """`--as-adapter`: the LoRA adapters combined into one LoRA adapter on the base
    (`lora_sum`), whose delta is the merge's sum_i w_i x delta_i (task arithmetic: lambda x
    w_i); the result is that adapter on the base, written as a peft adapter."""
    import tempfile

    from peft import PeftModel

    from .lora_sum import combine_loras, write_adapter

    if has_adapter(loaded):
        raise InputError(f"--as-adapter writes an adapter of the base; the base "
                         f"'{loaded.source.ref}' is itself an adapter. Pass its base model as "
                         "--base (or merge it first with `mmkit merge ADAPTER -o OUT`).")
    with ExitStack() as stack:
        inputs, requantize = open_inputs("task-arithmetic", loaded, cfg, ctx, stack)
        others = [inp.ref for inp in inputs if inp.kind != "lora"]
        if others or requantize is not None:
            what = (f"'{others[0]}' is not a plain LoRA adapter of the base" if others else
                    f"the base '{loaded.source.ref}' is quantized")
            raise InputError(f"--as-adapter combines plain LoRA adapters of one floating-point "
                             f"base into one; {what}. Merge full weights instead (drop "
                             "--as-adapter).")
    scale = cfg.lam if method == "task-arithmetic" else 1.0
    folders = [ctx.models[ref].adapter.path for ref in cfg.models]
    info: dict = {}
    config, state = combine_loras(folders, [scale * w for w in weights], cfg.as_adapter,
                                  cfg.rank, info)
    with tempfile.TemporaryDirectory(prefix="mmkit-merge-") as tmp:
        write_adapter(config, state, tmp)
        loaded.model = PeftModel.from_pretrained(loaded.model, tmp)
    loaded.model.peft_config["default"].base_model_name_or_path = config.get(
        "base_model_name_or_path")
    loaded.extra["format"] = "peft-adapter"
    ctx.report.update({"method": method, "models": list(cfg.models), "weights": weights,
                       "lambda": getattr(cfg, "lam", None), "as_adapter": cfg.as_adapter,
                       "inputs": {inp.ref: inp.kind for inp in inputs}, **info,
                       "seconds": round(time.perf_counter() - start, 3)})
    ctx.report = {k: v for k, v in ctx.report.items() if v is not None}
    return loaded


def make_apply(method: str):
    """The apply function of one merge method."""

    def apply(loaded, cfg, ctx):
        return merge_(method, loaded, cfg, ctx)

    apply.__name__ = f"{method.replace('-', '_')}_merge"
    return apply


linear_ = make_apply("linear")
task_arithmetic_ = make_apply("task-arithmetic")
ties_ = make_apply("ties")
dare_linear_ = make_apply("dare-linear")
dare_ties_ = make_apply("dare-ties")
slerp_ = make_apply("slerp")


def greedy_soup_(loaded, cfg, ctx):
    """`merge greedy-soup` (see `tuned.greedy_soup`)."""
    from .tuned import greedy_soup

    return greedy_soup(loaded, cfg, ctx)


def atlas_(loaded, cfg, ctx):
    """`merge atlas` (see `tuned.atlas`)."""
    from .tuned import atlas

    return atlas(loaded, cfg, ctx)


def adapter_(loaded, cfg, ctx):
    """`merge adapter`: fold the recipe model's adapter (LoRA and the other peft weight
    updates, SVFit) into its base and leave a plain model (peft's merge_and_unload)."""
    start = time.perf_counter()
    if not has_adapter(loaded):
        raise InputError(f"merging needs two or more models, or one adapter: "
                         f"'{loaded.source.ref}' is a full model, with no adapter to fold into "
                         "it. Name the models to merge (and --base for the task-vector "
                         "methods).")
    model = loaded.model
    kind = (str(model.peft_config[model.active_adapter].peft_type.value).lower()
            if hasattr(model, "peft_config") else loaded.extra["adapter"]["method"])
    merge_adapter_(loaded, "mmkit merge")
    ref = loaded.extra.pop("merged_adapter", loaded.source.ref)  # this step's work, not a prelude
    ctx.report.update({"method": "adapter", "adapter": ref, "adapter_kind": kind,
                       "seconds": round(time.perf_counter() - start, 3)})
    return loaded
