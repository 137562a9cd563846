"""ONNX export (`mmkit export --onnx`): a model as one ONNX graph for ONNX Runtime, in float32
or with ONNX Runtime's dynamic int8 quantization, written beside its config.json and
tokenizer / image processor, and checked against PyTorch on real inputs before it is kept.

The graph comes from torch's own exporter (`torch.onnx.export(dynamo=True)`, which needs
onnxscript): optimum's ONNX exporter (optimum-onnx 0.1) requires transformers < 4.58, and
torch's older TorchScript exporter is deprecated and slated for removal. Batch and sequence
axes are dynamic. Causal LMs are exported with a KV cache (`onnx_kv`): one graph scores whole
sequences (an empty past) and decodes token by token on the cache it returns.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..core.errors import InputError, RuntimeFailure
from ..core.ort_runtime import (INFO_FILE, INSTALL_HINT, MODEL_FILE, onnx_bytes,
                                require_onnxruntime, session)
from . import onnx_check, onnx_kv

log = logging.getLogger("mmkit")

SCHEMA_VERSION = 1
OPSET = 18  # the opset torch's exporter is built on; ONNX Runtime 1.17+ runs it
# float32 graph vs PyTorch, each value: |ort - torch| <= ATOL + RTOL * max |torch| of its row
ATOL = RTOL = 1e-4
EXTERNAL_BYTES = 1_800_000_000  # above this the weights go to model.onnx.data (protobuf: 2 GB)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SCRATCH = ".fp32"  # inside the output being written: the float graph an int8 export starts from


def export_onnx(ref: str, out, *, task: str | None = None, int8: bool = False,
                overwrite: bool = False, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> dict:
    """Export the model `ref` (any mmkit model reference) to the folder `out`, written whole or
    not at all; returns the export's description (what `mmkit_onnx.json` holds) with the
    folder as `artifact`. See `export_model_` for what is exported and checked."""
    from ..core.loading import load_model
    from ..core.outputs import check_output, output_lock, output_path, staging
    from ..core.refs import resolve

    require_exporter()
    out = output_path(out)
    source = resolve(ref)
    reads = [("model", source.path)] if source.kind != "hub" else []
    check_output(out, overwrite, reads)
    with output_lock(out):
        check_output(out, overwrite, reads)
        loaded = load_model(source, task, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code, task_head=False)
        with staging(out, overwrite) as tmp:
            info = export_model_(loaded, tmp, int8=int8)
    return {"artifact": str(out), **info}


@contextlib.contextmanager
def temporary_export(loaded, *, int8: bool = False, threads: int | None = None,
                     warn: bool = True):
    """`export_model_` into a temporary folder, yielded as a Path and removed afterwards:
    for timing a model in ONNX Runtime without keeping its export."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mmkit-onnx-") as tmp:
        export_model_(loaded, tmp, int8=int8, threads=threads, warn=warn)
        yield Path(tmp)


def require_exporter() -> None:
    """Fail with the install line when ONNX Runtime or torch's exporter's helpers are missing."""
    require_onnxruntime()
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise InputError(f"ONNX export needs the '{name}' package, which is not installed. "
                             f"{INSTALL_HINT}") from None


