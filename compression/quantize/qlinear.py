"""QuantLinear: a Linear layer whose weight is stored as packed integer codes + scales.

Stored (and saved) tensors: `qweight` (int32 words, `bits` bits per code, row-major over the
input dimension), `scales` and `zeros` (fp16, out x n_groups), `g_idx` (int32, the group of
each input column; act-order GPTQ permutes it) and `bias`. Two kernels:
- "dequant" (weight-only): on CPU, 8-bit per-channel and 4-bit grids that fit run torch's fused
  int8 / int4 kernels, and where oneDNN has bf16 any grid may run a packed bf16 copy of the
  weight (kernels.py: bf16 activations, the fastest measured per shape); everything else
  rebuilds the float weight at every forward and uses a float matmul.
- "int8-dynamic" (8-bit symmetric per-channel only): torch's dynamic int8 Linear (fbgemm /
  qnnpack): activations are quantized to int8 per batch and the matmul runs in integers.
"""

from __future__ import annotations

import torch

from . import grid, kernels

KERNELS = ("dequant", "int8-dynamic")


class QuantLinear(torch.nn.Module):
    """A quantized replacement for nn.Linear (or GPT-2's Conv1D, stored as out x in)."""

    def __init__(self, in_features: int, out_features: int, bits: int, n_groups: int,
                 bias: bool, kernel: str = "dequant", dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.kernel = kernel
        self.conv1d = False  # it replaced a GPT-2 Conv1D (weight in x out): dequantizing says so
        self.symmetric = None  # the grid's kind when known (a merge quantizes on it again)
        words = -(-in_features * bits // 32)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32))
        # fp16 scales and zero points (zero points are small integers, exact in fp16)
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        object.__setattr__(self, "_int8", None)  # the int8 kernel, built on first use
        object.__setattr__(self, "_plan", None)  # the fused kernel's tensors, built on first use
        object.__setattr__(self, "_bf16", None)  # the packed bf16 weight (False: over budget)
        object.__setattr__(self, "_group_size", 0)  # contiguous group size; 0: not known yet

    @classmethod
    def from_codes(cls, codes, scales, zeros, g_idx, bits: int, bias=None, kernel="dequant"):
        """Build from integer codes (out x in) and their grid."""
        out_f, in_f = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(in_f, out_f, bits, scales.shape[1], bias is not None, kernel, dtype)
        layer.qweight.copy_(grid.pack(codes, bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        layer.g_idx.copy_(g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def _unpacked(self):
        """The codes as unpacking gives them: uint8 read off the bytes where the width allows,
        int64 from the generic unpacking otherwise."""
        fast = kernels.unpack_bytes(self.qweight, self.bits, self.in_features)
        return grid.unpack(self.qweight, self.bits, self.in_features) if fast is None else fast

    def codes(self):
        """The integer codes, (out, in), int64."""
        return self._unpacked().long()

    def weight_float(self):
        """The dequantized weight, (out, in), fp32."""
        if self._group_size == 0:
            object.__setattr__(self, "_group_size", kernels.contiguous_group_size(self.g_idx))
        return kernels.dequantize(self._unpacked(), self.scales, self.zeros, self.g_idx,
                                  self._group_size)

    def fused_plan(self):
        """The fused CPU kernel's plan, or None when this layer's grid does not fit one."""
        if self._plan is None:
            plan = kernels.fused_plan(self) if self.qweight.device.type == "cpu" else None
            object.__setattr__(self, "_plan", plan or False)
        return self._plan or None

    def packed_bf16(self, budgeted: bool = False):
        """The weight packed for kernels.run_bf16, built on first use; None when `budgeted`
        and the process's bf16 copies have used up their budget (kernels.bf16_budget): then
        this layer keeps its other kernels until its kernels are rebuilt (not asked again at
        every call)."""
        if self._bf16 is None or (self._bf16 is False and not budgeted):
            object.__setattr__(self, "_bf16", kernels.bf16_plan(self, budgeted) or False)
        return self._bf16 or None

    def _int8_kernel(self):
        if self._int8 is None:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

            import warnings

            # symmetric 8-bit codes are offset by 128: int8 value = code - 128
            with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated; the
                warnings.simplefilter("ignore")  # dynamic int8 kernel has no successor on CPU yet
                q = torch._make_per_channel_quantized_tensor(
                    (self.codes() - 128).to(torch.int8), self.scales[:, 0].double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
            layer = DynamicLinear(self.in_features, self.out_features, dtype=torch.qint8)
            layer.set_weight_bias(q, None if self.bias is None else self.bias.float())
            object.__setattr__(self, "_int8", layer)
        return self._int8

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_kernels()  # new codes: rebuild the kernels
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.forget_kernels()  # .to(device) / .half(): the cached kernels follow the buffers
        return super()._apply(fn, *args, **kwargs)

    def forget_kernels(self):
        """Drop the kernels built from the buffers (after the buffers change)."""
        for name, empty in (("_int8", None), ("_plan", None), ("_bf16", None),
                            ("_group_size", 0)):
            object.__setattr__(self, name, empty)

    def __getstate__(self):
        # copies (deepcopy, pickle) rebuild the kernels: oneDNN's packed tensors cannot be copied
        state = super().__getstate__().copy()
        state.update(_int8=None, _plan=None, _bf16=None, _group_size=0)
        return state

    def forward(self, x):
        if x.device.type == "cpu":
            if self.kernel == "int8-dynamic":
                return self._int8_kernel()(x.float()).to(x.dtype)
            # no autograd through the fast kernels: training on top (LoRA) dequantizes
            if not (x.requires_grad and torch.is_grad_enabled()):
                kernel = kernels.fastest_kernel(self, x.numel() // max(x.shape[-1], 1))
                if kernel == "fused":
                    return kernels.run_fused(self.fused_plan(), x, self.bias)
                if kernel == "bf16":
                    return kernels.run_bf16(self.packed_bf16(), x, self.bias)
        return torch.nn.functional.linear(x, self.weight_float().to(x.dtype),
                                          None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, groups={self.scales.shape[1]}, kernel={self.kernel}")


def set_module(model, name: str, new) -> None:
    """Replace the submodule called `name`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
