"""Transcoder weights stored in 8 bits: half the bytes of bfloat16, at almost no cost.

A folder of SAE-Lens transcoders (``layer_XX/cfg.json`` and ``sae_weights.safetensors``) has
an 8-bit twin with the same ``cfg.json`` files and, in place of each weights file,
``sae_weights_float8.safetensors``:

* every matrix (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``W_skip [d_out,
  d_in]``) is stored in ``float8``'s layout: 8-bit floats and float32 scales, one scale per
  feature for the encoder (shape ``[1, d_sae]``) and one per row for the others
  (``[rows, 1]``);
* vectors (``b_enc``, ``b_dec``, ``threshold``) are stored as float32, unchanged;
* the file's metadata holds ``float8.FORMAT``.

A cross-layer transcoder's folder (``circuitlab.clt``) has an 8-bit twin in its own layout:
the same file names, each matrix 8-bit with scales per feature (``W_enc_<s>``), per feature
and target layer (``W_dec_<s>``) and per row (``W_skip_<s>``).

Measured on the bundle, evenly spaced int8 steps sized per feature changed its matrices
less (in norm), yet cost about 0.1 nat of spliced-in loss, where float8 costs about 0.01
(``data/README.md``).

Any safetensors reader with 8-bit floats (torch's, for one) opens these files.
``circuitlab.load`` reads every kind of folder, and ``circuitlab quantize SRC --out DST``
(``quantize_folder``) writes the 8-bit twin of a folder, with a sha256 manifest. A layer
folder holding both weights files is refused (which one is meant cannot be known), and so
are weights with NaN or infinite values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_disk
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.util import str_to_dtype
from safetensors import SafetensorError
from safetensors.torch import save_file

from . import clt as clt_format
from . import float8
from .clt import check_all_finite, read_tensors, unreadable
from .errors import CircuitlabError
from .files import atomic_dir, sha256, verify_manifest

#: The weights file of an 8-bit layer folder (SAE-Lens' own is ``sae_weights.safetensors``).
FLOAT8_WEIGHTS = "sae_weights_float8.safetensors"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
#: The SAE-Lens architectures circuitlab reads from a layer folder's ``cfg.json``.
TRANSCODER_ARCHITECTURES = tuple(sorted(a for a in SAE_CLASS_REGISTRY if "transcoder" in a))


def quantize_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SAE-Lens state dict in this module's 8-bit layout (float8 matrices with scales)."""
    out = {}
    for name, value in state.items():
        if value.ndim != 2:
            out[name] = value.detach().float().cpu().contiguous()
            continue
        # the scale runs along the feature axis
        out.update(float8.encode(name, value, axis=0 if name == "W_enc" else 1))
    return out


def is_float8(folder: Path) -> bool:
    """Whether a layer folder holds 8-bit weights (``FLOAT8_WEIGHTS``)."""
    return weights_file(folder).name == FLOAT8_WEIGHTS


def weights_file(folder: Path) -> Path:
    """The weights file of a layer folder: ``FLOAT8_WEIGHTS`` or ``SAE_LENS_WEIGHTS``.

    Raises:
        CircuitlabError: when the folder holds both (an 8-bit twin beside full-precision
            weights, perhaps of another version) or neither.
    """
    folder = Path(folder)
    found = [folder / name for name in (FLOAT8_WEIGHTS, SAE_LENS_WEIGHTS) if (folder / name).exists()]
    if len(found) == 2:
        raise CircuitlabError(
            f"{folder} holds both {FLOAT8_WEIGHTS} and {SAE_LENS_WEIGHTS}: 8-bit and "
            "full-precision weights, perhaps of different versions, and which one is meant "
            "cannot be known. Delete the one you do not mean to use.")
    if not found:
        raise CircuitlabError(f"{folder} holds neither {SAE_LENS_WEIGHTS} nor {FLOAT8_WEIGHTS}; "
                              "restore the weights file of this layer.")
    return found[0]


