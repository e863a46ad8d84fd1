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


#: Weight dtypes ``load`` accepts, by the names a user may type.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64}


def model_dtype(device) -> torch.dtype:
    """The default dtype of loaded weights: bfloat16 on CUDA (half the memory of float32,
    native on Ampere and later), float32 on a CPU (where bf16 is exact enough but often
    emulated, see ``fast_bf16``)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def check_dtype(dtype, device="cpu", name: str = "dtype") -> torch.dtype:
    """``dtype`` (a torch dtype, one of ``DTYPES``' names, or ``None``/``"auto"`` for
    ``model_dtype(device)``) as a torch dtype.

    Raises:
        CircuitlabError: naming the argument, the value and the dtypes to use.
    """
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return model_dtype(device)
    found = DTYPES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if not any(found is d for d in DTYPES.values()):
        raise CircuitlabError(
            f"{name}={dtype!r} is not a weight dtype; use torch.float32 (exact), torch.bfloat16 "
            "(half the memory; the default on CUDA) or torch.float16, or None for the default.")
    return found
