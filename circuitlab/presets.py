"""Presets as plain data: the known models and transcoder sets, their shapes, and where
the bundled transcoders live.

Nothing here loads anything (only the standard library is imported), so any floor may read
the names: ``circuitlab.loading`` resolves models and transcoders with them,
``circuitlab.sizing`` sizes them, and the card store finds the bundled set's examples with
``is_bundled``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

GiB = 2 ** 30

#: Bundled transcoders and cards: ``circuitlab/data`` in an installed copy, the repository's
#: top-level ``data/`` in a checkout.
DATA_DIR = next(p for p in (Path(__file__).resolve().parent / "data",
                            Path(__file__).resolve().parent.parent / "data") if p.is_dir())
BUNDLE_DIR = DATA_DIR / "transcoders"

# --------------------------------------------------------------------------- sources

EMBEDDED_MODEL = "gemma-3-270m"

#: Model presets: short name -> Hugging Face id.
MODEL_PRESETS = {
    "gemma-3-270m": "google/gemma-3-270m",
    "gemma-2-2b": "google/gemma-2-2b",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
}

#: SAE-Lens transcoder releases: name -> (model preset, sae_id for a layer).
TRANSCODER_PRESETS = {
    "gemma-scope-2-270m-pt-transcoders-all": (
        "gemma-3-270m",
        lambda layer: f"layer_{layer}_width_16k_l0_small_affine",
    ),
    "gemma-scope-2b-pt-transcoders": ("gemma-2-2b", None),  # sae_id chosen from the directory
    "mwhanna-qwen3-0.6b-transcoders-lowl0": ("qwen3-0.6b", lambda layer: f"layer_{layer}"),
}

#: Public CLTs: name (the hub reference) -> the Hugging Face id of their model.
CLT_PRESETS = {
    # circuit-tracer's README ("Available transcoders"); their config.yaml names the residual
    # before the pre-MLP norm as their input (hooks.RESID_MID_HOOKS).
    "mntss/clt-gemma-2-2b-426k": "google/gemma-2-2b",
    "mntss/clt-gemma-2-2b-2.5M": "google/gemma-2-2b",
    "mntss/clt-llama-3.2-1b-524k": "meta-llama/Llama-3.2-1B",
    # Gemma Scope 2 (SAE-Lens names the model from the repository: gemma-scope-2 -> gemma-3,
    # without "-pt" for 270m).
    "google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine": "google/gemma-3-270m",
    "google/gemma-scope-2-1b-pt/clt/width_262k_l0_medium_affine": "google/gemma-3-1b-pt",
}

#: Default bundled transcoder set per embedded model: a cross-layer transcoder (see
#: data/README.md).
DEFAULT_BUNDLE = {"gemma-3-270m": "gemma-3-270m-clt-skip-jumprelu"}

#: Bundled sets whose files have left the package: name -> the last commit of the
#: repository that holds them. They still load by name once restored into ``BUNDLE_DIR``.
RETIRED_BUNDLES = {"gemma-3-270m-skip-jumprelu": "314b98c"}

#: The description file of a ``circuitlab pack`` folder.
PACK_FILE = "pack.json"


def is_pack(path) -> bool:
    """Whether ``path`` is a folder written by ``circuitlab pack``."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / PACK_FILE).is_file()


def is_bundled(source) -> bool:
    """Whether a transcoder source is a bundled set: its name (``DEFAULT_BUNDLE`` or
    ``RETIRED_BUNDLES``) or the path of a folder in ``BUNDLE_DIR``."""
    if source is None:
        return False
    return bundle_folder(source) is not None or Path(source).parent.resolve() == BUNDLE_DIR.resolve()


def bundle_folder(source) -> Path | None:
    """The folder of the bundled set ``source`` names (it may be missing for a retired
    set), or ``None`` when ``source`` is no bundled set's name."""
    if isinstance(source, str) and (source in DEFAULT_BUNDLE.values() or source in RETIRED_BUNDLES):
        return BUNDLE_DIR / source
    return None


def restore_command(name: str) -> str:
    """The git command that brings the retired bundled set ``name`` back from history."""
    files = f"data/transcoders/{name} data/transcoders/{name}-cards.safetensors"
    return f"git checkout {RETIRED_BUNDLES[name]} -- {files}"


# --------------------------------------------------------------------------- shapes