def float8_disk_loader(path, device: str = "cpu", cfg_overrides: dict | None = None):
    """An SAE-Lens disk loader (the ``converter`` of ``SAE.load_from_disk``) for an 8-bit
    layer folder: its ``cfg.json`` and dequantized weights, in the cfg's dtype."""
    cfg = get_sae_lens_config_from_disk(path, device, cfg_overrides)
    tensors = read_tensors(Path(path) / FLOAT8_WEIGHTS, device)
    return cfg, float8.decode(tensors, str_to_dtype(cfg.get("dtype", "float32")))


def load_sae(folder: Path, device: str = "cpu") -> SAE:
    """The SAE-Lens transcoder of one layer folder, 8-bit or SAE-Lens' own.

    Raises:
        CircuitlabError: for a ``cfg.json`` that ``read_cfg`` refuses, a folder with both
            weights files or neither, a weights file that is not safetensors, is cut short or
            does not fit ``cfg.json``, or non-finite weights (naming the folder).
    """
    cfg = read_cfg(folder)
    file = weights_file(folder)
    converter = {"converter": float8_disk_loader} if file.name == FLOAT8_WEIGHTS else {}
    try:
        sae = SAE.load_from_disk(folder, device=device, **converter)
    except SafetensorError as err:
        raise unreadable(file, err) from err
    except RuntimeError as err:
        raise _misfit(folder, file, cfg, err) from err
    check_all_finite(sae.state_dict(), folder)
    return sae


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of one layer folder, 8-bit or SAE-Lens' own (CPU), checked
    finite."""
    return check_all_finite(float8.decode(read_tensors(weights_file(folder)), torch.float32),
                            folder)


def _layer_folders(src: Path) -> list[Path]:
    folders = layer_folders(src)
    missing = [f.name for f in folders if not (f / SAE_LENS_WEIGHTS).exists()]
    if not folders or missing:
        raise CircuitlabError(
            f"{src} holds no SAE-Lens transcoder folders to quantize"
            + (f" ({', '.join(missing)} lack {SAE_LENS_WEIGHTS})" if missing else "")
            + ": expected layer folders with cfg.json and sae_weights.safetensors, as "
            "`circuitlab train` writes them.")
    for folder in folders:
        weights_file(folder)
        read_cfg(folder)
    return folders


def read_cfg(folder: Path) -> dict:
    """The ``cfg.json`` of an SAE-Lens layer folder, checked before SAE-Lens reads it.

    Raises:
        CircuitlabError: naming the file, for one that is not a JSON object, describes no
            transcoder (``architecture`` not in ``TRANSCODER_ARCHITECTURES``) or lacks a
            positive whole ``d_in``, ``d_sae`` or ``d_out``.
    """
    file = Path(folder) / "cfg.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CircuitlabError(f"{file} is not a readable JSON file ({err}); restore it, or save "
                              "the layer again with SAE.save_model.") from err
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if arch not in TRANSCODER_ARCHITECTURES:
        raise CircuitlabError(
            f"{file} describes no transcoder (architecture {arch!r}): circuitlab reads SAE-Lens "
            f"transcoders ({', '.join(TRANSCODER_ARCHITECTURES)}) as `circuitlab train` writes "
            "them. Fix its architecture field, or save the layer again with SAE.save_model.")
    for name in ("d_in", "d_sae", "d_out"):
        value = cfg.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CircuitlabError(f"{file} has {name}={value!r}, not a positive whole number; "
                                  "restore it, or save the layer again with SAE.save_model.")
    return cfg


def manifest_fix(folder: Path) -> str:
    """What to do about a transcoder folder that fails its ``manifest.json`` check, from what
    the manifest says wrote it: resume a training (or fine-tuning) run, re-run ``circuitlab
    quantize``, or else restore the folder from git or retrain."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        return "Restore it from git or retrain it."
    storage = manifest.get("storage")
    if isinstance(storage, dict) and storage.get("source"):
        return (f"Write it again from its source: `circuitlab quantize {storage['source']} "
                f"--out {folder}`.")
    if "tokens_seen" in manifest:
        tool = "finetune" if "finetune" in manifest else "train"
        return (f"Resume the run that exported it: `circuitlab {tool}` with the same --out "
                f"{folder} (recorded command: {manifest.get('command')}) continues from its "
                "checkpoint and exports the transcoders again.")
    return "Restore it from git or retrain it."


