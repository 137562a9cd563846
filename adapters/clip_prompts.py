"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): learned context
vectors in CLIP's text prompts, CLIP itself frozen; and the text-prompt machinery MaPLe shares.

A class's prompt is `[BOS] v_1 ... v_M <class name> . [EOS]`: the M context vectors take the
place of the token embeddings right after BOS. mmkit builds the token ids itself (M placeholder
ids after BOS, then the tokens that follow a phrase in "<phrase> <name>."), hooks the text
tower's token lookup while it encodes those prompts so that the placeholders' embeddings become
the context vectors, and reads each prompt's feature at its EOS position, which it knows from
the ids it built: the class name and EOS sit M positions after BOS whatever the tokenizer's
EOS convention (transformers pools at the first EOS id, or at the largest id for old configs).
Position embeddings and the causal mask stay CLIP's own.

The context is shared by all classes (default) or one per class (`class_specific`); it starts
from a phrase's token embeddings (`context_init`, e.g. "a photo of": then M is the phrase's
token count and the untrained prompts equal the template "a photo of {}.") or from N(0, 0.02).

Outside `class_text_features` the model is plain CLIP: any other text goes through the text
tower unchanged. Zero-shot evaluation (core/tasks/zero_shot.py) finds the prompt module by its
`class_text_features` method and uses the learned prompts instead of templates.
"""

from __future__ import annotations

import sys
from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.train import TrainingConfig

MARK = "mmkit_coop"
DEFAULT_LR = 2e-3
PLACEHOLDER = "X"  # the word whose tokens are dropped when no phrase starts the context


class CoOpConfig(TrainingConfig):
    """CoOp: M learned context vectors before each class name in CLIP's text prompts."""

    context_tokens: int = Field(16, ge=1, le=64, description="learned context vectors per "
                                                             "prompt (M); with --context-init: "
                                                             "the phrase's token count")
    context_init: str | None = Field(None, min_length=1, description="a phrase whose token "
                                     "embeddings start the context (e.g. 'a photo of'); "
                                     "default: random N(0, 0.02)")
    class_specific: bool = Field(False, description="one context per class instead of one "
                                                    "shared by all classes")

    @model_validator(mode="after")
    def _no_merge(self):
        if self.merge:
            raise ValueError("learned prompts are inputs, not weight changes, so they cannot be "
                             "merged into the weights; drop merge")
        return self


def check_clip(loaded, method: str) -> None:
    """Fail unless `loaded` is a CLIPModel with its tokenizer: prompt learning reads CLIP's text
    tower, token lookup and projections."""
    model = loaded.model
    if type(model).__name__ != "CLIPModel" or not all(
            hasattr(model, a) for a in ("text_model", "vision_model", "text_projection")):
        raise InputError(f"{method} learns prompts for CLIP (a CLIPModel with text and vision "
                         f"towers); '{loaded.source.ref}' is a {type(model).__name__}. Use a "
                         "CLIP checkpoint, or --vpt / --lora for other models.")
    tok = loaded.tokenizer
    if tok is None or tok.bos_token_id is None or tok.eos_token_id is None:
        raise InputError(f"{method} needs CLIP's tokenizer (with BOS and EOS tokens); "
                         f"'{loaded.source.ref}' has none. Save the tokenizer with the model.")


def phrase_tokens(tokenizer, phrase: str) -> list[int]:
    """The token ids of a phrase, without BOS / EOS."""
    return tokenizer(phrase, add_special_tokens=False)["input_ids"]


def context_size(cfg, tokenizer) -> int:
    """M: the phrase's token count when a phrase starts the context, else `context_tokens`.
    A `context_tokens` given explicitly must agree with the phrase."""
    if not cfg.context_init:
        return cfg.context_tokens
    n = len(phrase_tokens(tokenizer, cfg.context_init))
    if n == 0:
        raise InputError(f"--context-init '{cfg.context_init}' has no tokens; give a phrase such "
                         "as 'a photo of'.")
    if "context_tokens" in cfg.model_fields_set and cfg.context_tokens != n:
        raise InputError(f"--context-init '{cfg.context_init}' is {n} tokens but "
                         f"--context-tokens is {cfg.context_tokens}: the phrase sets the context "
                         "length. Drop --context-tokens (or give a phrase of that length).")
    return n


