"""Where cross-layer transcoders come from: local folders, circuit-tracer's hub repositories and
Gemma Scope 2's CLT files.

A source is resolved from its small configuration files first (``resolve``), so that a CLT
circuitlab cannot use (one reading the residual stream before the pre-MLP norm, as mntss's
do) or one made for another model is refused before its weights are downloaded. ``CltSource.load``
then reads the weights into a ``CrossLayerTranscoder``:

* a local folder in circuit-tracer's layout (``circuitlab.clt``), e.g. one written by
  ``CrossLayerTranscoder.save``;
* a circuit-tracer hub reference ``org/repo[/subfolder][@revision]`` whose ``config.yaml``
  declares ``model_kind: cross_layer_transcoder``: the repository's ``W_enc_*`` and ``W_dec_*``
  safetensors (``CLT_PRESETS``: mntss's CLTs), or, where the config lists ``transcoders:``
  (``hf://`` URIs), Gemma Scope 2 files;
* Gemma Scope 2's CLT folders (``google/gemma-scope-2-*/clt/<name>``, or a local folder of
  them): per layer ``s`` a ``params_layer_{s}.safetensors`` with ``w_enc [d_model, d_sae]``,
  ``w_dec [d_sae, L, d_model]`` (writes into every layer; only layers ``>= s`` are part of the
  CLT), ``b_enc``, ``b_dec``, ``threshold`` (JumpReLU) and, for ``*_affine``,
  ``affine_skip_connection [d_in, d_out]`` (applied as ``x @ A``). They read the MLP input
  (the pre-MLP norm output, ``pre_feedforward_layernorm.output``) and write ``hook_mlp_out``.
  The decoders are kept per target layer, never summed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import clt as clt_format
from .errors import CircuitlabError
from .files import atomic_dir, cache_dir, verify_manifest
from .quantize import manifest_fix
from .hooks import MLP_IN_HOOKS, MLP_OUT_HOOKS, RESID_MID_HOOKS
from .presets import CLT_PRESETS

#: Gemma Scope 2's per-layer CLT files.
GEMMA_SCOPE_2_FILE = re.compile(r"params_layer_(\d+)\.safetensors$")
#: The MLP input as Gemma Scope 2 configs name it in transformers (``hf_hook_point_in``).
GEMMA_SCOPE_2_HOOK_IN = "pre_feedforward_layernorm.output"


@dataclass
class CltSource:
    """A CLT source resolved from its configuration, before any weight is read.

    Attributes:
        label: the source as given.
        kind: ``"folder"`` (circuit-tracer's layout) or ``"gemma-scope-2"``.
        model_name: the model the CLT was made for, when its files say.
        settings: ``config.yaml``'s settings (hooks, activation).
        folder: a local folder of the files, if they are local.
        repo: ``(repo_id, subfolder, revision)`` on the hub, if they are not.
        files: Gemma Scope 2 files as listed by a circuit-tracer config (paths or ``hf://``).
    """

    label: str
    kind: str
    model_name: str | None = None
    settings: dict = field(default_factory=dict)
    folder: Path | None = None
    repo: tuple | None = None
    files: list | None = None

    def load(self, *, device="cpu", dtype: torch.dtype | None = None,
             lazy: bool = False) -> clt_format.CrossLayerTranscoder:
        """Download what is missing and read the CLT.

        Args:
            device, dtype: where and in what dtype to hold the weights (default: as stored).
            lazy: keep the decoders on disk and read them when used (Gemma Scope 2 files are
                first converted to circuit-tracer's layout in circuitlab's cache).

        Raises:
            CircuitlabError: for a missing, inconsistent or unreadable file, naming it.
        """
        if self.kind == "folder":
            if self.folder is not None and (self.folder / "manifest.json").exists():
                verify_manifest(self.folder, f"the cross-layer transcoder in {self.folder}",
                                manifest_fix(self.folder))
            folder = self.folder or _snapshot(self.repo, ["*.safetensors"])
            return clt_format.load(folder, device=device, dtype=dtype, lazy=lazy,
                                   config=self.settings)
        files = _gemma_scope_2_files(self)
        settings = {**self.settings, "model_name": self.model_name}
        if not lazy:
            return _read_gemma_scope_2(files, settings, device, dtype)
        return clt_format.load(_convert_gemma_scope_2(files, settings), device=device,
                               dtype=dtype, lazy=True)


# --------------------------------------------------------------------------- resolving


def resolve(source, model_name: str | None = None) -> CltSource | None:
    """The CLT ``source`` names, or ``None`` when it names no CLT (per-layer transcoders).

    Reads configuration files only (``config.yaml``, Gemma Scope 2's ``config.json``),
    downloading them from the hub if needed.

    Args:
        source: a folder, a ``CLT_PRESETS`` name or a hub reference
            ``org/repo[/subfolder][@revision]``.
        model_name: the model's preset, name or Hugging Face id, to refuse a CLT of another
            model before its weights are downloaded (``None``: not checked).

    Raises:
        CircuitlabError: for a CLT circuitlab cannot splice (it reads or writes other hooks
            than the MLP's input, or the residual before it, and output), one of another
            model, or a hub reference whose
            configuration cannot be read.
    """
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if path.is_dir():
        found = _local(path)
    elif isinstance(source, str) and re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)*(@[\w.-]+)?", source):
        if source in CLT_PRESETS:  # refused before the hub is asked
            _check_model(CltSource(source, "folder"), model_name)
        found = _hub(source)
    else:
        return None
    if found is not None:
        _check_hooks(found)
        _check_model(found, model_name)
    return found


def _local(path: Path) -> CltSource | None:
    settings = clt_format.read_config(path / "config.yaml")
    if clt_format.is_clt_folder(path):
        return CltSource(str(path), "folder", settings.get("model_name"), settings, folder=path)
    if any(GEMMA_SCOPE_2_FILE.search(p.name) for p in path.glob("params_layer_*.safetensors")):
        return _gemma_scope_2(str(path), _read_json(path / "config.json"), folder=path)
    if settings.get("model_kind") == clt_format.MODEL_KIND:
        if "transcoders" in settings:
            return _listed(str(path), settings)
        return CltSource(str(path), "folder", settings.get("model_name"), settings, folder=path)
    return None


def _hub(ref: str) -> CltSource:
    """A hub reference, resolved the way circuit-tracer's ``load_transcoder_from_hub`` does:
    ``config.yaml`` in the repository (or its subfolder) says what the files are."""
    path, _, revision = ref.partition("@")
    parts = path.split("/")
    where = ("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)
    repo, sub = where[:2]
    try:
        file = hf_hub_download(repo, "config.yaml", subfolder=sub, revision=where[2])
    except Exception as err:
        if "gemma-scope-2" in repo and (sub or "").startswith("clt/"):  # Google's own folder
            raw = {}
            try:
                raw = _read_json(Path(hf_hub_download(repo, "config.json", subfolder=sub,
                                                      revision=where[2])))
            except Exception:  # no config.json: SAE-Lens infers the same hooks
                pass
            return _gemma_scope_2(ref, raw, repo=where)
        raise CircuitlabError(
            f"Unknown transcoder source {ref!r}: not a folder, not a known release, and no "
            f"config.yaml could be read from the hub repository {repo}"
            f"{f' (folder {sub})' if sub else ''} ({err.__class__.__name__}). Known CLTs: "
            f"{', '.join(CLT_PRESETS)}; releases of per-layer transcoders: "
            "circuitlab.presets.TRANSCODER_PRESETS.") from err
    settings = clt_format.read_config(file)
    kind = settings.get("model_kind")
    if kind != clt_format.MODEL_KIND:
        raise CircuitlabError(
            f"{ref}'s config.yaml declares model_kind {kind!r}, not a cross-layer transcoder. "
            "Load per-layer transcoders by their SAE-Lens release name, or download the folder "
            "and pass its path.")
    if "transcoders" in settings:
        return _listed(ref, settings)
    return CltSource(ref, "folder", settings.get("model_name"), settings, repo=where)


def _listed(label: str, settings: dict) -> CltSource:
    """A circuit-tracer config listing per-layer files: Gemma Scope 2's CLTs (circuit-tracer
    reads them with ``load_gemma_scope_2_clt``); the hooks are Gemma Scope 2's."""
    files = list(dict.fromkeys(settings["transcoders"]))  # some configs repeat the last file
    if not all(GEMMA_SCOPE_2_FILE.search(str(f)) for f in files):
        raise CircuitlabError(
            f"{label}'s config.yaml lists per-layer files that are not Gemma Scope 2's "
            "params_layer_<layer>.safetensors; circuitlab reads CLTs in circuit-tracer's "
            "W_enc_<layer>/W_dec_<layer> layout or Gemma Scope 2's.")
    source = _gemma_scope_2(label, {}, files=files)
    source.model_name = settings.get("model_name")
    return source


def _gemma_scope_2(label: str, raw: dict, **where) -> CltSource:
    """Gemma Scope 2 files read the MLP input and write the MLP output (their config.json's
    ``hf_hook_point_in`` and ``_out``; SAE-Lens labels them ``hook_mlp_in`` and ``hook_mlp_out``)."""
    hook = raw.get("hf_hook_point_in", GEMMA_SCOPE_2_HOOK_IN)
    ok = hook.endswith(GEMMA_SCOPE_2_HOOK_IN)
    settings = {"model_kind": clt_format.MODEL_KIND, "activation": "jumprelu",
                "feature_input_hook": "hook_mlp_in" if ok else hook,
                "feature_output_hook": "hook_mlp_out"}
    repo = where.get("repo")
    model = repo[0].replace("gemma-scope-2", "gemma-3") if repo else None
    return CltSource(label, "gemma-scope-2", model, settings, **where)


def _check_hooks(source: CltSource) -> None:
    hook_in = source.settings.get("feature_input_hook", "hook_mlp_in")
    hook_out = source.settings.get("feature_output_hook", "hook_mlp_out")
    if hook_in not in MLP_IN_HOOKS + RESID_MID_HOOKS or hook_out not in MLP_OUT_HOOKS:
        raise CircuitlabError(
            f"The cross-layer transcoder {source.label} reads {hook_in!r} and writes "
            f"{hook_out!r}; circuitlab needs CLTs that read the MLP input (the pre-MLP norm's "
            f"output: {', '.join(MLP_IN_HOOKS)}) or the residual stream before that norm "
            f"({', '.join(RESID_MID_HOOKS)}) and write the MLP output "
            f"({', '.join(MLP_OUT_HOOKS)}). Nothing was downloaded.")


def _model_key(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower().removesuffix("-pt")


def _check_model(source: CltSource, model_name: str | None) -> None:
    made_for = CLT_PRESETS.get(source.label, source.model_name)
    if model_name and made_for and _model_key(model_name) != _model_key(made_for):
        raise CircuitlabError(
            f"The cross-layer transcoder {source.label} was made for {made_for}, not for "
            f"{model_name}; load it with model={made_for!r}. Nothing was downloaded.")


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _snapshot(repo: tuple, patterns: list[str]) -> Path:
    """The local folder of ``repo`` (``(repo_id, subfolder, revision)``) holding the files of
    ``patterns`` (within the subfolder), downloaded if needed."""
    repo_id, sub, revision = repo
    try:
        root = snapshot_download(repo_id, revision=revision,
                                 allow_patterns=[f"{sub}/{p}" if sub else p for p in patterns])
    except Exception as err:
        raise CircuitlabError(f"Could not download the CLT files of {repo_id}"
                              f"{f'/{sub}' if sub else ''} ({err.__class__.__name__}: {err}).") from err
    return Path(root) / sub if sub else Path(root)


def _gemma_scope_2_files(source: CltSource) -> list[Path]:
    """Local paths of the source's Gemma Scope 2 files, in layer order (downloaded if needed)."""
    if source.files is not None:
        return [Path(_download_uri(f)) if str(f).startswith("hf://") else Path(f)
                for f in tqdm(source.files, desc=f"Downloading {source.label}", leave=False)]
    folder = source.folder or _snapshot(source.repo, ["params_layer_*.safetensors"])
    found = {int(m.group(1)): p for p in folder.glob("params_layer_*.safetensors")
             if (m := GEMMA_SCOPE_2_FILE.search(p.name))}
    if sorted(found) != list(range(len(found))) or not found:
        raise CircuitlabError(f"{folder} holds Gemma Scope 2 files for layers {sorted(found)}; "
                              "a CLT needs params_layer_<layer>.safetensors for layers 0, 1, ...")
    return [found[s] for s in range(len(found))]


def _download_uri(uri: str) -> str:
    repo_and_file = uri[len("hf://"):].split("?")[0].split("/")
    try:
        return hf_hub_download("/".join(repo_and_file[:2]), "/".join(repo_and_file[2:]))
    except Exception as err:
        raise CircuitlabError(f"Could not download {uri} ({err.__class__.__name__}: {err}).") from err


def _gemma_scope_2_layers(files: list[Path], dtype: torch.dtype | None = None):
    """Per layer ``s``, its tensors in circuit-tracer's layout and names (``W_enc [d_sae, d]``,
    ``W_dec [d_sae, L - s, d]``, ``W_skip`` applied as ``x @ W_skip``), read one layer at a
    time; only the decoders into layers ``>= s`` are read, each tensor checked finite."""
    with clt_format.open_weights(files[0]) as f:
        keys = set(f.keys())
        if not {"w_enc", "w_dec", "b_enc", "b_dec"} <= keys:
            raise CircuitlabError(f"{files[0]} is not a Gemma Scope 2 CLT file: it holds "
                                  f"{sorted(keys)}, not w_enc, w_dec, b_enc, b_dec.")
        d_sae, n_layers, d_model = f.get_slice("w_dec").get_shape()
    if len(files) != n_layers:
        raise CircuitlabError(f"The Gemma Scope 2 CLT has {len(files)} layer files but its "
                              f"decoders write into {n_layers} layers ({files[0]}).")
    for s, file in enumerate(files):
        with clt_format.open_weights(file) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            want = {"w_enc": (d_model, d_sae), "w_dec": (d_sae, n_layers, d_model)}
            if any(shapes.get(k) != v for k, v in want.items()) or not {"b_enc", "b_dec"} <= set(shapes):
                raise CircuitlabError(f"{file} holds {shapes}; layer 0 has w_enc "
                                      f"{want['w_enc']}, w_dec {want['w_dec']}, b_enc and b_dec.")

            def get(name, tensor=None):
                tensor = f.get_tensor(name) if tensor is None else tensor
                tensor = clt_format.check_finite(tensor, name, file)
                return tensor if dtype is None else tensor.to(dtype)

            out = {f"W_enc_{s}": get("w_enc").T, f"b_enc_{s}": get("b_enc"),
                   f"b_dec_{s}": get("b_dec"),
                   f"W_dec_{s}": get("w_dec", f.get_slice("w_dec")[:, s:, :])}
            if "threshold" in shapes:
                out[f"threshold_{s}"] = get("threshold")
            if "affine_skip_connection" in shapes:
                out[f"W_skip_{s}"] = get("affine_skip_connection")
        yield s, out


def _read_gemma_scope_2(files: list[Path], settings: dict, device, dtype) -> clt_format.CrossLayerTranscoder:
    """A ``CrossLayerTranscoder`` of Gemma Scope 2 files, in memory."""
    clt = None
    with torch.no_grad():
        for s, t in _gemma_scope_2_layers(files, dtype):
            if clt is None:
                d_sae, d_model = t[f"W_enc_{s}"].shape
                clt = clt_format.CrossLayerTranscoder(
                    len(files), d_model, d_sae,
                    activation="jumprelu" if f"threshold_{s}" in t else "relu",
                    skip=f"W_skip_{s}" in t, model_name=settings.get("model_name"),
                    hook_in=settings["feature_input_hook"], hook_out=settings["feature_output_hook"],
                    dtype=dtype or t[f"W_enc_{s}"].dtype, device=device)
            clt.W_enc[s], clt.b_enc[s], clt.b_dec[s] = t[f"W_enc_{s}"].T, t[f"b_enc_{s}"], t[f"b_dec_{s}"]
            if clt.threshold is not None:
                clt.threshold[s] = t[f"threshold_{s}"]
            if clt.W_skip is not None:
                clt.W_skip[s] = t[f"W_skip_{s}"].T
            clt.W_dec[s].copy_(t[f"W_dec_{s}"])
    return clt


def _convert_gemma_scope_2(files: list[Path], settings: dict) -> Path:
    """Gemma Scope 2 files converted to circuit-tracer's layout in circuitlab's cache (once
    per set of files: keyed on each file's path and ``clt.fingerprint``, so files replaced in
    place, even with the same size, are converted again), one layer in memory at a time."""
    key = hashlib.sha256("\n".join(f"{p.resolve()}:{clt_format.fingerprint(p)}"
                                   for p in files).encode())
    folder = cache_dir() / "clt" / key.hexdigest()[:16]
    if (folder / "config.yaml").exists():
        return folder
    with atomic_dir(folder) as tmp:
        for s, tensors in _gemma_scope_2_layers(files):
            dec = {f"W_dec_{s}": tensors.pop(f"W_dec_{s}").contiguous()}
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / f"W_enc_{s}.safetensors")
            save_file(dec, tmp / f"W_dec_{s}.safetensors")
        (tmp / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    return folder
