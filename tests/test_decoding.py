"""`mmkit bench --generate`: greedy decoding on the KV cache matches transformers' generate,
the figures are reported, and inputs it cannot measure are refused."""

import json

import pytest
import torch
from conftest import run_cli

from mmkit.core.decoding import greedy_decode, profile_generation
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_greedy_decoding_matches_generate(ref):
    loaded = load_model(ref)
    prompt = torch.randint(0, loaded.model.config.vocab_size, (3, 7),
                           generator=torch.Generator().manual_seed(1))
    ours, prefill, decode = greedy_decode(loaded.model, prompt, 6)
    with torch.no_grad():
        ref_tokens = loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                           do_sample=False, max_new_tokens=6, min_new_tokens=6,
                                           pad_token_id=0)
    assert torch.equal(ours, ref_tokens[:, 7:])
    assert prefill > 0 and decode > 0


def test_profile_generation_reports_prefill_and_decode_speed():
    loaded = load_model("tiny:llama")
    r = profile_generation(loaded, batch_size=2, prompt_len=10, new_tokens=5, warmup=0,
                           repeats=3)
    assert r["batch_size"] == 2 and r["new_tokens"] == 5 and len(r["decode_seconds"]) == 3
    median = sorted(r["decode_seconds"])[1]
    assert r["decode_tokens_per_s"] == pytest.approx(2 * 5 / median)
    assert r["decode_ms_per_token"] == pytest.approx(median / 5 * 1e3)
    with pytest.raises(InputError, match="positions"):  # prompt + new tokens beyond the table
        limit = loaded.model.config.max_position_embeddings
        profile_generation(loaded, prompt_len=limit, new_tokens=1)


def test_bench_generate_cli():
    r = run_cli("bench", "tiny:gpt2", "--generate", "4", "--seq-len", "8", "--repeats", "2",
                "--batch-size", "1", "--batch-size", "2", "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["batch_size"] for row in rows] == [1, 2]
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_ms"]["median"] > 0 for row in rows)
    bad = run_cli("bench", "tiny:bert", "--generate", "4")
    assert bad.exit_code == 2 and "causal LM" in bad.output and "Traceback" not in bad.output
