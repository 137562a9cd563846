"""Load a model reference into (model, tokenizer / image processor, task, labels)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, RuntimeFailure
from .families import DEFAULT_TASK, head_task, model_kind
from .heads import pick_head
from . import formats
from .layers import output_heads
from .refs import ModelSource, resolve

log = logging.getLogger("mmkit")

TASKS = ("text-classification", "image-classification", "zero-shot-image-classification",
         "causal-lm")
# which model kinds can serve each task
TASK_KINDS = {
    "text-classification": ("text-encoder", "causal-lm"),
    "image-classification": ("vision",),
    "zero-shot-image-classification": ("clip",),
    "causal-lm": ("causal-lm",),
}


@dataclass
class LoadedModel:
    """A model ready to run, with what is needed to feed it and to describe it."""

    model: object
    source: ModelSource
    kind: str  # text-encoder | vision | clip | causal-lm
    task: str
    tokenizer: object = None
    image_processor: object = None
    labels: list[str] | None = None  # class names in the head's order
    fresh_head: bool = False  # True when the task head was created, not loaded
    config_kind: str = ""  # config.model_type
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        """The config's model_type (bert, vit, clip, llama, gpt2, ...)."""
        return self.config_kind


def check_task(task: str) -> str:
    """Validate a task name."""
    if task not in TASKS:
        raise InputError(f"Unknown task '{task}'. Tasks: {', '.join(TASKS)}.")
    return task


def resolve_device(device: str | None) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a torch device string, checked to exist."""
    import torch

    device = (device or "cpu").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for but this machine has no CUDA "
                             "GPU visible to torch. Use --device cpu.")
        return device
    raise InputError(f"Unknown device '{device}'. Use cpu, cuda, cuda:N or auto.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_weights(source: ModelSource, allow_pickle: bool) -> None:
    """Fail with a clear message on missing, pickled, truncated or altered weight files."""
    from safetensors import SafetensorError, safe_open

    folder = Path(source.path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        if pickled and not allow_pickle:
            raise InputError(f"'{source.ref}' holds only pickle weights ({pickled[0].name}); "
                             "mmkit loads safetensors by default because unpickling can run "
                             "code. Convert them to safetensors, or pass --allow-pickle if you "
                             "trust the files.")
        from .ort_runtime import is_onnx_export

        if not pickled and is_onnx_export(folder):
            raise InputError(f"'{source.ref}' is an ONNX export (mmkit export --onnx), which "
                             "only `mmkit bench --runtime onnxruntime` and ONNX Runtime itself "
                             "run. Pass the PyTorch model it was exported from (its "
                             "mmkit_onnx.json names it under \"model\").")
        if not pickled:
            raise InputError(f"'{source.ref}' has a config but no weight files (*.safetensors). "
                             "Pass the folder that save_pretrained wrote.")
        return
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise InputError(f"The weight file {f} is truncated or corrupted ({exc}). "
                             "Re-create or re-download it.") from None
    for name, meta in (source.manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"The artifact '{source.ref}' lists {name} in mmkit.json but the "
                             "file is missing; the artifact is incomplete. Re-create it.")
        if path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get("sha256"):
            raise InputError(f"{path} does not match the hash recorded in mmkit.json: the file "
                             "was changed or damaged after mmkit wrote it. Re-create the "
                             "artifact (or delete mmkit.json to load it as plain files).")


def auto_class(task: str):
    """The transformers Auto class that builds a model for a task."""
    import transformers as tf

    return {
        "text-classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
        "zero-shot-image-classification": tf.AutoModel,
        "causal-lm": tf.AutoModelForCausalLM,
    }[task]


def _load_config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    from .tiny import tiny_config

    if source.kind == "tiny":
        return tiny_config(source.family)
    from huggingface_hub.errors import StrictDataclassError

    try:
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise InputError(f"Cannot read the config of '{source.ref}': {exc}. If the model needs "
                         "its own code, pass --trust-remote-code.") from None
    except (OSError, TypeError, KeyError, AttributeError, StrictDataclassError) as exc:
        raise InputError(f"The config.json of '{source.ref}' is not a valid model config "
                         f"({type(exc).__name__}: {exc}). Fix the file, or re-create it with "
                         "save_pretrained.") from None


def _head_labels(config, labels: list[str] | None, task: str, has_head: bool, ref: str,
                 trained: list[str] | None = None):
    """Labels in the head's order; sets num_labels / id2label on the config for a new head.

    `trained` are the labels of a head an adapter carries (rebuilt on a base without one).
    """
    if task not in ("text-classification", "image-classification"):
        return None
    if trained is not None:
        _check_fit(labels, trained, ref)
        names = list(trained)
    elif has_head:
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
        if labels is None:
            return names
        if generic and len(labels) <= len(names):
            return list(labels) + names[len(labels):]
        _check_fit(labels, names, ref)
        return names
    else:
        if labels is None:
            raise InputError(f"'{ref}' has no trained {task} head and no labels were given to "
                             "create one. Pass --data naming labelled data (tweets-sentiment, or "
                             "a CSV / JSONL with a label column) so mmkit can read the class "
                             "names; a corpus without labels, such as bbc-text, cannot.")
        if len(labels) < 2:
            raise InputError(f"{task} needs at least two classes in the data; found {labels}.")
        names = list(labels)
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {lab: i for i, lab in enumerate(names)}
    return names


def _check_fit(labels, names, ref) -> None:
    """The data's labels must be among the ones a trained head knows."""
    unknown = [lab for lab in labels or [] if lab not in names]
    if unknown:
        raise InputError(f"The data has labels {unknown[:5]} that the head of '{ref}' cannot "
                         f"take: it was trained for {names}. Use data with those labels, "
                         "or start from the base model so a new head is created.")


