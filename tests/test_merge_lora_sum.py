"""Combining peft LoRA adapters into one LoRA adapter (compression/merge/lora_sum.py).

Real tiny adapters are trained-by-hand with peft (random nonzero lora_B and heads) on tiny BERT
(Linear layers, a classifier head) and GPT-2 (Conv1D layers, fan_in_fan_out) models built from
configs. The reference is written out here in float64 from each adapter as peft loads it
(B·A·scaling of every LoRA layer, the layer's own transpose): base + Σ wᵢ·ΔWᵢ, heads averaged
with the weights normalised to sum 1. The combined adapter is written, loaded back with
`PeftModel.from_pretrained`, and compared through peft's merge_and_unload and through the
logits of the unmerged model.
"""

import copy
import json
import math

import peft
import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper, get_pattern_key

from mmkit.compression.merge.lora_sum import _rank_pattern, combine_loras, write_adapter
from mmkit.core.errors import InputError

PREFIX = "base_model.model."


def _bert(num_labels=3, hidden=32, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, num_labels=num_labels)
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100,
                                     n_positions=32)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _adapter(base, folder, seed, config=None, **options):
    """A LoRA adapter of `base` saved in `folder`, with random nonzero lora_B (peft starts it
    at zero) and a random task head, as if trained."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), config or peft.LoraConfig(**options))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_A" not in name:
                param.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    return str(folder)


def _loaded(base, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def _parts(base, folder):
    """({weight name: ΔW in float64}, {tensor name: saved head tensor}) of an adapter as peft
    loads it: B·A·scaling per LoRA layer, transposed where the layer is fan_in_fan_out."""
    deltas, heads = {}, {}
    for name, module in _loaded(base, folder).named_modules():
        name = name.removeprefix(PREFIX)
        if isinstance(module, LoraLayer):
            (a,), (b,) = module.lora_A.values(), module.lora_B.values()
            (scaling,) = module.scaling.values()
            delta = b.weight.double() @ a.weight.double() * scaling
            deltas[f"{name}.weight"] = delta.T if module.fan_in_fan_out else delta
        elif isinstance(module, ModulesToSaveWrapper):
            for key, value in module.modules_to_save["default"].state_dict().items():
                heads[f"{name}.{key}"] = value.double()
    return deltas, heads


def _expected(base, folders, weights):
    """The base's state dict (float64) plus Σ wᵢ·ΔWᵢ, the heads averaged (weights / Σw)."""
    state = {k: v.double().clone() for k, v in base.state_dict().items()}
    heads = {}
    for folder, w in zip(folders, weights):
        deltas, saved = _parts(base, folder)
        for name, delta in deltas.items():
            state[name] += w * delta
        for name, value in saved.items():
            heads[name] = heads.get(name, 0) + value * (w / sum(weights))
    state.update(heads)
    return state


def _combined(folders, weights, how, out, rank=None):
    config, state = combine_loras([str(f) for f in folders], weights, how, rank)
    write_adapter(config, state, out)
    return config


