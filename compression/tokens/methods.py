"""The `tokens` step's methods: ToMe and Token Transforming, training-free."""

from __future__ import annotations

from ...core.errors import InputError
from .patch import install, setting


def merge_tokens(method: str):
    """The apply function of one merging method."""
    def apply(loaded, cfg, ctx):
        if "tokens" in (loaded.extra.get("settings") or {}):
            raise InputError(f"'{loaded.source.ref}' merges tokens already; merge-tokens starts "
                             "from the model without it (its parent), so the r of each block "
                             "is stated once.")
        data = setting(loaded, cfg, method)
        install(loaded, data)
        loaded.extra.setdefault("settings", {})["tokens"] = data
        left, per_block = data["tokens"], []
        for n in data["r"]:
            left -= n
            per_block.append(left)
        ctx.report.update({"tokens_in": data["tokens"], "tokens_out": left,
                           "tokens_after_each_block": per_block,
                           "proportional_attention": data["proportional_attention"],
                           "token_fraction_mean": round(
                               sum([data["tokens"], *per_block[:-1]]) / len(per_block)
                               / data["tokens"], 4)})
        return loaded

    return apply


tome = merge_tokens("tome")
transform = merge_tokens("transform")
