"""PEFT methods: LoRA family, IA3, prompt tuning, bottleneck adapters, SVFit, CLIP prompt
learning (CoOp, MaPLe).

Importing this package registers its finetune methods and the two adapter formats (peft's
and mmkit's own); `mmkit.registrations` imports it.
"""

from ..core.registry import Method, register
from . import formats  # noqa: F401  (registers the adapter formats)
from . import own
from . import peft_methods as pm
from .adaptformer import AdaptFormerConfig
from .clip_prompts import CoOpConfig, coop_apply
from .full import FullConfig, full_finetune
from .maple import MaPLeConfig, maple_apply
from .svfit import SVFitConfig
from .vpt import VPTConfig

ALL = ("text-encoder", "vision", "clip", "causal-lm")
TEXT = ("text-encoder", "causal-lm")


def _finetune(name, config, apply, summary, kinds=ALL, **more):
    return register(Method("finetune", name, config, apply, summary, kinds, True, **more),
                    default=name == "lora")


_finetune("lora", pm.LoraConfig, pm.make_apply("lora"),
          "LoRA low-rank updates (rsLoRA, DoRA and QLoRA as options)", load_options=pm.qlora_base,
          mergeable=True)
_finetune("dora", pm.LoraConfig, pm.make_apply("dora"),
          "DoRA: LoRA on the direction, a trained magnitude per column",
          load_options=pm.qlora_base, mergeable=True)
_finetune("adalora", pm.AdaLoraConfig, pm.make_apply("adalora"),
          "AdaLoRA: LoRA with an adaptive rank budget", mergeable=True)
# VeRA's projections are buffers shared by every layer; checkpointing them through the CLIP
# classifier wrapper trips safetensors' shared-tensor check, so CLIP is left out for now.
_finetune("vera", pm.VeraConfig, pm.make_apply("vera"),
          "VeRA: shared random projections, trained scaling vectors",
          ("text-encoder", "vision", "causal-lm"), mergeable=True)
_finetune("ia3", pm.IA3Config, pm.make_apply("ia3"),
          "IA3: learned rescaling of keys, values and FFN activations", mergeable=True)
_finetune("prompt", pm.PromptConfig, pm.make_apply("prompt"),
          "prompt tuning: trained virtual input tokens (text models)", TEXT,
          hint="For ViT use --vpt (visual prompt tuning).")
_finetune("prefix", pm.PrefixConfig, pm.make_apply("prefix"),
          "prefix tuning: trained key/value prefixes in every layer (text models)", TEXT,
          hint="For ViT use --vpt (visual prompt tuning).")
_finetune("adaptformer", AdaptFormerConfig, own.make_apply("adaptformer"),
          "AdaptFormer: a scaled bottleneck branch beside every MLP")
_finetune("vpt", VPTConfig, own.make_apply("vpt"),
          "visual prompt tuning: trained tokens in a ViT's patch sequence (shallow / deep)",
          ("vision", "clip"), hint="For text models use --prompt or --prefix.")
_finetune("svfit", SVFitConfig, own.make_apply("svfit"),
          "SVFit: train the top-r singular values of each weight (mergeable)", mergeable=True)
_finetune("coop", CoOpConfig, coop_apply,
          "CoOp: learned context vectors before each class name in CLIP's text prompts",
          ("clip",), hint="CoOp learns CLIP's text prompts; for ViT use --vpt, for text models "
                          "--prompt.")
_finetune("maple", MaPLeConfig, maple_apply,
          "MaPLe: coupled text and vision prompts in the first J layers of CLIP",
          ("clip",), hint="MaPLe learns CLIP's prompts; for ViT use --vpt, for text models "
                          "--prompt.")
_finetune("full", FullConfig, full_finetune, "full fine-tuning of every weight (the reference)",
          mergeable=True)