def export_model_(loaded, folder, *, int8: bool = False, threads: int | None = None,
                  warn: bool = True) -> dict:
    """Write `loaded` as model.onnx (+ config.json, tokenizer / processor, mmkit_onnx.json)
    into the existing folder `folder`, and return the description written to mmkit_onnx.json.

    In place, first: a LoRA-style adapter is merged into its base and a half-precision model
    is cast to float32 (ONNX Runtime's CPU kernels are float32). Layers the exporter cannot
    take (mmkit's packed quantized layers, bitsandbytes, simulated activation quantization)
    are refused with an InputError naming the layer and the fix.

    The float32 graph must give PyTorch's outputs within ATOL + RTOL x the largest |value| of
    each row (`onnx_check.within`) on real inputs of several batch sizes and lengths, else
    RuntimeFailure (with `folder` holding partial files: write into a staging or temporary
    folder, as `export_onnx` does). With `int8`, the graph is then quantized by ONNX Runtime
    (dynamic: int8 weights per output channel, the embedding tables too; activations
    quantized at run time) and its distance to PyTorch is reported (largest difference, top-1
    agreement or cosine), not enforced: a warning when it strays far, unless not `warn`.
    `threads` sets the checking sessions' threads (default: torch's count).
    """
    require_exporter()
    folder = Path(folder)
    ref = loaded.source.ref
    plain_(loaded)
    names = input_names(loaded)
    trace, checks = onnx_check.batches(loaded, names)
    decoder = loaded.task == "causal-lm"  # a causal LM's classifier has no KV cache to feed
    if decoder:
        graph, names, trace, checks = _kv_graph(loaded, names, trace, checks)
        outputs = ["logits"]  # compared with PyTorch's; the presents by check_decoding
    else:
        outputs = output_names(loaded, trace)
        graph = _Graph(loaded.model, names, outputs).eval()
    external = _weight_bytes(loaded.model) > EXTERNAL_BYTES
    start = time.perf_counter()
    target = folder / SCRATCH / MODEL_FILE if int8 else folder / MODEL_FILE
    target.parent.mkdir(exist_ok=True)
    log.info("exporting %s to ONNX (opset %d): inputs %s, outputs %s", ref, OPSET,
             ", ".join(_short(names)), ", ".join(_short(graph.outputs)))
    axes = onnx_kv.axes(names) if decoder else _axes(loaded, names)
    _export(graph, trace, names, axes, target, external, ref)
    seconds = {"export": round(time.perf_counter() - start, 2)}
    with torch.no_grad():
        expected = [[t.numpy() for t in graph(*(b[n] for n in names))] for b in checks]
    sess = session(target, threads)
    fp32 = check(sess, checks, expected, names, outputs)
    if decoder:
        fp32["decoding"] = _check_decoding(sess, loaded)
        fp32["passed"] = fp32["passed"] and fp32["decoding"]["within_tolerance"]
    if not fp32["passed"]:
        raise RuntimeFailure(f"The ONNX graph of '{ref}' does not reproduce PyTorch's outputs: "
                             f"{_worst(fp32)} (tolerance {ATOL} + {RTOL} x the row's largest |value|), so it was "
                             "not written. This is a bug in the exporter or in mmkit; please "
                             "report it with the model's config.json.")
    report = {"fp32": fp32}
    if int8:
        start = time.perf_counter()
        quantization = quantize(target, folder / MODEL_FILE, external)
        seconds["quantize"] = round(time.perf_counter() - start, 2)
        sess = session(folder / MODEL_FILE, threads)
        report["int8"] = check(sess, checks, expected, names, outputs)
        if decoder:
            report["int8"]["decoding"] = _check_decoding(sess, loaded)
        if warn:
            _warn_if_far(ref, report["int8"])
        fp32_bytes = onnx_bytes(target.parent)
        shutil.rmtree(target.parent)
    else:
        quantization = None
        fp32_bytes = onnx_bytes(folder)
    info = describe(loaded, folder, sess, outputs, report, quantization, seconds, fp32_bytes)
    _save_companions(loaded, folder)
    from ..core.artifacts import file_hashes

    info["files"] = file_hashes(folder)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
    return info


def plain_(loaded) -> None:
    """Make `loaded` a plain float32 model the exporter takes (in place), or refuse it."""
    from ..adapters.merging import has_adapter, merge_adapter_

    if has_adapter(loaded) and _mergeable(loaded):
        merge_adapter_(loaded, "ONNX export")
    problem = unsupported(loaded)
    if problem:
        raise InputError(problem)
    dtypes = {p.dtype for p in loaded.model.parameters() if p.dtype.is_floating_point}
    if dtypes - {torch.float32}:
        log.info("casting %s to float32 for ONNX Runtime's CPU kernels", loaded.source.ref)
        loaded.model = loaded.model.float()


