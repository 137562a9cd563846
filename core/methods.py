"""The list of registered methods: one `register` call per technique, grouped by step.

Adding a method: write its module (config class + apply function), add one line here, and
one row to the test matrix in tests/test_methods.py.
"""

from ..compression.cast import CastConfig, cast_
from .registry import Method, register

register(Method("cast", "dtype", CastConfig, cast_,
                "convert floating-point weights to float32 / float16 / bfloat16"), default=True)