def _max_diff(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(float((got[k].double() - want[k]).abs().max()) for k in want)


def _tokens(seed=1, vocab=100):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT classifier (3 labels)."""
    return _bert()


@pytest.fixture(scope="module")
def bert_adapters(bert, tmp_path_factory):
    """Three adapters of `bert`: rsLoRA r=2 on query/value; r=4 with alpha_pattern on
    query/key/every dense; rsLoRA r=2 with a rank_pattern (r=4 on value)."""
    root = tmp_path_factory.mktemp("bert_adapters")
    return {
        "rs": _adapter(bert, root / "rs", 1, task_type="SEQ_CLS", r=2, lora_alpha=3,
                       use_rslora=True, target_modules=["query", "value"]),
        "mixed": _adapter(bert, root / "mixed", 2, task_type="SEQ_CLS", r=4, lora_alpha=6,
                          target_modules=["query", "key", "dense"],
                          alpha_pattern={"key": 11, "intermediate.dense": 2}),
        "ranks": _adapter(bert, root / "ranks", 3, task_type="SEQ_CLS", r=2, lora_alpha=5,
                          target_modules=["value", "query"], rank_pattern={"value": 4},
                          use_rslora=True),
    }


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def gpt2_adapters(gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_adapters")
    return {
        "attn": _adapter(gpt2, root / "attn", 4, task_type="CAUSAL_LM", r=2, lora_alpha=4,
                         target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                         use_rslora=True),
        "mlp": _adapter(gpt2, root / "mlp", 5, task_type="CAUSAL_LM", r=4, lora_alpha=2,
                        target_modules=["c_fc", "c_attn"], fan_in_fan_out=True),
    }


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("how, rank", [("cat", None), ("svd", 8)])
def test_combined_bert_adapter_equals_the_weighted_sum_of_deltas(bert, bert_adapters, how, rank,
                                                                 tmp_path):
    names = ["rs", "mixed", "ranks"]
    folders, weights = [bert_adapters[n] for n in names], [0.7, -1.3, 0.45]
    _combined(folders, weights, how, tmp_path / "out", rank)
    want = _expected(bert, folders, weights)
    combined = _loaded(bert, tmp_path / "out")
    with torch.no_grad():
        got_logits = combined(input_ids=_tokens()).logits
    assert _max_diff(combined.merge_and_unload().state_dict(), want) < 1e-5
    reference = copy.deepcopy(bert)
    reference.load_state_dict({k: v.float() for k, v in want.items()})
    with torch.no_grad():
        want_logits = reference(input_ids=_tokens()).logits
    assert float((got_logits - want_logits).abs().max()) < 1e-4
    with torch.no_grad():  # the deltas are not small next to the base: a wrong scaling shows
        assert float((want_logits - bert(input_ids=_tokens()).logits).abs().max()) > 0.1


def test_cat_stacks_ranks_per_layer_and_writes_scaling_one(bert, bert_adapters, tmp_path):
    folders = [bert_adapters["rs"], bert_adapters["mixed"], bert_adapters["ranks"]]
    config = _combined(folders, [1.0, 1.0, 1.0], "cat", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == config
    assert config["use_rslora"] is False and config["peft_type"] == "LORA"
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"][0] == "classifier"
    layers = {name.removeprefix(PREFIX): module for name, module
              in _loaded(bert, tmp_path / "out").named_modules() if isinstance(module, LoraLayer)}
    prefix = "bert.encoder.layer.0."
    # query: 2 + 4 + 2, value: 2 + 4 (rank_pattern), key and the dense layers: 4 only
    want = {"attention.self.query": 8, "attention.self.value": 6, "attention.self.key": 4,
            "attention.output.dense": 4, "intermediate.dense": 4, "output.dense": 4}
    for name, r in want.items():
        assert layers[prefix + name].r["default"] == r
        assert layers[prefix + name].scaling["default"] == 1.0
    assert "bert.pooler.dense" in layers and len(layers) == 13


@pytest.mark.parametrize("how", ["cat", "svd"])
@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_one_adapter_at_weight_1_is_reproduced(model, how, bert, bert_adapters, gpt2,
                                               gpt2_adapters, tmp_path):
    base, folder = (bert, bert_adapters["rs"]) if model == "bert" else (gpt2, gpt2_adapters["attn"])
    _combined([folder], [1.0], how, tmp_path / "out")
    want_deltas, want_heads = _parts(base, folder)
    got_deltas, got_heads = _parts(base, tmp_path / "out")
    assert _max_diff(got_deltas, want_deltas) <= 1e-6
    assert max(float(d.abs().max()) for d in want_deltas.values()) > 0.1
    assert got_heads.keys() == want_heads.keys()
    assert all(torch.equal(got_heads[k], want_heads[k]) for k in want_heads)


@pytest.mark.parametrize("how, rank", [("cat", None), ("svd", 6)])
def test_gpt2_conv1d_adapters_with_negative_weights(gpt2, gpt2_adapters, how, rank, tmp_path):
    folders, weights = [gpt2_adapters["attn"], gpt2_adapters["mlp"]], [-0.8, 1.6]
    config = _combined(folders, weights, how, tmp_path / "out", rank)
    assert config["fan_in_fan_out"] is True
    want = _expected(gpt2, folders, weights)
    combined = _loaded(gpt2, tmp_path / "out")
    with torch.no_grad():
        got_logits = combined(input_ids=_tokens()).logits
    assert _max_diff(combined.merge_and_unload().state_dict(), want) < 1e-5
    reference = copy.deepcopy(gpt2)
    reference.load_state_dict({k: v.float() for k, v in want.items()})
    with torch.no_grad():
        want_logits = reference(input_ids=_tokens()).logits
    assert float((got_logits - want_logits).abs().max()) < 1e-4


def test_svd_below_the_true_rank_is_the_best_approximation(bert, bert_adapters, tmp_path):
    folders, weights = [bert_adapters["mixed"], bert_adapters["ranks"]], [1.2, -0.6]
    _combined(folders, weights, "svd", tmp_path / "out", rank=3)
    sums = {}
    for folder, w in zip(folders, weights):
        for name, delta in _parts(bert, folder)[0].items():
            sums[name] = sums.get(name, 0) + w * delta
    got = _parts(bert, tmp_path / "out")[0]
    assert got.keys() == sums.keys()
    for name, delta in sums.items():
        u, s, vh = torch.linalg.svd(delta)
        best = u[:, :3] * s[:3] @ vh[:3]
        assert float((got[name] - best).abs().max()) < 1e-5 * float(s[0])
        if "query" in name:  # rank 6: the truncation removes something
            assert float(s[3]) > 1e-3 * float(s[0])
            assert math.isclose(float(torch.linalg.norm(delta - got[name])),
                                float(s[3:].square().sum().sqrt()), rel_tol=1e-4)


def test_default_svd_rank_is_the_largest_input_rank(bert, bert_adapters, tmp_path):
    """4 (from "mixed") everywhere, except on value, which only "rs" adapts at rank 2: its
    delta has rank 2, and 2 factors hold it exactly."""
    folders = [bert_adapters["rs"], bert_adapters["mixed"]]
    config = _combined(folders, [1.0, 1.0], "svd", tmp_path / "out")
    ranks = {name: m.r["default"] for name, m in _loaded(bert, tmp_path / "out").named_modules()
             if isinstance(m, LoraLayer)}
    assert config["r"] == 4 and len(ranks) == 13
    assert all(r == (2 if name.endswith("value") else 4) for name, r in ranks.items())


def test_the_heads_average_is_reported(bert, bert_adapters):
    info = {}
    combine_loras([bert_adapters["rs"], bert_adapters["mixed"]], [3.0, 1.0], "cat", info=info)
    assert "classifier.weight" in info["heads_averaged"]
    assert info["heads_weights"] == [0.75, 0.25]


def test_rank_pattern_keys_resolve_only_their_own_layer():
    """peft resolves a layer's rank with the first rank_pattern key matching its name's tail as
    a regular expression: names that are tails of others, or equal but for a dot, must not
    capture each other in any order of the keys (peft sorts them when it saves)."""
    ranks = {"encoder.layer.0.q": 2, "vision.encoder.layer.0.q": 8, "text.encoder.layer.0.q": 8,
             "layers.1.0.q": 3, "layers.110.q": 8, "h.1.v": 5}
    pattern = _rank_pattern(ranks, 8)
    for order in (pattern, dict(sorted(pattern.items())), dict(reversed(pattern.items()))):
        for name, r in ranks.items():
            assert order.get(get_pattern_key(list(order), name), 8) == r
    assert pattern["h.1.v"] == 5  # a name that captures nothing stays readable


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def misfits(bert, gpt2, tmp_path_factory):
    """Adapters that cannot be combined with bert_adapters["rs"] (or at all)."""
    root = tmp_path_factory.mktemp("misfits")
    lora = dict(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    made = {
        "dora": _adapter(bert, root / "dora", 6, use_dora=True, **lora),
        "bias": _adapter(bert, root / "bias", 6, bias="all", **lora),
        "pissa": _adapter(bert, root / "pissa", 6, init_lora_weights="pissa", **lora),
        "embedding": _adapter(bert, root / "embedding", 6, task_type="SEQ_CLS", r=2,
                              target_modules=["word_embeddings", "query"]),
        "ia3": _adapter(bert, root / "ia3", 6, peft.IA3Config(
            task_type="SEQ_CLS", target_modules=["key", "value"], feedforward_modules=[])),
        "wider_base": _adapter(_bert(hidden=48), root / "wider", 6, **lora),
        "five_labels": _adapter(_bert(num_labels=5), root / "five", 6, **lora),
    }
    for name in ("org/bert-a", "org/bert-b"):  # same architecture, other weights on the hub
        named = copy.deepcopy(bert)
        named.name_or_path = name
        made[name] = _adapter(named, root / name.replace("/", "-"), 6, **lora)
    token = transformers.AutoModelForTokenClassification.from_config(bert.config)
    made["token_task"] = _adapter(token, root / "token", 6, **{**lora, "task_type": "TOKEN_CLS"})
    made["gpt2_head"] = _adapter(gpt2, root / "gpt2_head", 6, task_type="CAUSAL_LM", r=2,
                                 target_modules=["c_attn"], modules_to_save=["ln_f"],
                                 fan_in_fan_out=True)
    made["gpt2_plain"] = _adapter(gpt2, root / "gpt2_plain", 7, task_type="CAUSAL_LM", r=2,
                                  target_modules=["c_attn"], fan_in_fan_out=True)
    pickled = peft.get_peft_model(copy.deepcopy(bert), peft.LoraConfig(**lora))
    pickled.save_pretrained(str(root / "pickled"), safe_serialization=False)
    made["pickled"] = str(root / "pickled")
    return made


BAD = {
    "dora": (["dora"], [1.0], {}, "DoRA"),
    "lora bias on all biases": (["bias"], [1.0], {}, "trains biases"),
    "pissa init": (["pissa"], [1.0], {}, "initialised with 'pissa'"),
    "embedding lora": (["embedding"], [1.0], {}, "lora_embedding"),
    "ia3": (["ia3"], [1.0], {}, "IA3 adapter, not LoRA"),
    "other hub base": (["org/bert-a", "org/bert-b"], [1.0, 1.0], {}, "base model ('org/"),
    "different base shapes": (["rs", "wider_base"], [1.0, 1.0], {}, "different base models"),
    "different heads": (["rs", "five_labels"], [1.0, 1.0], {}, "different tasks"),
    "different task types": (["rs", "token_task"], [1.0, 1.0], {}, "task type"),
    "head in only one": (["gpt2_plain", "gpt2_head"], [1.0, 1.0], {}, "ln_f"),
    "pickle weights": (["pickled"], [1.0], {}, "adapter_model.bin"),
    "no adapter": (["missing"], [1.0], {}, "not a peft adapter folder"),
    "weights count": (["rs", "rs"], [1.0], {}, "one weight per adapter"),
    "nan weight": (["rs"], [float("nan")], {}, "not a finite number"),
    "heads with weights summing to 0": (["rs", "rs"], [1.0, -1.0], {}, "sum to 0"),
    "unknown how": (["rs"], [1.0], {"how": "mean"}, "'cat' (exact) or 'svd'"),
    "rank 0": (["rs"], [1.0], {"how": "svd", "rank": 0}, "positive integer"),
    "rank with cat": (["rs"], [1.0], {"rank": 2}, "only applies to the 'svd'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_input_error_naming_the_cause(case, bert_adapters, misfits, tmp_path):
    names, weights, options, text = BAD[case]
    known = {**bert_adapters, **misfits}
    folders = [known.get(n, str(tmp_path / n)) for n in names]
    with pytest.raises(InputError) as caught:
        combine_loras(folders, weights, **{"how": "cat", **options})
    message = str(caught.value)
    assert text in message
    if names != ["rs"] and names != ["rs", "rs"]:  # an adapter's problem names the adapter
        assert any(folder in message for folder in folders)


def test_a_zero_sum_is_fine_without_heads(gpt2, gpt2_adapters, tmp_path):
    folder = gpt2_adapters["attn"]
    _combined([folder, folder], [1.0, -1.0], "cat", tmp_path / "out")
    merged = _loaded(gpt2, tmp_path / "out").merge_and_unload().state_dict()
    assert _max_diff(merged, {k: v.double() for k, v in gpt2.state_dict().items()}) < 1e-6