def prompt_ids(tokenizer, names: list[str], context: int, phrase: str | None,
               max_positions: int):
    """Token ids, attention mask and EOS positions of the prompts `[BOS] ctx*M name . [EOS]`,
    one row per class name (padded to the longest).

    The tokens after the context are those that follow `phrase` (or a placeholder word) in
    "<phrase> <name>.", so the untrained prompts of a phrase-started context tokenize exactly
    like the template "<phrase> {}.".
    """
    import torch

    word = phrase or PLACEHOLDER
    prefix = phrase_tokens(tokenizer, word)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for name in names:
        full = tokenizer(f"{word} {name.replace('_', ' ')}.")["input_ids"]
        if full[0] != bos or full[-1] != eos or full[1:1 + len(prefix)] != prefix:
            raise InputError(f"The tokenizer does not split '{word} {name}.' into the tokens of "
                             f"'{word}' followed by the class name's, so the context cannot be "
                             f"placed before the name; choose another --context-init.")
        rows.append([bos] + [pad] * context + full[1 + len(prefix):])
    longest = max(len(r) for r in rows)
    if longest > max_positions:
        raise InputError(f"A prompt of {context} context tokens and the longest class name is "
                         f"{longest} tokens, more than the text tower's {max_positions} "
                         "positions; use fewer --context-tokens or shorter class names.")
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask, torch.tensor([len(r) - 1 for r in rows])


def _replace_after_bos(hidden, tokens):
    """`hidden` (batch, length, width) with positions 1..n replaced by `tokens` ((1 or batch),
    n, width)."""
    import torch

    tokens = tokens.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
    return torch.cat([hidden[:, :1], tokens, hidden[:, 1 + tokens.shape[1]:]], dim=1)