def peek(ref: str | ModelSource, task: str | None = None, trust_remote_code: bool = False):
    """Resolve a reference and read its config only: (source, config, kind, task).

    The task defaults to the artifact's, then the checkpoint head's, then the kind's default,
    and is checked to fit the model.
    """
    source = ref if isinstance(ref, ModelSource) else resolve(ref)
    if source.is_adapter:
        source = _adapter_base(source)
    config = _load_config(source, trust_remote_code)
    kind = model_kind(config)
    manifest = (source.adapter or source).manifest
    manifest_task = (manifest.get("task") or {}).get("name")
    task = task or manifest_task or head_task(config) or DEFAULT_TASK.get(kind)
    if task is None:
        raise InputError(f"'{source.ref}' is a {config.model_type} model, which no mmkit task "
                         f"serves yet. Tasks: {', '.join(TASKS)}.")
    check_task(task)
    if kind not in TASK_KINDS[task]:
        raise InputError(f"Task {task} does not fit '{source.ref}', a {kind} model "
                         f"({config.model_type}); it takes {', '.join(TASK_KINDS[task])} models. "
                         f"Use --task {DEFAULT_TASK.get(kind, '...')}.")
    return source, config, kind, task


def _adapter_base(adapter: ModelSource) -> ModelSource:
    """For an adapter folder: the base model it was trained on (from the manifest, else from
    the adapter's own files), carrying the adapter's manifest so task and labels follow it."""
    fmt = formats.detect(adapter.path, adapter=True)
    parent = (adapter.manifest.get("parent") or {}).get("ref") or fmt.base(Path(adapter.path))
    if not parent:
        raise InputError(f"'{adapter.ref}' is an adapter folder that does not say which base "
                         "model it belongs to; load it with `PeftModel.from_pretrained(base, "
                         "folder)`.")
    base = resolve(parent)
    if base.adapter is not None or base.is_adapter:
        raise InputError(f"'{adapter.ref}' sits on another adapter ({parent}); merge that one "
                         "first (finetune --merge).")
    base.adapter = adapter  # its manifest (task, labels, seed) governs; the base keeps its own
    return base


