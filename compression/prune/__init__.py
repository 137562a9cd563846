"""Unstructured, N:M and structured pruning methods.

Importing this package registers the prune methods and the mmkit-pruned format (a model whose
per-layer sizes its config cannot state).
"""

from ...core.formats import Format, register_format
from ...core.registry import Method, lazy, register
from . import configs as pr

_M = "mmkit.compression.prune.methods:"


def _prune(name, config, summary):
    return register(Method("prune", name, config, lazy(_M + name + "_"), summary),
                    default=name == "magnitude")


_prune("magnitude", pr.MagnitudeConfig, "zero the smallest weights, per layer or globally")
_prune("wanda", pr.WandaConfig, "zero weights with the smallest |W| x input norm (calibration "
       "data)")
_prune("nm", pr.NMConfig, "N:M semi-structured sparsity (2:4, 4:8) with magnitude or Wanda "
       "scores")
_prune("heads", pr.StructuredConfig, "remove attention heads (BERT, ViT, CLIP, Llama): smaller "
       "tensors")
_prune("neurons", pr.StructuredConfig, "remove FFN intermediate neurons (BERT, ViT, CLIP, "
       "Llama)")
_prune("layers", pr.StructuredConfig, "remove whole transformer layers (BERT, ViT, CLIP, Llama)")


def _load_pruned(cls, source, config, opts):
    from .storage import load_pruned

    model, layout = load_pruned(cls, source.path, config)
    return model, {"pruned": {"attention": layout}}


def _save_pruned(loaded, folder):
    from .storage import save_pruned

    save_pruned(loaded, folder)


register_format(Format(
    "mmkit-pruned", detect=lambda folder: (folder / "mmkit_prune.json").is_file(),
    load=_load_pruned, save=_save_pruned,
    summary="structurally pruned layers of per-layer sizes (mmkit_prune.json)"))
