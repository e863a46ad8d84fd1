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

With ``lazy=True`` the decoders stay on disk and are read (memory-mapped) when used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CircuitlabError
from .files import atomic_dir, atomic_file

ACTIVATIONS = ("relu", "jumprelu", "topk")
MODEL_KIND = "cross_layer_transcoder"


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
        with safe_open(self.lazy_folder / f"W_dec_{source}.safetensors", "pt",
                       device=str(self.b_enc.device)) as f:
            return f.get_tensor(f"W_dec_{source}").to(self.b_enc.dtype)

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

    def save(self, folder) -> Path:
        """Write the CLT to ``folder`` (atomically) in the format of the module docstring."""
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
                with atomic_file(tmp / f"W_enc_{s}.safetensors") as file:
                    save_file({k: v.detach().contiguous().cpu() for k, v in enc.items()}, file)
                with atomic_file(tmp / f"W_dec_{s}.safetensors") as file:
                    save_file({f"W_dec_{s}": self.stored_decoders(s).detach().contiguous().cpu()}, file)
        return Path(folder)


def is_clt_folder(folder) -> bool:
    """Whether ``folder`` holds a CLT in circuit-tracer's layout."""
    folder = Path(folder)
    if not (folder / "W_enc_0.safetensors").exists() or not (folder / "W_dec_0.safetensors").exists():
        return False
    config = folder / "config.yaml"
    return not config.exists() or yaml.safe_load(config.read_text()).get(
        "model_kind", MODEL_KIND) == MODEL_KIND


def load(folder, *, device="cpu", dtype: torch.dtype | None = None, lazy: bool = False,
         config: dict | None = None) -> CrossLayerTranscoder:
    """Read a CLT folder (circuit-tracer's layout, see the module docstring).

    Args:
        folder: the folder.
        device, dtype: where and in what dtype to hold the weights (default: as stored).
        lazy: keep the decoders on disk and read them when used (for CLTs larger than memory).
        config: the settings of ``config.yaml`` when the folder has none (or to override it).

    Raises:
        CircuitlabError: for a missing or inconsistent file, naming it.
    """
    folder = Path(folder)
    file = folder / "config.yaml"
    settings = yaml.safe_load(file.read_text()) if file.exists() else {}
    settings.update(config or {})
    n_layers = 0
    while (folder / f"W_enc_{n_layers}.safetensors").exists():
        n_layers += 1
    if not n_layers:
        raise CircuitlabError(f"{folder} holds no CLT: W_enc_0.safetensors is missing. A CLT "
                              "folder has W_enc_<layer> and W_dec_<layer> safetensors per layer.")
    layers = []
    for s in range(n_layers):
        with safe_open(folder / f"W_enc_{s}.safetensors", "pt", device=str(device)) as f:
            layers.append({k.rsplit("_", 1)[0]: f.get_tensor(k) for k in f.keys()})
    first = layers[0]
    d_sae, d_model = first["W_enc"].shape
    activation = settings.get("activation") or ("jumprelu" if "threshold" in first else "relu")
    activation = {"jump_relu": "jumprelu"}.get(activation, activation)
    dtype = dtype or first["W_enc"].dtype
    clt = CrossLayerTranscoder(
        n_layers, d_model, d_sae, activation=activation, k=settings.get("k"),
        skip="W_skip" in first, model_name=settings.get("model_name"),
        hook_in=settings.get("feature_input_hook", "hook_mlp_in"),
        hook_out=settings.get("feature_output_hook", "hook_mlp_out"),
        window=settings.get("window"), dtype=dtype, device=device)
    with torch.no_grad():
        for s, layer in enumerate(layers):
            missing = {"W_enc", "b_enc", "b_dec"} - set(layer)
            if missing or layer["W_enc"].shape != (d_sae, d_model):
                raise CircuitlabError(
                    f"{folder}/W_enc_{s}.safetensors lacks {sorted(missing)} or has W_enc of "
                    f"shape {tuple(layer['W_enc'].shape)} (layer 0: {(d_sae, d_model)}).")
            clt.W_enc[s] = layer["W_enc"].T
            clt.b_enc[s], clt.b_dec[s] = layer["b_enc"], layer["b_dec"]
            if clt.threshold is not None:
                clt.threshold[s] = layer["threshold"]
            if clt.W_skip is not None:
                clt.W_skip[s] = layer["W_skip"].T
            dec = folder / f"W_dec_{s}.safetensors"
            if not dec.exists():
                raise CircuitlabError(f"{dec} is missing: every layer of a CLT needs its decoders.")
            with safe_open(dec, "pt", device=str(device)) as f:
                shape = tuple(f.get_slice(f"W_dec_{s}").get_shape())
                if shape != (d_sae, clt.n_out(s), d_model):
                    raise CircuitlabError(f"{dec} holds W_dec_{s} of shape {shape}; expected "
                                          f"{(d_sae, clt.n_out(s), d_model)}.")
                if not lazy:
                    clt.W_dec[s] = torch.nn.Parameter(f.get_tensor(f"W_dec_{s}").to(dtype),
                                                      requires_grad=False)
    if lazy:
        clt.W_dec = torch.nn.ParameterList()
        clt.lazy_folder = folder
    return clt
