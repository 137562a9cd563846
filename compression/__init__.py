"""Compression methods: quantize, prune, merge, elastic sub-networks, dtype casts.

Importing this package registers `cast`; its subpackages register their own methods and
formats (`mmkit.registrations` imports them all).
"""

from ..core.registry import Method, register
from .cast import CastConfig, cast_

register(Method("cast", "dtype", CastConfig, cast_,
                "convert floating-point weights to float32 / float16 / bfloat16"), default=True)
