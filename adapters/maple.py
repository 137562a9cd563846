"""MaPLe (Khattak et al. 2023, "Multi-modal Prompt Learning"): prompts in both CLIP towers over
the first J layers, the vision prompts coupled to the text prompts; CLIP itself frozen.

Text tower: M learned vectors follow BOS in every class prompt (as in CoOp, see
clip_prompts.py); at each layer 1..J-1 the M positions after BOS of that layer's input are
replaced by the layer's own learned vectors (deep prompts). Vision tower: for each layer
i < J, the vision prompt is a per-layer linear map of the text prompt, P_v(i) =
coupling_i(P_t(i)) (text width -> vision width); the first is appended after the patch tokens
(after the position embeddings, before CLIP's pre-LayerNorm), and each later layer i < J
replaces those last M tokens of its input with P_v(i). The image feature is still the CLS
token's. Layers from J on run on whatever the previous layer left at the prompt positions.

The vision hooks are permanent (the adapted image encoder is a new image encoder); the text
prompts act only while `class_text_features` encodes the classes.
"""

from __future__ import annotations

import functools
import sys

from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.train import TrainingConfig
from . import clip_prompts

MARK = "mmkit_maple"
DEFAULT_LR = 2e-3
PAPER_DEPTH = 9  # the paper's J for ViT-B/16 (12 layers)


class MaPLeConfig(TrainingConfig):
    """MaPLe: coupled text and vision prompts in the first J layers of CLIP's two towers."""

    context_tokens: int = Field(2, ge=1, le=64, description="learned context vectors per "
                                                            "prompt (M); with --context-init: "
                                                            "the phrase's token count")
    context_init: str | None = Field(None, min_length=1, description="a phrase whose token "
                                     "embeddings start the context (e.g. 'a photo of'); "
                                     "default: random N(0, 0.02)")
    prompt_depth: int | None = Field(None, ge=1, description="layers of each tower that get "
                                     "prompts (J); default 9, or every layer of a shallower "
                                     "tower")

    @model_validator(mode="after")
    def _no_merge(self):
        if self.merge:
            raise ValueError("learned prompts are inputs, not weight changes, so they cannot be "
                             "merged into the weights; drop merge")
        return self


def depth(cfg: MaPLeConfig, model) -> int:
    """J, checked against both towers' layer counts."""
    layers = min(model.config.text_config.num_hidden_layers,
                 model.config.vision_config.num_hidden_layers)
    if cfg.prompt_depth is None:
        return min(PAPER_DEPTH, layers)
    if cfg.prompt_depth > layers:
        raise InputError(f"--prompt-depth {cfg.prompt_depth} is more layers than this CLIP has "
                         f"(text {model.config.text_config.num_hidden_layers}, vision "
                         f"{model.config.vision_config.num_hidden_layers}); give at most "
                         f"{layers}.")
    return cfg.prompt_depth


def structure(cfg: MaPLeConfig, tokenizer, names: list[str], model) -> dict:
    """The settings that rebuild the prompts when the adapter is loaded again."""
    return {"context_tokens": clip_prompts.context_size(cfg, tokenizer),
            "context_init": cfg.context_init, "prompt_depth": depth(cfg, model),
            "classnames": list(names)}


def _learner_class():
    import torch

    class MaPLePrompts(torch.nn.Module):
        """Text prompts per layer (`ctx` for the first, `deep_text[i-1]` for layer i) and one
        coupling Linear per layer (text width -> vision width)."""

        def __init__(self, text_width: int, vision_width: int, params: dict, device, dtype):
            super().__init__()
            self.settings = dict(params)
            n, j = params["context_tokens"], params["prompt_depth"]
            kw = {"device": device, "dtype": dtype}
            self.ctx = torch.nn.Parameter(torch.empty(1, n, text_width, **kw))
            self.deep_text = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.empty(n, text_width, **kw)) for _ in range(j - 1)])
            for p in [self.ctx, *self.deep_text]:
                torch.nn.init.normal_(p, std=0.02)
            self.coupling = torch.nn.ModuleList(
                [torch.nn.Linear(text_width, vision_width, **kw) for _ in range(j)])

        def text_prompt(self, i: int):
            """The text prompt of layer i, (M, text width)."""
            return self.ctx[0] if i == 0 else self.deep_text[i - 1]

        def vision_prompt(self, i: int):
            """The vision prompt of layer i, (M, vision width): coupling_i(text prompt i)."""
            return self.coupling[i](self.text_prompt(i))

        def init_from_phrase(self, model, tokenizer) -> None:
            """Start the first layer's text prompt at the phrase's token embeddings."""
            ids = torch.tensor(clip_prompts.phrase_tokens(tokenizer, self.settings["context_init"]),
                               device=self.ctx.device)
            with torch.no_grad():
                emb = model.text_model.embeddings.token_embedding(ids)
                self.ctx.copy_(emb.to(self.ctx.dtype)[None])

        def class_text_features(self, model, tokenizer, names: list[str]):
            """One text feature per class name (projected, not normalized)."""
            ids, mask, eos = clip_prompts.prompt_ids(
                tokenizer, names, self.settings["context_tokens"], self.settings["context_init"],
                clip_prompts.max_positions(model))
            deep = {i: self.deep_text[i - 1] for i in range(1, self.settings["prompt_depth"])}
            return clip_prompts.encode_prompts(model, ids, mask, eos, self.ctx, deep)

        # bound methods as hooks: a deep copy of the model copies them onto its own prompts
        def append_vision_prompts(self, module, args, output):
            """After the vision embeddings: the first vision prompt after the patch tokens."""
            tokens = self.vision_prompt(0).to(output.dtype)
            return torch.cat([output, tokens.expand(output.shape[0], -1, -1)], dim=1)

        def replace_vision_prompts(self, i: int, module, args, kwargs):
            """Before vision layer i: its prompt in place of the last M tokens."""
            key = "hidden_states"
            hidden = args[0] if args else kwargs[key]
            tokens = self.vision_prompt(i).to(hidden.dtype).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :-tokens.shape[1]], tokens], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, key: hidden}

    return MaPLePrompts


def inject(model, params: dict, targets: list[str] | None = None,
           from_weights: bool = True) -> list[str]:
    """Attach MaPLe's prompts (as `model.mmkit_maple`) and hook the vision tower; return the
    modules adapted."""
    j = params["prompt_depth"]
    layers = min(model.config.text_config.num_hidden_layers,
                 model.config.vision_config.num_hidden_layers)
    if j > layers:
        raise InputError(f"This MaPLe adapter prompts {j} layers but this CLIP has {layers}; "
                         "load it onto the model it was trained on.")
    ref = model.text_projection.weight
    learner = _learner_class()(model.config.text_config.hidden_size,
                               model.config.vision_config.hidden_size, params, ref.device,
                               ref.dtype)
    setattr(model, MARK, learner)
    vision = model.vision_model
    vision.embeddings.register_forward_hook(learner.append_vision_prompts)
    for i in range(1, j):
        vision.encoder.layers[i].register_forward_pre_hook(
            functools.partial(learner.replace_vision_prompts, i), with_kwargs=True)
    return ["text_model", "vision_model"]


maple_apply = clip_prompts.make_apply(sys.modules[__name__], "maple")
