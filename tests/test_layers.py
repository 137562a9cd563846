"""core.layers: what counts as a Linear layer, the (out, in) weight view, task heads, and the
bytes a model's weights take."""

import torch
from transformers.pytorch_utils import Conv1D

from mmkit.core.layers import (TASK_HEADS, is_linear, is_task_head, new_heads, output_heads,
                               weight_bytes, weight_view)
from mmkit.core.loading import load_model


def test_is_linear_takes_linear_and_conv1d_only():
    assert is_linear(torch.nn.Linear(4, 3))
    assert is_linear(Conv1D(3, 4))
    assert not is_linear(torch.nn.Embedding(10, 4))
    assert not is_linear(torch.nn.LayerNorm(4))


def test_weight_view_is_out_by_in_and_shares_storage():
    linear, conv = torch.nn.Linear(4, 3), Conv1D(3, 4)  # both map 4 features to 3
    x = torch.randn(2, 4)
    for layer in (linear, conv):
        w = weight_view(layer)
        assert w.shape == (3, 4)
        assert w.data_ptr() == layer.weight.data_ptr()
        assert torch.allclose(layer(x), x @ w.T + layer.bias, atol=1e-6)
        with torch.no_grad():
            w[0, 1] = 7.0  # a write through the view reaches the layer
        assert float(weight_view(layer).detach()[0, 1]) == 7.0


def test_weight_bytes_matches_a_hand_count_with_tied_tensors_once():
    model = load_model("tiny:gpt2").model
    c = model.config
    e, inner = c.n_embd, c.n_inner or 4 * c.n_embd
    per_layer = (2 * e  # ln_1
                 + e * 3 * e + 3 * e + e * e + e  # attention: c_attn, c_proj
                 + 2 * e  # ln_2
                 + e * inner + inner + inner * e + e)  # MLP: c_fc, c_proj
    # the LM head is the token embedding itself (tied): counted once
    params = c.vocab_size * e + c.n_positions * e + c.n_layer * per_layer + 2 * e
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not list(model.buffers())
    assert weight_bytes(model) == 4 * params  # float32


def test_head_lists_are_subsets_of_the_one_list():
    assert set(new_heads()) <= set(output_heads()) <= set(TASK_HEADS)
    assert new_heads() == ("classifier", "score")
    assert output_heads() == ("classifier", "score", "lm_head")
    assert is_task_head("classifier.dense") and is_task_head("vision_model.text_projection")
    assert not is_task_head("bert.encoder.layer.0.output.dense")
    assert not is_task_head("vision_model.text_projection", output_heads())
