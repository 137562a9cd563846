"""bitsandbytes 4-bit layers on CPU take one of two kernels, chosen by the CPU.

On CPUs with AVX512-BF16, bitsandbytes (0.48 and later) repacks a Linear4bit's weight the first
time the layer runs in inference mode and then calls a fused bf16 kernel; elsewhere it
dequantizes and uses a float matmul. The repacking needs out_features divisible by 32 and
in_features divisible by the quantization block (64): any other layer fails with "shape
'[32, 0]' is invalid", and a repacked layer has no backward pass, so it must not happen while
training (evaluation between epochs would repack it). `fit_cpu_kernels_` leaves the fused
kernel to the layers it can serve and only outside training, so every model runs on every CPU.
In plain Python, call it after `from_pretrained` on such a CPU.
"""

from __future__ import annotations

PACK_ROWS = 32  # bitsandbytes' block_n for the CPU repacking


def packable(module) -> bool:
    """True when bitsandbytes' AVX512-BF16 repacking can take this Linear4bit."""
    state = module.weight.quant_state
    rows, cols = state.shape
    return rows % PACK_ROWS == 0 and cols % state.blocksize == 0


def fit_cpu_kernels_(model, training: bool = False) -> list[str]:
    """Turn bitsandbytes' fused AVX512-BF16 path off for the Linear4bit layers it cannot
    serve (all of them when `training`); returns their names. A no-op on other CPUs and on
    models without 4-bit layers."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    generic = []
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or not module.support_avx512bf16_for_cpu:
            continue
        if training or getattr(module.weight, "quant_state", None) is None or \
                not packable(module):
            module.support_avx512bf16_for_cpu = False
            generic.append(name)
    return generic