def _mergeable(loaded) -> bool:
    """peft adapters are merged (merge_adapter_ refuses the ones that are not weight changes,
    saying why); of mmkit's own, SVFit is merged and the others (bottleneck adapters, VPT)
    are ordinary modules the exporter traces as they are."""
    if hasattr(loaded.model, "peft_config"):
        return True
    return (loaded.extra.get("adapter") or {}).get("method") == "svfit"


def unsupported(loaded) -> str | None:
    """Why the exporter cannot take this model (a message naming the layer and the fix), or
    None when it can."""
    ref = loaded.source.ref
    fix = ("Export the full-precision model it was made from instead, and pass --int8 for "
           "ONNX Runtime's own int8 weights (dynamic quantization).")
    if getattr(loaded.model.config, "_attn_implementation", None) == "mmkit_log2_softmax" or \
            loaded.extra.get("ptq"):
        return (f"'{ref}' is an mmkit ptq model: its activation quantization is simulated in "
                "float arithmetic (and its attention is mmkit's own), which in ONNX would be "
                f"neither smaller nor faster than the float model. {fix}")
    method = (loaded.extra.get("adapter") or {}).get("method")
    if method in ("coop", "maple"):
        return (f"'{ref}' is a {method} adapter: its learned text prompts are fed to CLIP by "
                "mmkit when it classifies, and are not part of CLIP's own graph, so an export "
                "would silently drop them. Use it through mmkit (`mmkit eval`), or export the "
                "CLIP model it was trained on.")
    for name, module in loaded.model.named_modules():
        cls = type(module)
        where = f"{cls.__name__} at '{name}'"
        if hasattr(module, "qweight"):
            return (f"'{ref}' holds mmkit's packed quantized layers ({where}, from `mmkit "
                    "quantize`): their integer weights and kernels are torch's own and have "
                    f"no ONNX form. {fix}")
        if cls.__module__.startswith("bitsandbytes"):
            return (f"'{ref}' holds bitsandbytes 4/8-bit layers ({where}), which torch's ONNX "
                    f"exporter cannot take. {fix}")
        if cls.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            return (f"'{ref}' holds torch's quantized layers ({where}), which have no ONNX "
                    f"export. {fix}")
    return None


def input_names(loaded) -> list[str]:
    """The graph's inputs: what the tokenizer makes and the model takes, and/or pixels."""
    params = inspect.signature(loaded.model.forward).parameters
    names = []
    if loaded.tokenizer is not None:
        made = set(loaded.tokenizer.model_input_names) | {"input_ids", "attention_mask"}
        names = [n for n in TEXT_INPUTS if n in made and n in params]
        if loaded.kind == "causal-lm":  # segments mean nothing to a decoder
            names = [n for n in names if n != "token_type_ids"]
    if loaded.kind in ("vision", "clip"):
        names.append("pixel_values")
    return names


def output_names(loaded, batch: dict) -> list[str]:
    """The graph's outputs (a model without a KV cache): CLIP's image-text scores and both
    embeddings; else the head's logits, or the last hidden state of a backbone without a head
    (feature extraction)."""
    if loaded.kind == "clip":
        return ["logits_per_image", "text_embeds", "image_embeds"]
    with torch.no_grad():
        out = loaded.model(**batch)
    return ["logits"] if getattr(out, "logits", None) is not None else ["last_hidden_state"]


def _axes(loaded, names: list[str]) -> dict:
    """torch.export dimensions per input: batch and sequence are dynamic (CLIP's text and
    image batches separately); an image's channels and sides stay fixed."""
    from torch.export import Dim

    batch, sequence = Dim("batch"), Dim("sequence")
    images = Dim("images") if loaded.kind == "clip" else batch
    texts = Dim("texts") if loaded.kind == "clip" else batch
    return {n: {0: images} if n == "pixel_values" else {0: texts, 1: sequence} for n in names}


