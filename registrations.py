"""The one import point of every registration: importing this module registers every method
and on-disk format mmkit has. `core.plugins` imports it on the first registry or format
lookup; a new package of methods adds one line here."""

from .core import loading  # noqa: F401  (the plain Hugging Face format, the fallback)
from . import adapters  # noqa: F401  (finetune methods; peft and mmkit adapter formats)
from . import compression  # noqa: F401  (cast)
from .compression import quantize  # noqa: F401  (quantize methods; quantized and ptq formats)
from .compression import prune  # noqa: F401  (prune methods; pruned format)
from .compression import merge  # noqa: F401  (merge methods)
from .compression import elastic  # noqa: F401  (elastic training, distill, extract)
from .compression import tokens  # noqa: F401  (token merging; its runtime setting)