def _layer_input_hook(tokens, replace):
    """A forward pre-hook giving a layer `replace(hidden_states, tokens)` as its input."""
    def hook(module, args, kwargs):
        if args:
            return (replace(args[0], tokens), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"], tokens)}

    return hook


def encode_prompts(model, ids, mask, eos, context, deep: dict | None = None):
    """CLIP text features (projected, not normalized) of prompts whose positions 1..M are the
    context vectors `context` ((1 or classes), M, width) at the token lookup, and, for each
    `deep` layer index i, `deep[i]` (M, width) at that layer's input (MaPLe's deeper prompts).
    Pooled at the EOS positions `eos`."""
    import torch

    text = model.text_model
    device = context.device
    handles = [text.embeddings.token_embedding.register_forward_hook(
        lambda module, args, output: _replace_after_bos(output, context))]
    for i, tokens in (deep or {}).items():
        handles.append(text.encoder.layers[i].register_forward_pre_hook(
            _layer_input_hook(tokens[None], _replace_after_bos), with_kwargs=True))
    try:
        out = text(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    hidden = out.last_hidden_state  # after the final LayerNorm
    pooled = hidden[torch.arange(hidden.shape[0], device=device), eos.to(device)]
    return model.text_projection(pooled)


def max_positions(model) -> int:
    """How many token positions CLIP's text tower has."""
    return model.config.text_config.max_position_embeddings


def structure(cfg: CoOpConfig, tokenizer, names: list[str], model=None) -> dict:
    """The settings that rebuild the prompts when the adapter is loaded again."""
    return {"context_tokens": context_size(cfg, tokenizer), "context_init": cfg.context_init,
            "class_specific": cfg.class_specific, "classnames": list(names)}


def _learner_class():
    import torch

    class CoOpPrompts(torch.nn.Module):
        """The learned context: (classes or 1, M, width), N(0, 0.02) until initialised."""

        def __init__(self, width: int, params: dict, device, dtype):
            super().__init__()
            self.settings = dict(params)
            rows = len(params["classnames"]) if params["class_specific"] else 1
            self.ctx = torch.nn.Parameter(
                torch.empty(rows, params["context_tokens"], width, device=device, dtype=dtype))
            torch.nn.init.normal_(self.ctx, std=0.02)

        def init_from_phrase(self, model, tokenizer) -> None:
            """Start every context at the phrase's token embeddings."""
            ids = torch.tensor(phrase_tokens(tokenizer, self.settings["context_init"]),
                               device=self.ctx.device)
            with torch.no_grad():
                emb = model.text_model.embeddings.token_embedding(ids)
                self.ctx.copy_(emb.to(self.ctx.dtype).expand_as(self.ctx))

        def context_for(self, names: list[str]):
            """The context rows for `names` (class-specific contexts only fit their classes)."""
            if self.settings["class_specific"] and list(names) != self.settings["classnames"]:
                raise InputError(
                    f"These class-specific CoOp contexts were learned for the classes "
                    f"{self.settings['classnames']}; the data has {list(names)}. Evaluate on "
                    "data with those classes, or train a shared context (no --class-specific).")
            return self.ctx

        def class_text_features(self, model, tokenizer, names: list[str]):
            """One text feature per class name (projected, not normalized)."""
            ids, mask, eos = prompt_ids(tokenizer, names, self.settings["context_tokens"],
                                        self.settings["context_init"], max_positions(model))
            return encode_prompts(model, ids, mask, eos, self.context_for(names))

    return CoOpPrompts


def inject(model, params: dict, targets: list[str] | None = None,
           from_weights: bool = True) -> list[str]:
    """Attach CoOp's context (as `model.mmkit_coop`); return the module adapted."""
    ref = model.text_projection.weight
    learner = _learner_class()(model.config.text_config.hidden_size, params, ref.device,
                               ref.dtype)
    setattr(model, MARK, learner)
    return ["text_model"]


# ---------------------------------------------------------------- training (CoOp and MaPLe)
def prompt_classifier(model, learner, tokenizer, names: list[str]):
    """CLIP as a classifier of `names` through its learned prompts: logits = CLIP's scale x
    cosine(image feature, class prompt feature), with a cross-entropy loss given labels."""
    import torch

    from ..core.tasks.zero_shot import image_features, unit

    class PromptClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model  # the prompts are a module of it: one copy in the state dict
            self._prompts = (learner, tokenizer, list(names))  # a tuple: not a second copy

        def forward(self, pixel_values, labels=None):
            prompts, tok, classes = self._prompts
            text = unit(prompts.class_text_features(self.clip, tok, classes))
            image = unit(image_features(self.clip, pixel_values))
            logits = self.clip.logit_scale.exp() * image @ text.T
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    return PromptClassifier()


def make_apply(module, method: str):
    """The apply function of a prompt-learning method (`module`: clip_prompts or maple, with
    `structure(cfg, tokenizer, names, model)`, `inject`, `MARK`, `DEFAULT_LR`)."""

    def apply(loaded, cfg, ctx):
        import torch

        from ..core.train import train

        check_clip(loaded, method)
        model, names = loaded.model, list(ctx.dataset.label_names)
        params = module.structure(cfg, loaded.tokenizer, names, model)
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the same seed starts the same prompts
            torch.manual_seed(ctx.seed)
            targets = module.inject(model, params)
        learner = getattr(model, module.MARK)
        if params.get("context_init"):
            learner.init_from_phrase(model, loaded.tokenizer)
        for p in learner.parameters():
            p.requires_grad_(True)
        ctx.report["prompt_parameters"] = sum(p.numel() for p in learner.parameters())
        classifier = prompt_classifier(model, learner, loaded.tokenizer, names)
        ctx.report.update(train(loaded, classifier, cfg, ctx, module.DEFAULT_LR))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        loaded.extra["format"] = "mmkit-adapter"
        loaded.extra["adapter"] = {"method": method, "params": params, "targets": targets,
                                   "base_model": loaded.source.ref}
        return loaded

    apply.__name__ = f"{method}_finetune"
    return apply



coop_apply = make_apply(sys.modules[__name__], "coop")