class _Graph(torch.nn.Module):
    """The model with positional tensor inputs and a tuple of named outputs."""

    def __init__(self, model, names, outputs):
        super().__init__()
        self.model, self.names, self.outputs = model, list(names), list(outputs)

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        return tuple(getattr(out, name) for name in self.outputs)


def _kv_graph(loaded, names, trace, checks):
    """A causal LM's graph with its KV cache (`onnx_kv`): (graph, its input names, the traced
    batch, the checked batches: whole sequences on an empty past)."""
    model = loaded.model
    try:
        layout = onnx_kv.cache_layout(model)
    except Exception as exc:  # a family whose cache is not a plain per-layer key/value pair
        raise InputError(f"'{loaded.source.ref}' ({loaded.family}) keeps a cache mmkit cannot "
                         f"export as past / present tensors ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Causal LMs whose cache is transformers' "
                         "DynamicCache (Llama, SmolLM2, Qwen2, Mistral, GPT-2, ...) "
                         "export; for this one use --runtime torch.") from exc
    positions = onnx_kv.takes_positions(model)
    names = names + (["position_ids"] if positions else []) + onnx_kv.past_names(len(layout))
    graph = onnx_kv.KVGraph(model, names[:len(names) - 2 * len(layout)], len(layout)).eval()
    return (graph, names, onnx_kv.trace_batch(trace, layout, positions),
            [onnx_kv.prefill_batch(b, layout, positions) for b in checks])


DECODE_CHECK = (2, 4)  # prompts, new tokens: the greedy decoding every causal export is checked on


def _check_decoding(sess, loaded) -> dict:
    """The graph's greedy decoding on its own cache against PyTorch's (`onnx_kv`)."""
    rows, new = DECODE_CHECK
    enc = loaded.tokenizer(onnx_check.TEXTS[0], return_tensors="pt")["input_ids"]
    return onnx_kv.check_decoding(sess, loaded.model, enc.repeat(rows, 1), new, ATOL, RTOL)


def _short(names: list[str]) -> list[str]:
    """Input / output names for a log line, the cache's as one entry."""
    cache = [n for n in names if n.startswith((onnx_kv.PAST, onnx_kv.PRESENT))]
    rest = [n for n in names if n not in cache]
    return rest + ([f"{cache[0].rsplit('.', 2)[0]}.* ({len(cache)})"] if cache else [])


def _weight_bytes(model) -> int:
    from ..core.layers import weight_bytes

    return weight_bytes(model)


@contextlib.contextmanager
def quiet_libraries():
    """Keep the exporter's and the quantizer's notes (missing torchvision ops, skipped
    fusions, 'consider pre-processing') off stderr unless mmkit logs at debug level."""
    import warnings

    if log.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"),
               logging.getLogger("onnxscript"), logging.getLogger("torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(graph, batch: dict, names: list[str], axes: dict, path: Path, external: bool,
            ref: str) -> None:
    args = tuple(batch[n] for n in names)
    shapes = (tuple(axes[n] for n in names),)  # one entry: forward(*tensors)
    with quiet_libraries():
        try:
            torch.onnx.export(graph, args, str(path), input_names=names,
                              output_names=graph.outputs, dynamic_shapes=shapes,
                              opset_version=OPSET, dynamo=True, external_data=external,
                              verbose=False)
        except Exception as exc:  # the exporter raises many kinds; all mean the same here
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise RuntimeFailure(f"torch's ONNX exporter could not take '{ref}' "
                                 f"({type(exc).__name__}: {first}). Run again with --debug for "
                                 "the exporter's trace.") from exc