@dataclass
class LoadOptions:
    """How a model's files are read: what mmkit passes to from_pretrained."""

    dtype: object = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    new_head: bool = False  # the task head is created, so its tensors are not in the files
    quant: dict = field(default_factory=dict)  # bitsandbytes kwargs (a QLoRA base)


@dataclass
class _Head:
    """What the task head will be: loaded, created for the data's labels, carried by an
    adapter (`trained`), or absent (`bare`: the backbone alone, for inspecting it)."""

    labels: list[str] | None
    has_head: bool
    bare: bool
    trained: list[str] | None

    @property
    def fresh(self) -> bool:
        """True when a new, untrained head is created."""
        return not (self.has_head or self.bare or self.trained) and self.labels is not None


def _trained_labels(config, task: str) -> list[str] | None:
    """The labels of the checkpoint's own head for `task` (None when it has none)."""
    if head_task(config) != task:
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def _plan_head(source, config, task, labels, task_head: bool) -> _Head:
    trained = None
    made = (source.adapter.manifest.get("task") or {}) if source.adapter is not None else {}
    if made.get("name") == task and made.get("labels"):
        trained = [str(lab) for lab in made["labels"]]  # the base grows the adapter's head
    has_head = head_task(config) == task and task.endswith("classification")
    bare = not task_head and not has_head and not trained and task.endswith("classification")
    names = None if bare else _head_labels(config, labels, task, has_head,
                                           (source.adapter or source).ref, trained)
    return _Head(names, has_head, bare, trained)


def load_model(ref: str | ModelSource, task: str | None = None, labels: list[str] | None = None,
               *, dtype=None, device: str = "cpu", seed: int = 0, allow_pickle: bool = False,
               trust_remote_code: bool = False, task_head: bool = True,
               bits: int | None = None, lazy: bool = False) -> LoadedModel:
    """Load a model reference for a task.

    `bits` (4 or 8) loads the Linear layers through bitsandbytes (nf4 with double
    quantization, or int8), leaving task heads in full precision: the base of QLoRA.

    With `task_head=False` a classification model with no trained head is loaded as its bare
    backbone (for inspecting it) instead of growing a new head.

    `lazy=True` builds only the model's structure (on the meta device, no weights read) when
    the reference is a folder of plain safetensors files: for a step that streams the weights
    from the files itself (a merge). `materialize` loads such a model whole after all.

    The task defaults to the artifact's, then the checkpoint head's, then the kind's default.
    For classification, `labels` (class names from the data) create a new head when the
    checkpoint has none, and are checked against the head when it has one. The files are read
    by the registered format they match (`core.formats`), an adapter on top of its base.
    """
    import torch

    source, config, kind, task = peek(ref, task, trust_remote_code)
    if labels is not None and task.endswith("classification"):  # a model with several heads
        picked = pick_head(source, _trained_labels(config, task), labels)
        if picked is not source:
            source, config, kind, task = peek(picked, task, trust_remote_code)
    adapter, base_path = source.adapter, source.path
    if adapter is not None:  # the seed and the QLoRA bits the adapter was made with
        seed = (adapter.manifest.get("parent") or {}).get("seed", seed)
        bits = bits or ((adapter.manifest.get("steps") or [{}])[0].get("params") or {}).get("bits")
    head = _plan_head(source, config, task, labels, task_head)
    device = resolve_device(device)
    torch.manual_seed(seed)  # a new head is the same for the same seed
    cls = auto_class("zero-shot-image-classification" if head.bare else task)  # AutoModel if bare
    opts = LoadOptions(dtype, allow_pickle, trust_remote_code,
                       task.endswith("classification") and not head.has_head,
                       _bnb_config(bits, device) if bits else {})
    if lazy and _streamable(source, config, adapter, opts):
        check_weights(source, allow_pickle)
        with torch.device("meta"):
            model = cls.from_config(config)
        extra = {"lazy": dict(task=task, labels=labels, dtype=dtype, device=device, seed=seed,
                              allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                              task_head=task_head)}
    else:
        model, extra = _load_weights(cls, source, config, opts)
    from .elastic_space import read_elastic  # pydantic: not at import (`mmkit --help`)

    elastic = read_elastic(source.path) if adapter is None else None
    if elastic is not None:  # a super-network: `extract` and `search` read its space
        extra["elastic"] = elastic
    if adapter is not None:
        check_weights(adapter, allow_pickle)
        model, more = formats.detect(adapter.path, adapter=True).load(model, adapter)
        extra.update(more)
        source = adapter
    model.eval()
    if device != "cpu" and not opts.quant:  # bitsandbytes placed a quantized model already
        model.to(device)
    tokenizer, image_processor = _load_processors(source, kind, config, trust_remote_code)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fresh = head.fresh and task != "zero-shot-image-classification"
    if fresh:
        log.warning("'%s' has no trained %s head: a new one was created for %d classes "
                    "(its accuracy is chance until the model is fine-tuned).",
                    source.ref, task, len(head.labels))
    loaded = LoadedModel(model=model, source=source, kind=kind, task=task, tokenizer=tokenizer,
                         image_processor=image_processor, labels=head.labels, fresh_head=fresh,
                         config_kind=config.model_type, extra=extra)
    if "lazy" not in extra:  # saved settings that change how it runs (token merging)
        from .runtime_settings import apply_settings

        apply_settings(loaded, [source.path] + ([base_path] if adapter is not None else []))
    return loaded