#: Named machines for planning: (size in bytes, torch device type).
DEVICE_SIZES = {"t4": (15 * GiB, "cuda"), "cpu24": (24 * GiB, "cpu"), "h100": (80 * GiB, "cuda")}


@dataclass(frozen=True)
class ModelShape:
    """The shapes that size a TransformerLens model (``HookedTransformer`` parameter layout)."""

    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    n_ctx: int                    # TransformerLens' context (sizes the rotary tables)
    sandwich_norms: bool = False  # post-attention and post-MLP norms (Gemma 2 and 3)
    qk_norm: bool = False         # per-head query and key norms (Gemma 3, Qwen3)

    def n_params(self) -> int:
        """Parameters and buffers of the ``HookedTransformer``: untied W_E and W_U, b_U, the
        zero attention and MLP biases TransformerLens keeps, gated MLPs, RMS norm weights
        and each layer's rotary sin/cos tables (``min(n_ctx, 2048)`` rows of ``d_head``) and
        its scalar ``IGNORE`` buffer."""
        d, dh, H, kv = self.d_model, self.d_head, self.n_heads, self.n_kv_heads
        attn = 2 * H * d * dh + 2 * kv * d * dh + H * dh + 2 * kv * dh + d
        mlp = 3 * d * self.d_mlp + self.d_mlp + d
        norms = d * (4 if self.sandwich_norms else 2) + (2 * dh if self.qk_norm else 0)
        rotary = 2 * min(self.n_ctx, 2048) * dh + 1
        return 2 * self.d_vocab * d + self.d_vocab + d + self.n_layers * (attn + mlp + norms + rotary)

    def copied_params(self, skip: bool) -> int:
        """Parameters the attribution's backward copies in its own dtype (value and output
        matrices, transcoder skip matrices)."""
        d = self.d_model
        return self.n_layers * ((self.n_heads + self.n_kv_heads) * self.d_head * d + (d * d if skip else 0))


#: Preset model shapes. Sources: each model's published config.json (hidden_size,
#: intermediate_size, vocab_size, num_attention_heads, head_dim, num_key_value_heads,
#: num_hidden_layers); TransformerLens 3.9 ``loading_from_pretrained.py`` hard-codes the same
#: values for gemma-3-270m, gemma-2-2b and llama-3.2-1b (and n_ctx 8192, 8192 and 2048 there);
#: for Qwen3 it reads config.json and sets n_ctx 2048.
MODEL_SHAPES = {
    # google/gemma-3-270m config.json; TL: "google/gemma-3-270m" branch.
    "gemma-3-270m": ModelShape(18, 640, 2048, 262144, 4, 256, 1, 8192, sandwich_norms=True,
                               qk_norm=True),
    # google/gemma-2-2b config.json; TL: "google/gemma-2-2b" branch.
    "gemma-2-2b": ModelShape(26, 2304, 9216, 256000, 8, 256, 4, 8192, sandwich_norms=True),
    # Qwen/Qwen3-0.6B config.json (head_dim 128, 8 KV heads); TL: Qwen3ForCausalLM, n_ctx 2048.
    "qwen3-0.6b": ModelShape(28, 1024, 3072, 151936, 16, 128, 8, 2048, qk_norm=True),
    # meta-llama/Llama-3.2-1B config.json; TL: "Llama-3.2-1B" branch (n_ctx capped at 2048).
    "llama-3.2-1b": ModelShape(16, 2048, 8192, 128256, 32, 64, 8, 2048),
}


@dataclass(frozen=True)
class TranscoderShape:
    """Transcoders of ``width`` features per layer (``cross_layer``: one CLT), a ``d x d`` skip
    matrix or not, a JumpReLU threshold or not, and ``l0``, the typical number of active
    features per token and layer that sizes an attribution. A CLT's features write into
    ``window`` layers from their own on (``None``: every later layer)."""

    width: int
    skip: bool
    jumprelu: bool
    l0: float
    label: str
    cross_layer: bool = False
    window: int | None = None

    def n_params(self, d_model: int, n_layers: int = 1, lazy: bool = False) -> int:
        """Parameters over ``n_layers`` layers: per layer W_enc, b_enc, b_dec, threshold, W_skip;
        a decoder per layer, or for a CLT per layer and each later or equal one it writes into
        (``L (L + 1) / 2`` without a window; none when ``lazy``: they stay on disk)."""
        per_layer = (d_model * self.width + self.width + d_model + (self.width if self.jumprelu else 0)
                     + (d_model * d_model if self.skip else 0))
        span = self.window or n_layers
        decoders = (0 if lazy else sum(min(span, n_layers - s) for s in range(n_layers))) \
            if self.cross_layer else n_layers
        return n_layers * per_layer + decoders * self.width * d_model


