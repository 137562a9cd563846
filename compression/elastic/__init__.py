"""Elastic super-networks: fine-tuning that trains sub-networks with the full network
(`finetune elastic`), distillation (`finetune distill`), and cutting a sub-network out
(`extract subnet`).

Importing this package registers the three methods; `mmkit.registrations` imports it.
"""

from ... import adapters  # noqa: F401  (their finetune methods first: the CLI lists in order)
from ...core.registry import Method, lazy, register
from . import configs as ec

_FAMILIES_HINT = "Elastic training slices BERT, ViT, CLIP and Llama blocks."
_M = "mmkit.compression.elastic."

register(Method("finetune", "elastic", ec.ElasticConfig, lazy(_M + "training:elastic_finetune"),
                "elastic super-network: full fine-tuning that also trains nested / sampled "
                "sub-networks (with in-place distillation)", needs_data=True,
                models=("teacher",), mergeable=False, hint=_FAMILIES_HINT))
register(Method("finetune", "distill", ec.DistillConfig, lazy(_M + "training:distill_finetune"),
                "full fine-tuning on the labels and a teacher's logits (default teacher: the "
                "run's input model)", needs_data=True, models=("teacher",)))
register(Method("extract", "subnet", ec.ExtractConfig, lazy(_M + "extract:extract_"),
                "cut a sub-network (FFN / head widths, depth) out of an elastic super-network"),
         default=True)
