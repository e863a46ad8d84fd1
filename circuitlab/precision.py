"""Where to compute: checking a device name, and which precision is fast on it."""

from __future__ import annotations

import torch

from .errors import CircuitlabError


def fast_bf16(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix products are fast on ``device``: CUDA with bf16 support, or
    a CPU with AVX-512 BF16 or AMX. Elsewhere bf16 is emulated and slower than float32."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported",
                                                     "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def default_dtype(device) -> torch.dtype:
    """bfloat16 on CPUs with native bf16 matrix units (``fast_bf16``), else float32."""
    return torch.bfloat16 if str(device).startswith("cpu") and fast_bf16("cpu") else torch.float32


def check_device(device) -> str:
    """``device`` as a torch device string, checked to exist on this machine.

    Raises:
        CircuitlabError: for a name torch does not know, or a CUDA/MPS device that this
            machine lacks.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CircuitlabError(
            f"Unknown device {device!r} ({err}); use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not (torch.cuda.is_available()
                                   and (dev.index or 0) < torch.cuda.device_count()):
        raise CircuitlabError(f"Device {device!r} is not available here (this machine has "
                              f"{torch.cuda.device_count()} CUDA devices); use 'cpu'.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CircuitlabError(f"Device {device!r} is not available here; use 'cpu'.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CircuitlabError(f"Device {device!r} is not supported; use 'cpu' or 'cuda'.")
    return str(dev)