def _streamable(source: ModelSource, config, adapter, opts: LoadOptions) -> bool:
    """True when a model's weights can be read straight from plain safetensors files."""
    return (adapter is None and not opts.quant and not opts.new_head and opts.dtype is None
            and source.kind in ("artifact", "folder", "embedded")
            and getattr(config, "quantization_config", None) is None
            and formats.detect(source.path) is formats.get_format(formats.PLAIN)
            and any(Path(source.path).glob("*.safetensors")))


def materialize(loaded: LoadedModel) -> LoadedModel:
    """A lazily loaded model (`load_model(lazy=True)`) loaded whole; any other as it is."""
    options = loaded.extra.get("lazy")
    if not options:
        return loaded
    return load_model(loaded.source, **options)


def _load_weights(cls, source: ModelSource, config, opts: LoadOptions):
    """The base model of a reference, built by the format its folder holds: (model, extra)."""
    if source.kind == "tiny":
        model = cls.from_config(config)
        extra = {}
        if opts.quant:
            model = requantize(cls, model, opts.quant)
    else:
        if source.kind != "hub":
            check_weights(source, opts.allow_pickle)
        fmt = formats.detect(source.path) if source.kind != "hub" else None
        fmt = fmt or formats.get_format(formats.PLAIN)
        model, extra = fmt.load(cls, source, config, opts)
        if fmt.name != formats.PLAIN:  # the loaded model keeps its format: a save writes it
            extra = {"format": fmt.name, **extra}
    if getattr(model, "is_quantized", False):  # bitsandbytes: a kernel for every CPU
        from .bnb_cpu import fit_cpu_kernels_

        fit_cpu_kernels_(model)
    return model, extra


