"""`tiny:<family>` models: small random models built from configs, for tests and quick trials.

Nothing is downloaded: the text models share a byte-level tokenizer built in memory, the vision
models a plain image processor. The same seed gives the same weights.
"""

from __future__ import annotations

TINY_FAMILIES = ("bert", "vit", "clip", "llama", "gpt2")
IMAGE_SIZE = 32


def byte_tokenizer(style: str):
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 4 specials).

    `style` is "bert" ([CLS] text [SEP]), "causal" (<s> text) or "clip" (<s> text </s>).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = ("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])
    if style in ("bert", "clip"):
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[bos, eos]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=128,
    )


def tiny_config(family: str):
    """The config of `tiny:<family>`: two layers, four heads, hidden size 32-64."""
    import transformers  # each config class is imported on first use (some pull in a lot)

    vocab = 260  # byte_tokenizer's size
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
        )
    if family == "vit":
        return transformers.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=IMAGE_SIZE, patch_size=8,
        )
    if family == "clip":
        return transformers.CLIPConfig(
            text_config=dict(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64,
                pad_token_id=0, bos_token_id=2, eos_token_id=3,
            ),
            vision_config=dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=IMAGE_SIZE, patch_size=8,
            ),
            projection_dim=32,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            bos_token_id=2, eos_token_id=3, pad_token_id=0,
        )
    raise ValueError(family)


def tiny_processors(family: str):
    """(tokenizer, image_processor) for `tiny:<family>`; either may be None."""
    # The Pil variants need no torchvision (the default ones warn and fall back without it).
    from transformers import CLIPImageProcessorPil, ViTImageProcessorPil

    if family == "bert":
        return byte_tokenizer("bert"), None
    if family in ("llama", "gpt2"):
        return byte_tokenizer("causal"), None
    if family == "vit":
        size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        return None, ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if family == "clip":
        proc = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )
        return byte_tokenizer("clip"), proc
    raise ValueError(family)
