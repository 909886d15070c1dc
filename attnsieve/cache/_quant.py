"""Asymmetric integer quantisation in groups, with codes really packed into bytes.

`quantize(x, bits, axis)` maps each group (the slices of `x` along `axis`) to codes in
[0, 2^bits - 1] with one fp16 scale and minimum per slice; `pack` stores 8 / bits codes per byte,
so a 2-bit tensor really takes a sixteenth of fp32's bytes. Shared by the quantising policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


@dataclass
class Quantized:
    codes: torch.Tensor  # uint8, packed along the last axis
    scale: torch.Tensor  # fp16, x's shape with `axis` reduced to 1
    zero: torch.Tensor  # fp16 minimum, same shape as scale
    bits: int
    shape: tuple[int, ...]  # shape of the original tensor
    dtype: torch.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self) -> torch.Tensor:
        codes = unpack(self.codes, self.bits, self.shape[-1])
        return (codes.to(torch.float32) * self.scale.float() + self.zero.float()).to(self.dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (values < 2^bits) -> [..., ceil(n * bits / 8)] bytes."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = torch.nn.functional.pad(codes, (0, pad)).view(*codes.shape[:-1], -1, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


def quantize(x: torch.Tensor, bits: int, axis: int) -> Quantized:
    """Min/max quantisation of every slice of x along `axis` (that axis is the group)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    xf = x.float()
    mn = xf.amin(dim=axis, keepdim=True)
    mx = xf.amax(dim=axis, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((mx - mn) / levels).clamp_min(1e-8).half()
    zero = mn.half()
    codes = torch.round((xf - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return Quantized(pack(codes, bits), scale, zero, bits, tuple(x.shape), x.dtype)
