"""Token merging for image transformers (`mmkit merge-tokens`): ToMe and Token Transforming,
training-free, saved as the plain model plus `mmkit_tokens.json`, which every command applies
on load.

Importing this package registers the two methods and the setting; `mmkit.registrations`
imports it.
"""

from ...core.registry import Method, lazy, register
from ...core.runtime_settings import RuntimeSetting, register_setting
from . import configs as tc

_M = "mmkit.compression.tokens."
_KINDS = ("vision", "clip")
_HINT = ("Token merging works on image transformers (ViT, CLIP's image tower); make a text "
         "model smaller with `mmkit prune` or `mmkit quantize`.")

register(Method("tokens", "tome", tc.ToMeConfig, lazy(_M + "methods:tome"),
                "ToMe: merge the r most similar tokens in each block (bipartite soft matching, "
                "size-weighted means, proportional attention); training-free",
                kinds=_KINDS, hint=_HINT), default=True)
register(Method("tokens", "transform", tc.TransformConfig, lazy(_M + "methods:transform"),
                "Token Transforming: like ToMe, but each merged token is shared among all its "
                "partners by similarity (many-to-many); training-free", kinds=_KINDS,
                hint=_HINT))
register_setting(RuntimeSetting("tokens", "mmkit_tokens.json", lazy(_M + "patch:install")))
