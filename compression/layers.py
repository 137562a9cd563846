"""Which Linear layers a compression step touches: every Linear (and GPT-2 Conv1D) but the
task heads and the user's `--skip` patterns. Shared by quantize and prune."""

from __future__ import annotations

import fnmatch

from ..core.errors import InputError
from ..core.layers import is_linear, is_task_head


def matches(name: str, pattern: str) -> bool:
    """A glob on the full layer name, or a name suffix (`mlp.down_proj`)."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.endswith("." + pattern) \
        or fnmatch.fnmatchcase(name, "*." + pattern)


def target_linears(model, skip) -> list[str]:
    """Names of the Linear layers to compress; a `skip` pattern matching nothing is an error."""
    names = [n for n, m in model.named_modules() if is_linear(m)]
    unused = [p for p in skip if not any(matches(n, p) for n in names)]
    if unused:
        raise InputError(f"--skip {unused[0]} matches no Linear layer. Layer names end in: "
                         f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}.")
    kept = [n for n in names if not is_task_head(n) and not any(matches(n, p) for p in skip)]
    if names and not kept and skip:
        raise InputError(f"--skip {' '.join(skip)} leaves out every Linear layer, so there is "
                         "nothing left to compress. Narrow the patterns (e.g. --skip "
                         "'*.down_proj').")
    return kept