#: L0 assumed where a transcoder set publishes none.
ASSUMED_L0 = 64.0

#: Transcoder sets by name. Sources: SAE-Lens 6.54 ``pretrained_saes.yaml`` (ids, per-layer
#: L0) and its loaders (architecture), and the model cards named below.
TRANSCODER_SHAPES = {
    # Gemma Scope 2: ids layer_N_width_16k_l0_small_affine (16,384 features, JumpReLU, an
    # affine skip connection); pretrained_saes.yaml gives L0 10-20 per layer, 17.9 on average.
    "gemma-scope-2-270m-pt-transcoders-all": TranscoderShape(
        16384, True, True, 17.9, "Gemma Scope 2, 16,384 wide"),
    # Gemma Scope 2B transcoders: width_16k (16,384, JumpReLU, no skip); loading picks the L0
    # closest to 100 per layer, which pretrained_saes.yaml lists as 5-95, 39.2 on average.
    "gemma-scope-2b-pt-transcoders": TranscoderShape(
        16384, False, True, 39.2, "Gemma Scope, 16,384 wide"),
    # mwhanna/qwen3-0.6b-transcoders-lowl0: plain ReLU transcoders (SAE-Lens loads them as
    # "transcoder"), W_enc [163840, 1024] per layer file; no L0 published ("lowl0").
    "mwhanna-qwen3-0.6b-transcoders-lowl0": TranscoderShape(
        163840, False, False, ASSUMED_L0, "mwhanna lowl0, 163,840 wide"),
    # circuit-tracer's "llama" set, mntss/transcoder-Llama-3.2-1B: ReLU skip transcoders of
    # 131,072 features (16 layers of 2 x 131072 x 2048 bf16 weights: the repository's ~16 GiB);
    # no SAE-Lens release: load its downloaded folder (config.yaml). No L0 published.
    "mntss/transcoder-Llama-3.2-1B": TranscoderShape(
        131072, True, False, ASSUMED_L0, "circuit-tracer llama, 131,072 wide"),
    # CLTs (``CLT_PRESETS``), no L0 published; mntss's: no W_skip (load_clt reads none).
    # 426k: 26 x 16,384 (SAE-Lens 6.54's mntss_clt_layer test), no threshold known; 2.5M: 98,304
    # a layer (its users); 524k: 16 x 32,768, headers W_enc_L, threshold_L, W_dec_L [., 16 - L, .].
    "mntss/clt-gemma-2-2b-426k": TranscoderShape(
        16384, False, False, ASSUMED_L0, "circuit-tracer CLT, 16,384 wide", cross_layer=True),
    "mntss/clt-gemma-2-2b-2.5M": TranscoderShape(
        98304, False, False, ASSUMED_L0, "circuit-tracer CLT, 98,304 wide", cross_layer=True),
    "mntss/clt-llama-3.2-1b-524k": TranscoderShape(
        32768, False, True, ASSUMED_L0, "circuit-tracer CLT, 32,768 wide", cross_layer=True),
    # Gemma Scope 2 (JumpReLU, "_affine" skip), estimated: 262144 // L a layer gives the 1b
    # (26 layers, d 1152, float32) the 30.37 GiB its width_262k folder is reported to hold.
    "google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine": TranscoderShape(
        262144 // 18, True, True, ASSUMED_L0, "Gemma Scope 2 CLT, ~14,563 wide", cross_layer=True),
    "google/gemma-scope-2-1b-pt/clt/width_262k_l0_medium_affine": TranscoderShape(
        262144 // 26, True, True, ASSUMED_L0, "Gemma Scope 2 CLT, ~10,082 wide", cross_layer=True),
}

#: The transcoders ``plan`` assumes for a model when none are named (the embedded model's
#: bundle; for the others the set named in the README).
PLAN_TRANSCODERS = {
    "gemma-3-270m": DEFAULT_BUNDLE["gemma-3-270m"],
    "gemma-2-2b": "gemma-scope-2b-pt-transcoders",
    "qwen3-0.6b": "mwhanna-qwen3-0.6b-transcoders-lowl0",
    "llama-3.2-1b": "mntss/transcoder-Llama-3.2-1B",
}
