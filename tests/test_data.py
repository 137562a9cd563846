"""Data loading: formats, bundled datasets, deterministic splits, and every bad-input case."""

import json

import pytest

from mmkit.core.data import BUNDLED, align_labels, load_data
from mmkit.core.errors import InputError


def _all_inputs(ds):
    return [x for s in ds.splits.values() for x in s.inputs]


def test_csv_splits_are_deterministic_disjoint_and_complete(text_csv):
    a = load_data(str(text_csv), "text-classification", seed=1)
    b = load_data(str(text_csv), "text-classification", seed=1)
    c = load_data(str(text_csv), "text-classification", seed=2)
    assert {k: v.inputs for k, v in a.splits.items()} == {k: v.inputs for k, v in b.splits.items()}
    assert a.info["split_sha256"] == b.info["split_sha256"] != c.info["split_sha256"]
    assert sorted(_all_inputs(a)) == sorted(set(_all_inputs(a)))  # disjoint
    assert len(_all_inputs(a)) == 30 and a.info["sizes"] == {"train": 24, "validation": 3, "test": 3}
    assert a.label_names == ["neg", "pos"]
    for split in a.splits.values():  # labels follow their texts
        for text, y in zip(split.inputs, split.labels):
            assert ("great" in text) == (a.label_names[y] == "pos")


@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "parquet"])
def test_other_formats_and_column_names(tmp_path, fmt):
    rows = [{"sentence": f"row {i}", "category": "b" if i % 3 else "a"} for i in range(12)]
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "tsv":
        path.write_text("sentence\tcategory\n" + "\n".join(f"{r['sentence']}\t{r['category']}"
                                                          for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    ds = load_data(str(path), "text-classification")
    assert ds.label_names == ["a", "b"] and len(_all_inputs(ds)) == 12


def test_named_columns_and_missing_column_message(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("body,y\nhello,1\nbye,0\nhi,1\n")
    ds = load_data(str(path), "text-classification", text_column="body", label_column="y")
    assert ds.label_names == ["0", "1"]
    with pytest.raises(InputError, match="no text column.*--text-column"):
        load_data(str(path), "text-classification")
    with pytest.raises(InputError, match="no column 'label'.*body, y"):
        load_data(str(path), "text-classification", text_column="body", label_column="label")


def test_missing_empty_and_wrong_modality(tmp_path, text_csv):
    with pytest.raises(InputError, match="does not exist"):
        load_data(str(tmp_path / "missing.csv"), "text-classification")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(InputError, match="empty"):
        load_data(str(empty), "text-classification")
    with pytest.raises(InputError, match="needs images"):
        load_data("tweets-sentiment", "image-classification")
    with pytest.raises(InputError, match="max-samples"):
        load_data(str(text_csv), "text-classification", max_samples=0)


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(InputError, match="line 2"):
        load_data(str(path), "text-classification")


def test_empty_labels_are_reported(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,1\nb,\nc,0\n")
    with pytest.raises(InputError, match="no 'label' label"):
        load_data(str(path), "text-classification")


def test_image_folder_and_image_csv(image_folder, tmp_path):
    ds = load_data(str(image_folder), "image-classification")
    assert ds.modality == "image" and ds.label_names == ["class0", "class1", "class2"]
    csv_path = image_folder / "list.csv"
    csv_path.write_text("image,label\n" + "\n".join(
        f"class{c}/{i}.png,c{c}" for c in range(3) for i in range(6)))
    ds2 = load_data(str(csv_path), "image-classification")
    assert len(_all_inputs(ds2)) == 18 and all(p.endswith(".png") for p in _all_inputs(ds2))
    empty = tmp_path / "noimages"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        load_data(str(empty), "image-classification")


def test_text_file_is_a_corpus_for_causal_lm_only(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\n\nsecond doc\n\nthird doc\n")
    assert load_data(str(path), "causal-lm").label_names is None
    with pytest.raises(InputError, match="causal-lm only"):
        load_data(str(path), "text-classification")


@pytest.mark.parametrize("name,task,n,labels", [
    ("tweets-sentiment", "text-classification", 23140, ["negative", "positive"]),
    ("bbc-news", "text-classification", 2225,
     ["business", "entertainment", "politics", "sports", "tech"]),
    ("bbc-text", "causal-lm", 2225, None),
    ("digits", "image-classification", 1797, [str(i) for i in range(10)]),
    ("textile", "image-classification", 2000, ["global", "local", "nominal"]),
])
def test_bundled_datasets(name, task, n, labels):
    ds = load_data(name, task, max_samples=8)
    assert ds.info["examples"] == n and ds.label_names == labels
    assert ds.info["sizes"] == {"train": 8, "validation": 8, "test": 8}
    assert name in BUNDLED


def test_align_labels_follows_the_head_order(text_csv):
    ds = load_data(str(text_csv), "text-classification")
    before = [(t, ds.label_names[y]) for t, y in zip(ds.splits["train"].inputs, ds.splits["train"].labels)]
    align_labels(ds, ["pos", "neg"])
    after = [(t, ds.label_names[y]) for t, y in zip(ds.splits["train"].inputs, ds.splits["train"].labels)]
    assert before == after and ds.label_names == ["pos", "neg"]