def _bnb_config(bits: int, device: str) -> dict:
    """from_pretrained kwargs that load Linear layers in 4-bit nf4 or 8-bit via bitsandbytes."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits not in (4, 8):
        raise InputError(f"bits must be 4 or 8 for a bitsandbytes base, not {bits}.")
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32  # no bf16 on CPU
    if bits == 4:
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
                                llm_int8_skip_modules=list(output_heads()))
    else:
        qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(output_heads()))
    return {"quantization_config": qc, "device_map": {"": device}}


def requantize(cls, model, quant: dict):
    """Quantize an in-memory model (a tiny one) by a save / from_pretrained round trip."""
    import tempfile

    origin = model.config._name_or_path  # adapters record it as their base: not the temp dir
    with tempfile.TemporaryDirectory(prefix="mmkit-q-") as tmp:
        model.save_pretrained(tmp)
        quantized = cls.from_pretrained(tmp, config=model.config, **quant)
    quantized.config._name_or_path = origin
    quantized.name_or_path = origin
    return quantized


def from_pretrained(cls, source: ModelSource, config, opts: LoadOptions):
    """`cls.from_pretrained` of a folder or hub id, safetensors only unless pickle is allowed,
    refusing weights that leave part of the model random."""
    import transformers

    kwargs = dict(config=config, trust_remote_code=opts.trust_remote_code,
                  dtype=opts.dtype or "auto", output_loading_info=True,
                  ignore_mismatched_sizes=True, **opts.quant)
    if not opts.allow_pickle:
        kwargs["use_safetensors"] = True
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # we report a new head ourselves
    try:
        model, info = cls.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"Cannot load '{source.ref}': {exc}") from None
    except RuntimeError as exc:
        raise RuntimeFailure(f"Loading '{source.ref}' failed: {exc}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    _check_loaded(source.ref, info, opts.new_head)
    return model


def _save_plain(loaded, folder: Path) -> None:
    written = loaded.extra.get("weights_files")  # a step wrote the weight files already
    if not written:
        loaded.model.save_pretrained(folder)
        return
    import shutil

    model = loaded.model
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    for path in written:
        shutil.move(path, folder / Path(path).name)


formats.register_format(formats.Format(
    formats.PLAIN, detect=lambda folder: True, save=_save_plain,
    load=lambda cls, source, config, opts: (from_pretrained(cls, source, config, opts), {}),
    summary="Hugging Face save_pretrained files (also a peft adapter on top)"))


NEW_HEAD_PARTS = {"classifier", "score", "pooler"}  # created, not loaded, for a new head


def _check_loaded(ref: str, info: dict, new_head: bool) -> None:
    """Refuse weights that leave part of the model random: tensors the files lack, or whose
    shapes disagree with the config (transformers would re-initialise them)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, found, wanted = list(mismatched[0])[:3]
        raise InputError(f"The weights of '{ref}' do not fit its config.json: {len(mismatched)} "
                         f"tensors have other shapes (e.g. {key}: {tuple(found)} in the file, "
                         f"{tuple(wanted)} by the config). The config and the weights belong to "
                         "different models; re-create the folder with save_pretrained.")
    missing = [k for k in info.get("missing_keys") or []
               if not (new_head and NEW_HEAD_PARTS & set(k.split(".")))]
    if missing:
        raise InputError(f"The weight files of '{ref}' lack {len(missing)} of the model's "
                         f"tensors (e.g. {', '.join(sorted(missing)[:3])}); loading them would "
                         "leave those weights random. The files are incomplete or belong to "
                         "another model: re-create them with save_pretrained.")


def _load_processors(source: ModelSource, kind: str, config, trust_remote_code: bool = False):
    from .tiny import tiny_processors

    if source.kind == "tiny":
        return tiny_processors(source.family)
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = image_processor = None
    try:
        if kind in ("text-encoder", "causal-lm", "clip"):
            tokenizer = AutoTokenizer.from_pretrained(source.path,
                                                      trust_remote_code=trust_remote_code)
        if kind in ("vision", "clip"):
            image_processor = AutoImageProcessor.from_pretrained(
                source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"'{source.ref}' has no usable tokenizer or image processor ({exc}). "
                         "Save it beside the weights with save_pretrained.") from None
    if tokenizer is not None:
        vocab = getattr(getattr(config, "text_config", config), "vocab_size", None) or 0
        if len(tokenizer) < vocab / 2:  # transformers builds a few-token stand-in
            raise InputError(f"'{source.ref}' has no usable tokenizer: the one found knows "
                             f"{len(tokenizer)} tokens for a vocabulary of {vocab}, so nearly "
                             "every word would become unknown. Save the model's tokenizer beside "
                             "the weights (tokenizer.save_pretrained(folder)).")
    return tokenizer, image_processor