def _misfit(folder: Path, file: Path, cfg: dict, err: RuntimeError) -> CircuitlabError:
    """The error for weights ``file`` whose tensors do not fit ``folder``'s ``cfg.json``."""
    details = "; ".join(line.strip(" \t.") for line in str(err).splitlines()[1:]) or str(err)
    return CircuitlabError(
        f"{file} does not fit {folder / 'cfg.json'} (architecture {cfg['architecture']!r}, "
        f"d_in={cfg['d_in']}, d_sae={cfg['d_sae']}, d_out={cfg['d_out']}): {details}. One of "
        "the two was edited or they belong to different transcoders; restore them, or save "
        "the layer again with SAE.save_model.")


def _check_matrices(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights without a transcoder's encoder and decoder matrices."""
    found = {name for name, value in state.items() if value.ndim == 2}
    if not {"W_enc", "W_dec"} <= found:
        raise CircuitlabError(
            f"{folder / SAE_LENS_WEIGHTS} holds no transcoder: it lacks the matrices "
            f"{sorted({'W_enc', 'W_dec'} - found)} (it holds {sorted(state)}). Nothing was written.")


def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise CircuitlabError(f"--out {out} is the source folder; give a new folder.")
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        ours = json.loads((out / "manifest.json").read_text())["storage"]["format"] == float8.FORMAT["format"]
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise CircuitlabError(f"{out} exists and is not an earlier `circuitlab quantize` "
                              "output; it is left untouched. Give a new or empty folder.")


def quantize_folder(src, out, command: str | None = None) -> dict:
    """Write the 8-bit twin of a folder of SAE-Lens transcoders, or of a cross-layer
    transcoder's folder (``_quantize_clt``).

    ``out`` gets each layer's ``cfg.json`` and ``FLOAT8_WEIGHTS``, and a ``manifest.json``
    holding their sha256, the source manifest's record (training commands, tokens, times)
    and, under ``storage``, the format, the source manifest's sha256 and ``command``. The
    folder is written beside ``out`` and swapped in whole.

    Args:
        src: the folder (its manifest, if any, is checked first).
        out: a new or empty folder, or an earlier output of this function (replaced).
        command: the command line, recorded in the manifest.

    Returns:
        Per layer folder, the bytes before and after and ``relative_error``: the largest
        ``||M' - M|| / ||M||`` (Frobenius norms) of its matrices.

    Raises:
        CircuitlabError: for a source without transcoder folders (or with folders of
            something else than transcoders), a corrupt source, or an ``out`` that holds
            something else.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CircuitlabError(f"{src} is not a folder of transcoders: `circuitlab quantize` takes "
                              "the folder of layer folders (layer_XX/cfg.json and "
                              f"{SAE_LENS_WEIGHTS}) or a cross-layer transcoder's folder.")
    manifest = {}
    if (src / "manifest.json").exists():
        verify_manifest(src, f"the transcoders in {src}", manifest_fix(src))
        manifest = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    if clt_format.is_clt_folder(src):
        return _quantize_clt(src, out, manifest, command)
    folders = _layer_folders(src)
    _check_out(src, out)
    report, digests = {}, {}
    with atomic_dir(out, "nothing was written.") as tmp:
        for folder in folders:
            state = read_weights(folder)
            _check_matrices(folder, state)
            tensors = quantize_tensors(state)
            back = float8.decode(tensors)
            (tmp / folder.name).mkdir()
            (tmp / folder.name / "cfg.json").write_bytes((folder / "cfg.json").read_bytes())
            save_file(tensors, tmp / folder.name / FLOAT8_WEIGHTS, metadata=float8.FORMAT)
            for f in ("cfg.json", FLOAT8_WEIGHTS):
                digests[f"{folder.name}/{f}"] = sha256(tmp / folder.name / f)
            report[folder.name] = {
                "bytes_before": (folder / SAE_LENS_WEIGHTS).stat().st_size,
                "bytes_after": (tmp / folder.name / FLOAT8_WEIGHTS).stat().st_size,
                "relative_error": max(float((back[n] - v).norm() / v.norm().clamp_min(1e-30))
                                      for n, v in state.items() if v.ndim == 2)}
        _write_manifest(tmp, src, manifest, digests, command)
    return report


def _write_manifest(tmp: Path, src: Path, manifest: dict, digests: dict, command) -> None:
    """The 8-bit folder's ``manifest.json``: its files' sha256 and the source's record."""
    record = {k: v for k, v in manifest.items() if k != "sha256"}
    record["storage"] = {**float8.FORMAT, "source": str(src), "command": command,
                         "source_manifest_sha256": sha256(src / "manifest.json")
                         if manifest else None}
    (tmp / "manifest.json").write_text(json.dumps({"sha256": digests, **record}, indent=1),
                                       encoding="utf-8")


def _quantize_clt(src: Path, out: Path, manifest: dict, command) -> dict:
    """``quantize_folder`` for a cross-layer transcoder: the same folder layout, each
    ``W_enc_<s>`` and ``W_dec_<s>`` file with 8-bit matrices (``CrossLayerTranscoder.save``
    with ``eight_bit``). Reported per source layer (``layer_XX``: both files)."""
    clt = clt_format.load(src)
    _check_out(src, out)
    report, digests = {}, {}
    with atomic_dir(out, "nothing was written.") as tmp:
        clt.save(tmp / ".clt", eight_bit=True)
        for f in sorted((tmp / ".clt").iterdir()):
            os.replace(f, tmp / f.name)
        (tmp / ".clt").rmdir()
        back = clt_format.load(tmp, dtype=torch.float32)
        for name in sorted(p.name for p in tmp.iterdir()):
            digests[name] = sha256(tmp / name)
        for s in range(clt.n_layers):
            files = (f"W_enc_{s}.safetensors", f"W_dec_{s}.safetensors")
            pairs = [(back.W_enc[s], clt.W_enc[s]), (back.W_dec[s], clt.W_dec[s])]
            if clt.W_skip is not None:
                pairs.append((back.W_skip[s], clt.W_skip[s]))
            report[f"layer_{s:02d}"] = {
                "bytes_before": sum((src / f).stat().st_size for f in files),
                "bytes_after": sum((tmp / f).stat().st_size for f in files),
                "relative_error": max(float((a - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                                      for a, b in pairs)}
        _write_manifest(tmp, src, manifest, digests, command)
    return report


def check_transcoder_source(source) -> None:
    """Refuse, before anything is sized or loaded, a list holding anything but SAE-Lens
    transcoders, and a folder of SAE-Lens layer folders with a ``cfg.json`` that
    ``quantize.read_cfg`` refuses.

    Raises:
        CircuitlabError: naming the list item or the ``cfg.json``, and the fix.
    """
    if isinstance(source, (list, tuple)):
        for i, item in enumerate(source):
            if not isinstance(item, SAE):
                raise CircuitlabError(
                    f"transcoders[{i}] is a {type(item).__name__} ({item!r:.60}), not a "
                    "transcoder: a list of transcoders holds one SAE-Lens transcoder (an "
                    "sae_lens.SAE, e.g. from SAE.load_from_disk) per layer. To load from a "
                    "folder or release, pass its name itself, not in a list.")
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir() \
            and not (Path(source) / "config.yaml").exists():
        for folder in layer_folders(Path(source)):
            read_cfg(folder)


def layer_folders(path: Path) -> list[Path]:
    """The SAE-Lens layer folders (``*/cfg.json``, hidden ones left out) in ``path``."""
    return sorted(p.parent for p in path.glob("*/cfg.json") if not p.parent.name.startswith("."))
