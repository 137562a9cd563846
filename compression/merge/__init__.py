"""Model merging: weighted means (model soups), task arithmetic, TIES, DARE, SLERP, the
data-driven greedy soup and aTLAS, and folding an adapter into its base.

Importing this package registers the merge methods. A merge step names the models it merges
(`models`); the recipe's model is the base. The tensor math is in `tensors`, the reading of
the inputs one tensor at a time in `inputs`, the step itself in `apply`, the data-driven
choices (greedy soup, aTLAS, lambda auto) in `tuned`.
"""

from ...core.registry import Method, lazy, register
from . import configs as mc

_M = "mmkit.compression.merge.apply:"


def _streams(cfg) -> dict:
    """A data-free merge writes its result file to file: the base is loaded lazily (when the
    merge is the recipe's only step and nothing evaluates the result)."""
    full = getattr(cfg, "as_adapter", None) or getattr(cfg, "lam", None) == "auto"
    return {} if full else {"lazy": True}


def _merge(name, function, summary, config=None, models=("models",)):
    return register(Method("merge", name, config or mc.CONFIGS[name], lazy(_M + function),
                           summary, models=models, needs_data=name in mc.NEEDS_DATA,
                           load_options=None if name in mc.NEEDS_DATA else _streams),
                    default=name == "linear")


_merge("linear", "linear_", "weighted mean of the models' weights, weights normalised to sum 1 "
       "(uniform model soup)")
_merge("task-arithmetic", "task_arithmetic_", "base + lambda x sum of w_i x (model_i - base)")
_merge("ties", "ties_", "trim each task vector to its largest entries, elect a sign per entry, "
       "average the agreeing ones (TIES)")
_merge("dare-linear", "dare_linear_", "drop task-vector entries at random and rescale (DARE), "
       "then task arithmetic")
_merge("dare-ties", "dare_ties_", "DARE's random drop, then TIES's sign election and "
       "disjoint mean")
_merge("slerp", "slerp_", "spherical interpolation between two models, per tensor")
_merge("greedy-soup", "greedy_soup_", "add models to a uniform soup in order of validation "
       "score, each only if the soup's validation score does not drop")
_merge("atlas", "atlas_", "learn one coefficient per task vector and parameter block on a few "
       "labelled examples per task (aTLAS)")
_merge("adapter", "adapter_", "fold one adapter (LoRA, SVFit, ...) into its base; the "
       "default when MODELS is one adapter", config=mc.AdapterConfig, models=())
