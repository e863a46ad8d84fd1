"""Cross-layer transcoders (CLTs): features that read one layer and write to it and every later one.

A CLT over ``L`` layers has, for each layer ``s``, an encoder that reads the MLP input
``x[s]`` (the pre-MLP norm output, as per-layer transcoders do) and, for each later or equal
layer ``t``, a decoder from the features of ``s`` to the MLP output of ``t``::

    a[s]       = act(x[s] @ W_enc[s] + b_enc[s])                     # [P, d_sae]
    mlp_out[t] ~ sum_{s <= t} a[s] @ W_dec[s][:, t - s] + b_dec[t]  (+ x[t] @ W_skip[t].T)

``act`` is ReLU, JumpReLU (``a * (pre > threshold)``) or TopK (the ``k`` largest positive
pre-activations of a layer, per token). SAE-Lens has no CLT class; its Gemma Scope 2 loader
sums a CLT's decoders into one, which loses the cross-layer writes attribution needs.

On disk (``save`` / ``load``), a CLT is a folder in circuit-tracer's layout, so either tool
reads the other's files:

* ``config.yaml``: ``model_kind: cross_layer_transcoder``, ``model_name``,
  ``feature_input_hook``, ``feature_output_hook``, ``activation`` (``relu``, ``jumprelu``,
  ``topk``) and ``k`` (TopK);
* ``W_enc_{s}.safetensors``: ``W_enc_{s} [d_sae, d_model]``, ``b_enc_{s} [d_sae]``,
  ``b_dec_{s} [d_model]``, optionally ``threshold_{s} [d_sae]`` and
  ``W_skip_{s} [d_model, d_model]`` (applied as ``x @ W_skip_{s}``);
* ``W_dec_{s}.safetensors``: ``W_dec_{s} [d_sae, L - s, d_model]``.

A CLT may write into fewer layers: with ``window: w`` in ``config.yaml`` (circuitlab's
extension of the layout) the features of ``s`` write into layers ``s .. s + w - 1`` only and
``W_dec_{s}`` holds ``min(w, L - s)`` of them; ``decoders`` pads the rest with zeros, so
everything downstream sees the full layout.

A CLT saved with ``eight_bit=True`` (``circuitlab quantize``) stores its matrices as 8-bit
floats with float32 scales (``circuitlab.float8``; circuitlab's extension too); loading
multiplies them back into float32.

With ``lazy=True`` the decoders stay on disk and are read (memory-mapped) when used; each
read first checks that its file is still the one loaded (``fingerprint``), so a folder replaced
meanwhile never pairs the encoders in memory with another CLT's decoders.

Loading refuses, naming the file and the tensor, a tensor of the wrong shape, a layer that
lacks a tensor the others have, non-finite weights (lazy decoders: when read) and a file
that is not safetensors or is cut short.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import float8
from .errors import CircuitlabError
from .files import atomic_dir, atomic_file

ACTIVATIONS = ("relu", "jumprelu", "topk")
MODEL_KIND = "cross_layer_transcoder"
#: The tensors of ``W_enc_{s}.safetensors`` every layer has, and those all layers or none have.
REQUIRED = ("W_enc", "b_enc", "b_dec")
OPTIONAL = ("threshold", "W_skip")
#: Bytes hashed at each end of a lazy decoder file for its ``fingerprint``.
FINGERPRINT_BYTES = 64 * 1024
#: Elements checked at a time by ``check_finite`` (bounds its temporary memory).
FINITE_CHUNK = 1 << 24


class CrossLayerTranscoder(torch.nn.Module):
    """A cross-layer transcoder over ``n_layers`` layers (see the module docstring).

    Attributes:
        W_enc: ``[L, d_model, d_sae]`` encoders (SAE-Lens orientation: ``x @ W_enc[s]``).
        b_enc: ``[L, d_sae]``.
        threshold: ``[L, d_sae]`` JumpReLU thresholds, or ``None``.
        W_dec: per source layer ``s``, ``[d_sae, L - s, d_model]``; see ``decoders``.
        b_dec: ``[L, d_model]``.
        W_skip: ``[L, d_model, d_model]`` affine skip matrices ``[d_out, d_in]``, or ``None``.
        activation: ``"relu"``, ``"jumprelu"`` or ``"topk"``; ``k`` for TopK.
        window: the most layers a feature writes into (``None``: all later layers).
        hook_in, hook_out: the TransformerLens hook names (without ``blocks.<layer>.``)
            the encoders read and the decoders write.
    """

    def __init__(self, n_layers: int, d_model: int, d_sae: int, *, activation: str = "relu",
                 k: int | None = None, skip: bool = False, model_name: str | None = None,
                 hook_in: str = "hook_mlp_in", hook_out: str = "hook_mlp_out",
                 window: int | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise CircuitlabError(f"activation={activation!r}: a CLT's activation is one of "
                                  f"{', '.join(ACTIVATIONS)}.")
        if (activation == "topk") != (k is not None):
            raise CircuitlabError("A TopK CLT needs k (features per token and layer); only TopK "
                                  "takes k.")
        if window is not None and not 1 <= window <= n_layers:
            raise CircuitlabError(f"window={window!r}: a CLT's write window is between 1 and "
                                  f"its {n_layers} layers (or None for all later layers).")
        self.n_layers, self.d_model, self.d_sae = n_layers, d_model, d_sae
        self.window = None if window is None or window >= n_layers else window
        self.activation, self.k = activation, k
        self.model_name, self.hook_in, self.hook_out = model_name, hook_in, hook_out
        zeros = lambda *shape: torch.nn.Parameter(  # noqa: E731
            torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)
        self.W_enc = zeros(n_layers, d_model, d_sae)
        self.b_enc = zeros(n_layers, d_sae)
        self.threshold = zeros(n_layers, d_sae) if activation == "jumprelu" else None
        self.W_dec = torch.nn.ParameterList([zeros(d_sae, self.n_out(s), d_model)
                                             for s in range(n_layers)])
        self.b_dec = zeros(n_layers, d_model)
        self.W_skip = zeros(n_layers, d_model, d_model) if skip else None
        self.lazy_folder: Path | None = None
        self.lazy_fingerprints: list[tuple] = []

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k else ""
        window = f", window={self.window}" if self.window else ""
        return (f"CrossLayerTranscoder({self.n_layers} layers, {self.d_sae} features/layer, "
                f"{self.activation}{k}, skip={self.W_skip is not None}{window})")

    def n_out(self, source: int) -> int:
        """How many layers (``source`` and after) the features of ``source`` write into."""
        left = self.n_layers - source
        return left if self.window is None else min(self.window, left)

    # ------------------------------------------------------------------ the maps

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of ``layer`` for MLP inputs ``x [..., d_model]``."""
        pre = self.pre_activations(layer, x)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold[layer])
        acts = torch.relu(pre)
        if self.activation == "topk":
            top = torch.topk(acts, min(self.k, self.d_sae), dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc[layer] + b_enc[layer]``."""
        return x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def decoders(self, source: int) -> torch.Tensor:
        """``[d_sae, L - source, d_model]``: the writes of ``source``'s features into layers
        ``source, source + 1, ...`` (read from disk when the CLT is lazy; zeros past a
        write window)."""
        W = self.stored_decoders(source)
        missing = self.n_layers - source - W.shape[1]
        return W if not missing else torch.cat([W, W.new_zeros(W.shape[0], missing, W.shape[2])], 1)

    def stored_decoders(self, source: int) -> torch.Tensor:
        """``[d_sae, n_out(source), d_model]``: the decoders as stored (no padding)."""
        if self.lazy_folder is None:
            return self.W_dec[source]
        file = self.lazy_folder / f"W_dec_{source}.safetensors"
        self._check_unchanged(source, file)
        with open_weights(file, self.b_enc.device) as f:
            W = float8.read(f, f"W_dec_{source}")
        return check_finite(W, f"W_dec_{source}", file).to(self.b_enc.dtype)

    def keep_on_disk(self, folder: Path) -> None:
        """Read the decoders from ``folder`` when used (``lazy``), each file checked before
        every read against the ``fingerprint`` it has now."""
        self.W_dec = torch.nn.ParameterList()
        self.lazy_folder = Path(folder)
        self.lazy_fingerprints = [fingerprint(self.lazy_folder / f"W_dec_{s}.safetensors")
                                  for s in range(self.n_layers)]

    def _check_unchanged(self, source: int, file: Path) -> None:
        """Refuse to read a lazy decoder file that changed or went away since loading."""
        try:
            now = fingerprint(file)
        except OSError:
            now = None
        if now != self.lazy_fingerprints[source]:
            what = "is gone" if now is None else "changed"
            raise CircuitlabError(
                f"{file} {what} since this CLT was loaded lazily from {self.lazy_folder}; its "
                "decoders would not match the encoders in memory. Load the CLT again "
                "(circuitlab.load(..., lazy=True)) once the folder is complete.")

    def decode(self, layer: int, acts, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of ``layer``'s MLP output from ``acts[s]`` (``[..., d_sae]``, for
        every ``s <= layer``) and, with a skip connection, the MLP input ``x``."""
        out = self.b_dec[layer]
        for s in range(layer + 1):
            if layer - s < self.n_out(s):
                out = out + acts[s] @ self.stored_decoders(s)[:, layer - s]
        if self.W_skip is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip[layer].T
        return out

    # ------------------------------------------------------------------ files

    def save(self, folder, eight_bit: bool = False) -> Path:
        """Write the CLT to ``folder`` (atomically) in the format of the module docstring;
        with ``eight_bit``, its matrices in ``float8``'s layout (one scale per feature for
        ``W_enc``, per feature and target layer for ``W_dec``, per row for ``W_skip``)."""
        def write(file, tensors):
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            if eight_bit:
                tensors = {k: w for n, v in tensors.items()
                           for k, w in (float8.encode(n, v, axis=-1) if v.ndim >= 2
                                        else {n: v.float()}).items()}
            with atomic_file(file) as out:
                save_file(tensors, out, metadata=float8.FORMAT if eight_bit else None)

        with atomic_dir(folder) as tmp:
            config = dict(model_kind=MODEL_KIND, model_name=self.model_name,
                          feature_input_hook=self.hook_in, feature_output_hook=self.hook_out,
                          activation=self.activation, k=self.k)
            if self.window is not None:
                config["window"] = self.window
            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            for s in range(self.n_layers):
                enc = {f"W_enc_{s}": self.W_enc[s].T, f"b_enc_{s}": self.b_enc[s],
                       f"b_dec_{s}": self.b_dec[s]}
                if self.threshold is not None:
                    enc[f"threshold_{s}"] = self.threshold[s]
                if self.W_skip is not None:
                    enc[f"W_skip_{s}"] = self.W_skip[s].T
                write(tmp / f"W_enc_{s}.safetensors", enc)
                write(tmp / f"W_dec_{s}.safetensors", {f"W_dec_{s}": self.stored_decoders(s)})
        return Path(folder)


def is_clt_folder(folder) -> bool:
    """Whether ``folder`` holds a CLT in circuit-tracer's layout.

    Raises:
        CircuitlabError: for a ``config.yaml`` that is not a YAML mapping.
    """
    folder = Path(folder)
    if not (folder / "W_enc_0.safetensors").exists() or not (folder / "W_dec_0.safetensors").exists():
        return False
    return read_config(folder / "config.yaml").get("model_kind", MODEL_KIND) == MODEL_KIND


def read_config(file) -> dict:
    """The settings of a ``config.yaml`` (``{}`` when there is none, or it is empty).

    Raises:
        CircuitlabError: when the file is not YAML, or holds something else than settings.
    """
    file = Path(file)
    if not file.exists():
        return {}
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CircuitlabError(f"{file} is not valid YAML ({err}). Fix it, or delete it and pass "
                              "the settings in config=...") from err
    if settings is not None and not isinstance(settings, dict):
        raise CircuitlabError(
            f"{file} holds a YAML {type(settings).__name__}, not a mapping of settings "
            "(model_kind: cross_layer_transcoder, feature_input_hook: ..., activation: ...). "
            "Fix it, or delete it and pass the settings in config=...")
    return settings or {}


def unreadable(file, err: Exception) -> CircuitlabError:
    """The error for a weights ``file`` that cannot be opened as safetensors."""
    if isinstance(err, FileNotFoundError):
        return CircuitlabError(f"{file} is missing. Download or save the weights again.")
    return CircuitlabError(
        f"{file} cannot be read as safetensors ({err}): it is not a safetensors file, or it "
        "is damaged or cut short (an interrupted copy or download). Download or save it again.")


@contextmanager
def open_weights(file, device="cpu") -> Iterator:
    """``safe_open`` of a safetensors ``file``, with failures to open or read it as
    ``CircuitlabError``s naming it (check names against ``keys()`` before reading).

    Raises:
        CircuitlabError: for a missing file, or one that is not safetensors or is cut short.
    """
    try:
        with safe_open(file, "pt", device=str(device)) as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise unreadable(file, err) from err


def check_finite(tensor: torch.Tensor, name: str, where) -> torch.Tensor:
    """``tensor`` if none of its values is NaN or infinite (checked in chunks).

    Raises:
        CircuitlabError: naming ``where`` (the file or folder) and the tensor ``name``.
    """
    flat = tensor.detach().reshape(-1)
    for i in range(0, flat.numel(), FINITE_CHUNK):
        if not torch.isfinite(flat[i:i + FINITE_CHUNK]).all():
            bad = int((~torch.isfinite(flat)).sum())
            raise CircuitlabError(
                f"{where} holds {bad} non-finite values (NaN or inf) in {name}: the weights are "
                "damaged (a diverged training run or a bad conversion). Download, convert or "
                "train them again.")
    return tensor


def check_all_finite(tensors: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """``tensors`` once each is checked by ``check_finite`` (``where`` names their file or
    folder)."""
    for name, tensor in tensors.items():
        check_finite(tensor, name, where)
    return tensors


def read_tensors(file, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``file``, by name (see ``open_weights``)."""
    with open_weights(file, device) as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118


def fingerprint(file: Path) -> tuple:
    """``(size, mtime_ns, sha256 of the first and last FINGERPRINT_BYTES)`` of ``file``: a
    cheap check that a file is still the one read earlier.

    Raises:
        OSError: when the file cannot be read.
    """
    stat = file.stat()
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(stat.st_size - FINGERPRINT_BYTES, 0))
        digest.update(f.read(FINGERPRINT_BYTES))
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()


def load(folder, *, device="cpu", dtype: torch.dtype | None = None, lazy: bool = False,
         config: dict | None = None) -> CrossLayerTranscoder:
    """Read a CLT folder (circuit-tracer's layout, see the module docstring).

    Args:
        folder: the folder.
        device, dtype: where and in what dtype to hold the weights (default: as stored).
        lazy: keep the decoders on disk and read them when used (for CLTs larger than memory).
        config: the settings of ``config.yaml`` when the folder has none (or to override it).

    Raises:
        CircuitlabError: for a missing, unreadable or inconsistent file, a tensor of the wrong
            shape or with non-finite values, naming the file and the tensor.
    """
    folder = Path(folder)
    settings = {**read_config(folder / "config.yaml"), **(config or {})}
    n_layers = 0
    while (folder / f"W_enc_{n_layers}.safetensors").exists():
        n_layers += 1
    if not n_layers:
        raise CircuitlabError(f"{folder} holds no CLT: W_enc_0.safetensors is missing. A CLT "
                              "folder has W_enc_<layer> and W_dec_<layer> safetensors per layer.")
    layers = [_read_encoders(folder, s, device) for s in range(n_layers)]
    clt = _empty(folder, layers, settings, dtype, device)
    with torch.no_grad():
        for s, layer in enumerate(layers):
            clt.W_enc[s] = layer["W_enc"].T
            clt.b_enc[s], clt.b_dec[s] = layer["b_enc"], layer["b_dec"]
            if clt.threshold is not None:
                clt.threshold[s] = layer["threshold"]
            if clt.W_skip is not None:
                clt.W_skip[s] = layer["W_skip"].T
            W_dec = _read_decoders(clt, folder / f"W_dec_{s}.safetensors", s, device, lazy)
            if W_dec is not None:
                clt.W_dec[s] = torch.nn.Parameter(W_dec.to(clt.b_enc.dtype), requires_grad=False)
    if lazy:
        clt.keep_on_disk(folder)
    return clt


def _read_encoders(folder: Path, s: int, device) -> dict[str, torch.Tensor]:
    """The tensors of ``W_enc_{s}.safetensors`` by short name (``W_enc``, ``b_enc``, ...),
    each checked finite."""
    file = folder / f"W_enc_{s}.safetensors"
    with open_weights(file, device) as f:
        keys = set(f.keys())
        missing = [f"{name}_{s}" for name in REQUIRED if f"{name}_{s}" not in keys]
        if missing:
            raise CircuitlabError(f"{file} lacks {missing} (it holds {sorted(keys)}); every "
                                  f"layer's W_enc file holds W_enc_{s}, b_enc_{s} and b_dec_{s}.")
        return {name: check_finite(float8.read(f, f"{name}_{s}"), f"{name}_{s}", file)
                for name in REQUIRED + OPTIONAL if f"{name}_{s}" in keys}


def _empty(folder: Path, layers: list[dict], settings: dict, dtype, device) -> CrossLayerTranscoder:
    """A zero CLT shaped like ``layers`` (the encoders as read) once their shapes and
    tensors agree across layers."""
    d_sae, d_model = layers[0]["W_enc"].shape
    want = {"W_enc": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,),
            "threshold": (d_sae,), "W_skip": (d_model, d_model)}
    for s, layer in enumerate(layers):
        for name, tensor in layer.items():
            if tuple(tensor.shape) != want[name]:
                raise CircuitlabError(
                    f"{folder}/W_enc_{s}.safetensors holds {name}_{s} of shape "
                    f"{tuple(tensor.shape)}; expected {want[name]} (d_sae={d_sae} and "
                    f"d_model={d_model}, from W_enc_0). Save or convert the CLT again.")
    for name in OPTIONAL:
        holders = [s for s, layer in enumerate(layers) if name in layer]
        if holders and len(holders) != len(layers):
            s = next(s for s in range(len(layers)) if s not in holders)
            raise CircuitlabError(
                f"{folder}/W_enc_{s}.safetensors lacks {name}_{s}, which "
                f"W_enc_{holders[0]}.safetensors has: every layer of a CLT has thresholds "
                "(JumpReLU) and skip matrices, or none does. Save or convert the CLT again.")
    activation = settings.get("activation") or ("jumprelu" if "threshold" in layers[0] else "relu")
    activation = {"jump_relu": "jumprelu"}.get(activation, activation)
    if activation == "jumprelu" and "threshold" not in layers[0]:
        raise CircuitlabError(f"{folder}/config.yaml declares activation jumprelu, but "
                              "W_enc_0.safetensors holds no threshold_0; add the thresholds or "
                              "declare the activation the CLT has (relu, topk).")
    return CrossLayerTranscoder(
        len(layers), d_model, d_sae, activation=activation, k=settings.get("k"),
        skip="W_skip" in layers[0], model_name=settings.get("model_name"),
        hook_in=settings.get("feature_input_hook", "hook_mlp_in"),
        hook_out=settings.get("feature_output_hook", "hook_mlp_out"),
        window=settings.get("window"), dtype=dtype or layers[0]["W_enc"].dtype, device=device)


def _read_decoders(clt: CrossLayerTranscoder, file: Path, s: int, device,
                   lazy: bool) -> torch.Tensor | None:
    """``W_dec_{s}`` of ``file`` once its name and shape are checked (checked finite);
    ``None`` when ``lazy`` (the tensor is read when used)."""
    if not file.exists():
        raise CircuitlabError(f"{file} is missing: every layer of a CLT needs its decoders.")
    with open_weights(file, device) as f:
        keys = set(f.keys())
        if f"W_dec_{s}" not in keys:
            raise CircuitlabError(f"{file} holds {sorted(keys)}, not W_dec_{s}: it is not "
                                  f"layer {s}'s decoder file. Save or convert the CLT again.")
        shape = tuple(f.get_slice(f"W_dec_{s}").get_shape())
        want = (clt.d_sae, clt.n_out(s), clt.d_model)
        if shape != want:
            raise CircuitlabError(f"{file} holds W_dec_{s} of shape {shape}; expected {want}.")
        return None if lazy else check_finite(float8.read(f, f"W_dec_{s}"), f"W_dec_{s}", file)
