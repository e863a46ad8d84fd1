"""Training checkpoints: tensors (parameters and Adam moments) with the run's settings and
counters, written atomically so a crash or a full disk keeps the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from circuitlab.errors import CircuitlabError
from circuitlab.files import atomic_file

CHECKPOINT_FILE = "state.safetensors"


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], settings,
                    counters: dict) -> None:
    """Write ``folder/state.safetensors`` (``tensors``; the ``settings`` dataclass and
    ``counters`` in its metadata) atomically, and ``folder/settings.json`` for people."""
    meta = {"settings": json.dumps(dataclasses.asdict(settings)), "counters": json.dumps(counters)}
    with atomic_file(folder / CHECKPOINT_FILE, "the previous checkpoint is intact.") as tmp:
        save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, tmp, metadata=meta)
    with atomic_file(folder / "settings.json", "the checkpoint itself was written.") as tmp:
        tmp.write_text(json.dumps({**dataclasses.asdict(settings), **counters}, indent=1),
                       encoding="utf-8")


def load_checkpoint(folder: Path, settings) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, counters)`` from ``folder``; raises if the checkpoint's settings differ
    from the ``settings`` dataclass."""
    with safe_open(folder / CHECKPOINT_FILE, framework="pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    saved = {n: tuple(v) if isinstance(v, list) else v
             for n, v in json.loads(meta["settings"]).items()}
    diff = [f"{n}: checkpoint {saved.get(n)!r}, now {v!r}"
            for n, v in dataclasses.asdict(settings).items() if saved.get(n) != v]
    if diff:
        raise CircuitlabError(
            f"The checkpoint in {folder} was made with other settings ({'; '.join(diff)}). "
            "Pass the same settings to resume, or start afresh with another out_dir or "
            "resume=False."
        )
    return tensors, json.loads(meta["counters"])


def adam_tensors(opt: torch.optim.Adam, params: dict) -> dict[str, torch.Tensor]:
    """The named ``params`` and their Adam moments (``adam.<name>.<key>``), for a checkpoint."""
    out = {n: p.detach() for n, p in params.items()}
    for n, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            out[f"adam.{n}.{key}"] = value
    return out


def restore_adam(opt: torch.optim.Adam, params: dict, tensors: dict, device: str) -> None:
    """Put the Adam moments of ``adam_tensors`` output back into ``opt``."""
    for n, p in params.items():
        moments = {key.rsplit(".", 1)[1]: v for key, v in tensors.items()
                   if key.startswith(f"adam.{n}.")}
        if moments:
            opt.state[p] = {key: v.to(device) if key != "step" else v
                            for key, v in moments.items()}
