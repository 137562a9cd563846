"""Quantized token-embedding tables: lookups against a float64 reference, a tied LM head that
shares the table's codes (in memory and after reloading), sizes, the CLI and bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import logits, run_cli
from mmkit.compression.quantize.qembedding import QuantEmbedding
from mmkit.compression.quantize.qlinear import QuantLinear
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe


def _row_rtn_reference(w, bits):
    """Asymmetric RTN of each row in float64 numpy, from the definition."""
    w = w.double().numpy()
    maxq = 2 ** bits - 1
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    scale = ((hi - lo) / maxq).astype(np.float16).astype(np.float64)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return (q - zero[:, None]) * scale[:, None]


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_lookup_matches_a_float64_reference(bits):
    table = torch.nn.Embedding(50, 24)
    torch.nn.init.normal_(table.weight, generator=torch.Generator().manual_seed(bits))
    quantized, error = QuantEmbedding.quantize(table, bits)
    ids = torch.tensor([[3, 7, 7, 49], [0, 1, 2, 3]])
    reference = torch.from_numpy(_row_rtn_reference(table.weight.detach(), bits))
    assert torch.allclose(quantized(ids).double(), reference[ids], atol=1e-6)
    assert torch.equal(quantized(ids), quantized.weight_float()[ids])
    assert 0 < error < {8: 0.01, 4: 0.15, 3: 0.3}[bits]


def _quantize(ref, out, **step):
    return run_recipe({"model": ref, "steps": [{"step": "quantize", "method": "rtn",
                                                "bits": 8, "group_size": None, **step}]},
                      out=out)


def test_a_tied_head_shares_the_table_codes_and_reloads(tmp_path):
    result = _quantize("tiny:gpt2", tmp_path / "q", embeddings=4)
    account = result["steps"][0]["report"]["embeddings"]
    assert account["tied_head"] == "lm_head" and account["bits"] == 4
    spec = json.loads((tmp_path / "q" / "mmkit_quant.json").read_text())
    assert spec["format_version"] == 2 and spec["embeddings"]["transformer.wte"]["tied_head"] \
        == "lm_head"
    with safe_open(str(tmp_path / "q" / "mmkit_quantized.safetensors"), "pt") as f:
        assert "transformer.wte.qweight" in f.keys() and "lm_head.qweight" not in f.keys()
    loaded = load_model(str(tmp_path / "q"))
    table, head = loaded.model.transformer.wte, loaded.model.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is table.qweight and head.scales is table.scales
    # the head computes hidden @ table^T with the table's own dequantized rows
    hidden = torch.randn(3, table.embedding_dim)
    with torch.no_grad():
        expected = hidden @ table.weight_float().t()
        assert torch.allclose(head(hidden), expected, atol=2e-2 * expected.abs().max())
    assert torch.equal(logits(loaded), logits(load_model(str(tmp_path / "q"))))


def test_an_untied_head_stays_float_and_the_model_gets_smaller(tmp_path):
    plain = _quantize("tiny:llama", tmp_path / "plain")["steps"][0]["report"]
    with_table = _quantize("tiny:llama", tmp_path / "emb", embeddings=8)
    report = with_table["steps"][0]["report"]
    assert report["embeddings"]["tied_head"] is None
    assert report["weights_mb_after"] < plain["weights_mb_after"]
    loaded = load_model(str(tmp_path / "emb"))
    assert type(loaded.model.lm_head).__name__ == "Linear"
    float_logits = logits(load_model("tiny:llama"))
    assert torch.allclose(logits(loaded), float_logits, atol=0.05 * float_logits.abs().max())


def test_cli_embeddings_option_and_bad_values(tmp_path):
    ok = run_cli("quantize", "tiny:gpt2", "--method", "rtn", "--bits", "8", "--embeddings", "8",
                 "-o", tmp_path / "q", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["steps"][0]["report"]["embeddings"]["bits"] == 8
    for bad in ("1", "9", "x"):
        r = run_cli("quantize", "tiny:gpt2", "--method", "rtn", "--bits", "8", "--embeddings",
                    bad, "-o", tmp_path / f"bad{bad}")
        assert r.exit_code == 2 and "embeddings" in r.output and "Traceback" not in r.output
        assert not (tmp_path / f"bad{bad}").exists()


def test_a_damaged_table_description_is_refused(tmp_path):
    _quantize("tiny:gpt2", tmp_path / "q", embeddings=8)
    (tmp_path / "q" / "mmkit.json").unlink()  # its hashes would catch the edit first
    path = tmp_path / "q" / "mmkit_quant.json"
    spec = json.loads(path.read_text())
    spec["embeddings"]["transformer.wte"].pop("embedding_dim")
    path.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="embedding table transformer.wte"):
        load_model(str(tmp_path / "q"))
    spec["embeddings"] = ["not", "a", "mapping"]
    path.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="embeddings"):
        load_model(str(tmp_path / "q"))
