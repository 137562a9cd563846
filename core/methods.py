"""The list of registered methods: one `register` call per technique, grouped by step.

Adding a method: write its module (config class + apply function), add one line here, and
one row to its family's test matrix (tests/test_finetune.py for finetune methods).
"""

from ..adapters import own
from ..adapters import peft_methods as pm
from ..adapters.adaptformer import AdaptFormerConfig
from ..adapters.svfit import SVFitConfig
from ..adapters.vpt import VPTConfig
from ..adapters.full import FullConfig, full_finetune
from ..compression.cast import CastConfig, cast_
from ..compression.prune import methods as pr
from ..compression.quantize import methods as qm
from ..compression.quantize.ptq import PTQConfig, ptq_
from .registry import Method, register

ALL = ("text-encoder", "vision", "clip", "causal-lm")
TEXT = ("text-encoder", "causal-lm")

# finetune: the default is LoRA
register(Method("finetune", "lora", pm.LoraConfig, pm.make_apply("lora"),
                "LoRA low-rank updates (rsLoRA, DoRA and QLoRA as options)", ALL, True,
                load_options=pm.qlora_base), default=True)
register(Method("finetune", "dora", pm.LoraConfig, pm.make_apply("dora"),
                "DoRA: LoRA on the direction, a trained magnitude per column", ALL, True,
                load_options=pm.qlora_base))
register(Method("finetune", "adalora", pm.AdaLoraConfig, pm.make_apply("adalora"),
                "AdaLoRA: LoRA with an adaptive rank budget", ALL, True))
# VeRA's projections are buffers shared by every layer; checkpointing them through the CLIP
# classifier wrapper trips safetensors' shared-tensor check, so CLIP is left out for now.
register(Method("finetune", "vera", pm.VeraConfig, pm.make_apply("vera"),
                "VeRA: shared random projections, trained scaling vectors",
                ("text-encoder", "vision", "causal-lm"), True))
register(Method("finetune", "ia3", pm.IA3Config, pm.make_apply("ia3"),
                "IA3: learned rescaling of keys, values and FFN activations", ALL, True))
register(Method("finetune", "prompt", pm.PromptConfig, pm.make_apply("prompt"),
                "prompt tuning: trained virtual input tokens (text models)", TEXT, True,
                hint="For ViT use --vpt (visual prompt tuning)."))
register(Method("finetune", "prefix", pm.PrefixConfig, pm.make_apply("prefix"),
                "prefix tuning: trained key/value prefixes in every layer (text models)", TEXT, True,
                hint="For ViT use --vpt (visual prompt tuning)."))
register(Method("finetune", "adaptformer", AdaptFormerConfig, own.make_apply("adaptformer"),
                "AdaptFormer: a scaled bottleneck branch beside every MLP", ALL, True))
register(Method("finetune", "vpt", VPTConfig, own.make_apply("vpt"),
                "visual prompt tuning: trained tokens in a ViT's patch sequence (shallow / deep)",
                ("vision", "clip"), True, hint="For text models use --prompt or --prefix."))
register(Method("finetune", "svfit", SVFitConfig, own.make_apply("svfit"),
                "SVFit: train the top-r singular values of each weight (mergeable)", ALL, True))
register(Method("finetune", "full", FullConfig, full_finetune,
                "full fine-tuning of every weight (the reference)", ALL, True))

# quantize: `mmkit quantize --bits N` with no --method picks one for the device
register(Method("quantize", "rtn", qm.RTNConfig, qm.rtn_,
                "round-to-nearest weight-only, 2-8 bits, per channel or grouped"), default=True)
register(Method("quantize", "gptq", qm.GPTQConfig, qm.gptq_,
                "GPTQ weight-only, 2-8 bits, Hessian-aware rounding from calibration data"))
register(Method("quantize", "dynamic-int8", qm.DynamicInt8Config, qm.dynamic_int8_,
                "int8 weights and dynamic int8 activations (integer matmuls on CPU)"))
register(Method("quantize", "ptq", PTQConfig, ptq_,
                "simulated W8A8 / W4A8 activation PTQ (RepQuant-style LayerNorm folding, log2 "
                "softmax)", ("text-encoder", "vision"), hint="Use rtn, gptq or dynamic-int8."))
register(Method("quantize", "nf4", qm.NF4Config, qm.bnb_apply("nf4"),
                "bitsandbytes 4-bit NormalFloat (double quantization)"))
register(Method("quantize", "fp4", qm.FP4Config, qm.bnb_apply("fp4"), "bitsandbytes 4-bit float"))
register(Method("quantize", "int8", qm.Int8Config, qm.bnb_apply("int8"),
                "bitsandbytes LLM.int8 8-bit weights"))

# prune
register(Method("prune", "magnitude", pr.MagnitudeConfig, pr.magnitude_,
                "zero the smallest weights, per layer or globally"), default=True)
register(Method("prune", "wanda", pr.WandaConfig, pr.wanda_,
                "zero weights with the smallest |W| x input norm (calibration data)"))
register(Method("prune", "nm", pr.NMConfig, pr.nm_,
                "N:M semi-structured sparsity (2:4, 4:8) with magnitude or Wanda scores"))
register(Method("prune", "heads", pr.StructuredConfig, pr.heads_,
                "remove attention heads (BERT, ViT, CLIP, Llama): smaller tensors"))
register(Method("prune", "neurons", pr.StructuredConfig, pr.neurons_,
                "remove FFN intermediate neurons (BERT, ViT, CLIP, Llama)"))
register(Method("prune", "layers", pr.StructuredConfig, pr.layers_,
                "remove whole transformer layers (BERT, ViT, CLIP, Llama)"))

# cast
register(Method("cast", "dtype", CastConfig, cast_,
                "convert floating-point weights to float32 / float16 / bfloat16"), default=True)