def quantize(source: Path, target: Path, external: bool) -> dict:
    """ONNX Runtime's dynamic int8 quantization of the graph at `source`, written to
    `target`: int8 weights per output channel for MatMul / Gather (the embedding tables) /
    Conv, activations quantized to uint8 at run time. Returns its settings."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_libraries():
        quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8,
                         use_external_data_format=external)
    return {"method": "onnxruntime dynamic", "weights": "int8, per output channel",
            "activations": "uint8, per tensor, at run time", "reduce_range": False}


def check(sess, batches: list[dict], expected: list, names: list[str],
          outputs: list[str]) -> dict:
    """Run the graph (an ONNX Runtime session) on the checked batches and compare each output
    with PyTorch's (`expected`, per batch, per output)."""
    pairs = {name: [] for name in outputs}
    for batch, want in zip(batches, expected):
        got = sess.run(outputs, {n: batch[n].numpy() for n in names})
        for name, ref, value in zip(outputs, want, got):
            pairs[name].append((onnx_check.per_position(batch, ref),
                                onnx_check.per_position(batch, value)))
    result = {name: onnx_check.compare(name, p, ATOL, RTOL) for name, p in pairs.items()}
    return {"batches": [int(next(iter(b.values())).shape[0]) for b in batches],
            "atol": ATOL, "rtol": RTOL, "outputs": result,
            "max_abs_diff": max(r["max_abs_diff"] for r in result.values()),
            "passed": all(r["within_tolerance"] for r in result.values())}


FAR_AGREEMENT, FAR_COSINE = 0.9, 0.95  # int8 below these: say so on stderr


def _warn_if_far(ref: str, result: dict) -> None:
    """A warning when the int8 graph strays far from PyTorch (dynamic int8 activations lose a
    causal LM's outliers)."""
    for name, r in result["outputs"].items():
        if r.get("argmax_agreement", 1) < FAR_AGREEMENT or r.get("mean_cosine", 1) < FAR_COSINE:
            how = (f"top-1 agreement {r['argmax_agreement']:.0%}" if "argmax_agreement" in r
                   else f"mean cosine {r['mean_cosine']:.3f}")
            log.warning("the int8 graph of %s strays far from PyTorch (%s: %s on the checked "
                        "inputs); dynamic int8 activations lose the outliers some models (causal "
                        "LMs) rely on. Export without --int8 to keep the float32 graph.",
                        ref, name, how)


def _worst(result: dict) -> str:
    name, r = max(result["outputs"].items(), key=lambda kv: kv[1]["max_abs_diff"])
    return f"{name} differs by up to {r['max_abs_diff']:.3g} (values up to {r['max_abs_reference']:.3g})"


def _save_companions(loaded, folder: Path) -> None:
    """config.json and the tokenizer / image processor, so that optimum's ORTModel classes or
    plain onnxruntime + transformers' processors open the folder."""
    model = loaded.model
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(folder)


def _versions() -> dict:
    out = {}
    for name in ("mmkit", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _specs(items) -> list[dict]:
    """Names, element types and shapes (symbolic axes by name) of a session's inputs or
    outputs."""
    types = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(int32)": "int32"}
    return [{"name": i.name, "dtype": types.get(i.type, i.type), "shape": list(i.shape)}
            for i in items]


def describe(loaded, folder: Path, sess, outputs, report, quantization, seconds,
             fp32_bytes: int) -> dict:
    """What mmkit_onnx.json says about an export (`sess`: a session of its graph)."""
    from ..core.profile import count_parameters

    return {
        "schema_version": SCHEMA_VERSION, "format": "onnx",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": loaded.source.ref, "family": loaded.family, "kind": loaded.kind,
        "task": loaded.task,
        "head": "features" if outputs == ["last_hidden_state"] else "logits",
        "labels": loaded.labels, "merged_adapter": loaded.extra.get("merged_adapter"),
        "inputs": _specs(sess.get_inputs()), "outputs": _specs(sess.get_outputs()),
        "opset": OPSET, "exporter": "torch.onnx.export (dynamo)",
        "kv_cache": True if loaded.task == "causal-lm" else None,
        "int8": quantization is not None, "quantization": quantization,
        "parameters": count_parameters(loaded.model),
        "onnx_mb": onnx_bytes(folder) / 1e6, "fp32_onnx_mb": fp32_bytes / 1e6,
        "check": report, "seconds": seconds, "versions": _versions(),
    }
