"""Matrices stored in 8-bit floating point with one float32 scale per row: the codec of
circuitlab's 8-bit transcoder files (per-layer folders and cross-layer transcoders alike).

A matrix ``M`` is stored as ``M`` in ``F8_E4M3`` (4 exponent and 3 mantissa bits, at most
448; torch's ``float8_e4m3fn``) and ``M_scale`` (float32), one scale per slice along
``axis`` (kept as a size-1 dimension, so ``M * M_scale`` broadcasts back): each scale is its
slice's largest magnitude / 448, and values are rounded to the nearest 8-bit float, which
keeps every weight to within about 6% of its own size. Files in this layout carry the
safetensors metadata ``FORMAT``.
"""

from __future__ import annotations

import torch

from .errors import CircuitlabError

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = 448.0
FORMAT = {"format": "circuitlab-float8", "version": "1"}


def read(f, name: str) -> torch.Tensor:
    """Tensor ``name`` of an open safetensors file ``f``, decoded (float32) if it is 8-bit."""
    value = f.get_tensor(name)
    if value.dtype != FLOAT8:
        return value
    scale = f"{name}_scale"
    return decode({name: value, scale: f.get_tensor(scale)} if scale in f.keys() else {name: value})[name]


def encode(name: str, value: torch.Tensor, axis: int) -> dict[str, torch.Tensor]:
    """``{name: 8-bit M, name_scale: float32 scales}`` for a matrix ``value``, one scale per
    slice of ``value`` along ``axis`` (the axis reduced by the max)."""
    value = value.detach().float().cpu()
    scale = value.abs().amax(dim=axis, keepdim=True) / FLOAT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return {name: (value / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8).contiguous(),
            f"{name}_scale": scale.contiguous()}


def decode(tensors: dict[str, torch.Tensor],
           dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors a file holds with each 8-bit matrix multiplied back by its scale (scales
    dropped), all in ``dtype``; with None, 8-bit matrices come back in float32 and the
    tensors stored at full precision as they are.

    Raises:
        CircuitlabError: for an 8-bit matrix without its ``_scale`` tensor.
    """
    out = {}
    for name, value in tensors.items():
        if name.endswith("_scale") and name[:-6] in tensors:
            continue
        if value.dtype == FLOAT8:
            if f"{name}_scale" not in tensors:
                raise CircuitlabError(f"The 8-bit matrix {name} has no {name}_scale tensor; "
                                      "the file is not in circuitlab's float8 layout. Re-create "
                                      "it with `circuitlab quantize`.")
            value = value.float() * tensors[f"{name}_scale"].float()
        out[name] = value if dtype is None else value.to(dtype)
    return out
