"""Model references resolve as promised; loading builds the right model, head and processors."""

import time

import pytest
import torch

from conftest import TINY
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model, peek
from mmkit.core.refs import resolve


@pytest.mark.parametrize("ref,kind,task,cls", [
    ("tiny:bert", "text-encoder", "text-classification", "BertForSequenceClassification"),
    ("tiny:vit", "vision", "image-classification", "ViTForImageClassification"),
    ("tiny:clip", "clip", "zero-shot-image-classification", "CLIPModel"),
    ("tiny:llama", "causal-lm", "causal-lm", "LlamaForCausalLM"),
    ("tiny:gpt2", "causal-lm", "causal-lm", "GPT2LMHeadModel"),
])
def test_tiny_families_load_for_their_default_task(ref, kind, task, cls):
    loaded = load_model(ref, labels=["a", "b", "c"])
    assert (loaded.kind, loaded.task, type(loaded.model).__name__) == (kind, task, cls)
    if task.endswith("-classification") and kind != "clip":
        assert loaded.fresh_head and loaded.labels == ["a", "b", "c"]
        assert loaded.model.config.num_labels == 3
    assert (loaded.tokenizer is not None) == (kind != "vision")
    assert (loaded.image_processor is not None) == (kind in ("vision", "clip"))


@pytest.mark.parametrize("ref", TINY)
def test_same_seed_same_weights_other_seed_other_weights(ref):
    a = load_model(ref, labels=["x", "y"], seed=3).model.state_dict()
    b = load_model(ref, labels=["x", "y"], seed=3).model.state_dict()
    c = load_model(ref, labels=["x", "y"], seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_llama_serves_text_classification_with_a_new_head():
    loaded = load_model("tiny:llama", "text-classification", ["neg", "pos"])
    assert type(loaded.model).__name__ == "LlamaForSequenceClassification"


def test_task_that_does_not_fit_the_model_is_refused():
    with pytest.raises(InputError, match="image-classification does not fit"):
        peek("tiny:bert", "image-classification")


def test_classification_without_labels_asks_for_data():
    with pytest.raises(InputError, match="Pass --data"):
        load_model("tiny:bert")


def test_single_class_head_is_refused():
    with pytest.raises(InputError, match="at least two classes"):
        load_model("tiny:bert", labels=["only"])


def test_unknown_reference_fails_fast_and_lists_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        resolve("someone/not-a-model")
    assert time.perf_counter() - start < 5  # no hub retries (they take ~23 s a file)
    msg = str(err.value)
    assert "minilm" in msg and "smollm2" in msg and "tiny:bert" in msg and "hub" in msg


def test_unknown_tiny_family_lists_the_families():
    with pytest.raises(InputError, match="tiny:vit"):
        resolve("tiny:resnet")


def test_missing_local_path_and_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(InputError, match="no config.json"):
        resolve(str(tmp_path))


def test_a_path_object_names_a_local_model_as_its_string_does(tiny_artifacts):
    folder = tiny_artifacts["tiny:bert"]
    assert resolve(folder) == resolve(str(folder))
    assert load_model(folder).model.config == load_model(str(folder)).model.config


def test_folder_with_only_pickle_weights_is_refused_by_default(tmp_path):
    from mmkit.core.tiny import tiny_config

    tiny_config("bert").save_pretrained(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        load_model(str(tmp_path), labels=["a", "b"])


def test_plain_hf_folder_loads(tmp_path):
    from transformers import BertForSequenceClassification

    from mmkit.core.tiny import byte_tokenizer, tiny_config

    cfg = tiny_config("bert")
    cfg.num_labels = 2
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path)
    byte_tokenizer("bert").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source.kind == "folder" and not loaded.fresh_head
    ids = torch.tensor([[2, 40, 50, 3]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded.model(input_ids=ids).logits)


@pytest.mark.slow
def test_minilm_alias_loads_the_real_model():
    loaded = load_model("minilm", labels=["negative", "positive"])
    assert loaded.family == "bert" and loaded.source.kind == "embedded"
    assert sum(p.numel() for p in loaded.model.base_model.parameters()) == 22_713_216
