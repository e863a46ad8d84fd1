"""A Hugging Face hub cache written in the hub's own on-disk layout, for tests (no network).

``huggingface_hub`` keeps every downloaded repository as (see ``file_download.py``:
``repo_folder_name``, ``_get_pointer_path``, ``_hf_hub_download_to_cache_dir``)::

    $HF_HOME/hub/models--ORG--NAME/
        refs/main                    the commit hash main points at (no newline)
        blobs/<etag>                 file contents; the etag is the sha256 of an LFS file,
                                     the git blob sha1 of any other
        snapshots/<commit>/<path>    relative symlinks to ../../blobs/<etag>

With ``HF_HUB_OFFLINE=1``, ``hf_hub_download(repo, path)`` reads ``refs/main`` and returns
the snapshot path, so transformers' ``from_pretrained``, TransformerLens and SAE-Lens's
loaders read these repositories as if they had downloaded them. ``offline_hub`` points the
libraries at such a cache (``HF_HOME``) and replaces the one SAE-Lens call that needs the
network even when the file is cached (see ``tests/test_hub.py``).

Repositories written here: the real ``google/gemma-3-270m`` (the embedded GGUF dequantized)
with random Gemma Scope 2 transcoders (``write_gemma_3``), and tiny random models with
transcoders in the GemmaScope and circuit-tracer / mwhanna layouts (``write_tiny``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.file_download import repo_folder_name
from safetensors import safe_open
from safetensors.torch import save_file
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Qwen3Config

from circuitlab.loading import embedded_hf_model

#: Files the hub stores through git LFS (their etag is the content's sha256).
LFS_SUFFIXES = (".safetensors", ".npz", ".bin", ".gguf", ".model")

GEMMA_3 = "google/gemma-3-270m"
GEMMA_SCOPE_2 = "google/gemma-scope-2-270m-pt"
GEMMA_SCOPE_2_RELEASE = "gemma-scope-2-270m-pt-transcoders-all"
#: Gemma Scope 2's folder for layer L (the id circuitlab's preset asks SAE-Lens for).
GEMMA_SCOPE_2_FOLDER = "transcoder_all/layer_{layer}_width_16k_l0_small_affine"
#: A tiny Gemma 2 (its own repo id: TransformerLens hard-codes gemma-2-2b's sizes).
TINY_GEMMA_2 = "circuitlab-tests/tiny-gemma-2"
GEMMASCOPE = "google/gemma-scope-2b-pt-transcoders"
GEMMASCOPE_RELEASE = "gemma-scope-2b-pt-transcoders"
#: TransformerLens only loads its official names, so the tiny Qwen 3 takes Qwen3-0.6B's id.
QWEN_3 = "Qwen/Qwen3-0.6B"
MWHANNA = "mwhanna/qwen3-0.6b-transcoders-lowl0"
MWHANNA_RELEASE = "mwhanna-qwen3-0.6b-transcoders-lowl0"

#: The GemmaScope loader fixes these shapes from the repo id ("2b") and folder ("width_16k").
GEMMA_2_2B_D_MODEL, WIDTH_16K = 2304, 16384


# ------------------------------------------------------------------------ the cache layout


@dataclass
class HubCache:
    """A temporary ``HF_HOME`` and the transcoder parameters stored in its hub cache.

    Attributes:
        home: the ``HF_HOME`` (the cache is ``home/hub``).
        params: per transcoder set (``"gemmascope"``, ``"mwhanna"``, ``"gemma-scope-2"``),
            per layer, the tensors as stored in the files.
    """

    home: Path
    params: dict



def _etag(path: Path) -> str:
    """The hub's etag of a file: sha256 for LFS files, the git blob sha1 otherwise."""
    if path.suffix in LFS_SUFFIXES:
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_repo(home: Path, repo_id: str, files: dict[str, Path | str | bytes]) -> Path:
    """Store ``files`` (repo path -> a file to move in, text or bytes) as the ``main``
    snapshot of model repo ``repo_id`` in the hub cache of ``home`` (an ``HF_HOME``).

    Returns:
        The snapshot folder (what ``snapshot_download`` returns).
    """
    storage = Path(home) / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=storage, prefix=".incoming."))
    entries = []
    for i, (rel, content) in enumerate(sorted(files.items())):
        tmp = staged / f"{i}{Path(rel).suffix}"
        if isinstance(content, Path):
            shutil.move(content, tmp)
        else:
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        etag = _etag(tmp)
        blob = storage / "blobs" / etag
        if blob.exists():
            tmp.unlink()
        else:
            os.replace(tmp, blob)
        entries.append((rel, etag))
    staged.rmdir()
    commit = hashlib.sha1("".join(f"{r}\0{e}\n" for r, e in entries).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for rel, etag in entries:
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(storage / "blobs" / etag, pointer.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def write_pretrained(home: Path, repo_id: str, model, tokenizer) -> Path:
    """``model.save_pretrained`` and ``tokenizer.save_pretrained`` into repo ``repo_id``."""
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {str(p.relative_to(tmp)): p for p in Path(tmp).rglob("*") if p.is_file()}
        return write_repo(home, repo_id, files)


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{tmp}/t.safetensors")
        return Path(f"{tmp}/t.safetensors").read_bytes()


# --------------------------------------------------------------------- going offline


def cached_safetensors_shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
    """Offline ``sae_lens...get_safetensors_tensor_shapes``: the tensor shapes from the
    header of the cached file (the original reads the header with HTTP range requests)."""
    with safe_open(hf_hub_download(repo_id, filename), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def patch_sae_lens() -> None:
    """In a fresh process (a notebook's kernel) whose environment points ``HF_HOME`` at a
    cache written here: replace SAE-Lens's one network-only call (see ``offline_hub``)."""
    pretrained_sae_loaders.get_safetensors_tensor_shapes = cached_safetensors_shapes


def _no_network(*args, **kwargs):
    raise OSError("tests/hub_cache.offline_hub: no network in the hub tests")


@contextmanager
def offline_hub(home: Path):
    """Point huggingface_hub (hence transformers, TransformerLens, SAE-Lens) at the cache in
    ``home`` with ``HF_HUB_OFFLINE=1``, and make sure nothing reaches the network."""
    mp = pytest.MonkeyPatch()
    try:
        hub = str(Path(home) / "hub")
        for var, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")):
            mp.setenv(var, value)
        # huggingface_hub reads these environment variables once, at import.
        mp.setattr(constants, "HF_HOME", str(home))
        mp.setattr(constants, "HF_HUB_CACHE", hub)
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(pretrained_sae_loaders, "get_safetensors_tensor_shapes",
                   cached_safetensors_shapes)
        mp.setattr(socket.socket, "connect", _no_network)
        yield Path(home)
    finally:
        mp.undo()


# ----------------------------------------------------------- real model: Gemma 3 270M


def write_gemma_3(home: Path, d_sae: int = 64, seed: int = 0) -> list[dict]:
    """``google/gemma-3-270m`` (the embedded GGUF dequantized, as ``save_pretrained``
    writes it) and random Gemma Scope 2 JumpReLU affine transcoders of width ``d_sae`` for
    its 18 layers in ``google/gemma-scope-2-270m-pt``.

    Returns:
        Per layer, the transcoder's tensors as stored (Gemma Scope 2 names and layout).
    """
    hf_model, tokenizer = embedded_hf_model()
    write_pretrained(home, GEMMA_3, hf_model, tokenizer)
    d, n_layers = hf_model.config.hidden_size, hf_model.config.num_hidden_layers
    del hf_model
    g = torch.Generator().manual_seed(seed)
    files, params = {}, []
    for layer in range(n_layers):
        # Gemma Scope 2 params.safetensors: w_enc [d_in, d_sae], w_dec [d_sae, d_out],
        # affine_skip_connection [d_in, d_out] (SAE-Lens transposes it into W_skip).
        p = {"w_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5 * 4,
             "w_dec": torch.randn(d_sae, d, generator=g) / d_sae ** 0.5,
             "b_enc": 0.1 * torch.randn(d_sae, generator=g),
             "b_dec": 0.1 * torch.randn(d, generator=g),
             "threshold": 0.5 * torch.rand(d_sae, generator=g),
             "affine_skip_connection": torch.randn(d, d, generator=g) / d}
        params.append(p)
        folder = GEMMA_SCOPE_2_FOLDER.format(layer=layer)
        files[f"{folder}/params.safetensors"] = _safetensors(p)
        files[f"{folder}/config.json"] = json.dumps({
            "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "width": d_sae,
            "type": "transcoder", "affine_connection": True,
            "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
            "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        }, indent=1)
    write_repo(home, GEMMA_SCOPE_2, files)
    return params


# ------------------------------------------------------------------------ tiny models


def _perturb_norms(model, seed: int):
    """Random norm weights (transformers initializes them to the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_gemma_2(tokenizer, n_layers: int = 2, seed: int = 0):
    """A random Gemma 2 of GemmaScope's width (2304, fixed by SAE-Lens's loader), otherwise
    tiny: 2 layers (one sliding-window, one global), 2 heads of 16, MLP 32, a char vocab."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=GEMMA_2_2B_D_MODEL, intermediate_size=32,
        num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16, max_position_embeddings=64, sliding_window=8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _perturb_norms(model, seed)


def tiny_qwen_3(tokenizer, n_layers: int = 3, seed: int = 0):
    """A random tiny Qwen 3 (d_model 32, GQA, qk-norm, tied embeddings)."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return _perturb_norms(model, seed)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def write_gemmascope(home: Path, n_layers: int, n_live: int = 64, seed: int = 1) -> list[dict]:
    """GemmaScope transcoders (``google/gemma-scope-2b-pt-transcoders``): per SAE id
    ``layer_L/width_16k/average_l0_X`` a ``params.npz`` of ``W_enc [2304, 16384]``,
    ``W_dec [16384, 2304]``, ``b_enc``, ``b_dec``, ``threshold`` (JumpReLU, no skip).

    SAE-Lens fixes the shapes from the names, so the files are full size; only the first
    ``n_live`` features have weights (the rest never fire), which compresses the npz to a
    few hundred KB. Every width-16k id of a layer points at the layer's one blob.

    Returns:
        Per layer, the stored arrays.
    """
    d, d_sae = GEMMA_2_2B_D_MODEL, WIDTH_16K
    g = torch.Generator().manual_seed(seed)
    files, params = {}, []
    ids = get_pretrained_saes_directory()[GEMMASCOPE_RELEASE].saes_map
    for layer in range(n_layers):
        p = {"W_enc": np.zeros((d, d_sae), np.float32), "W_dec": np.zeros((d_sae, d), np.float32),
             "b_enc": np.zeros(d_sae, np.float32), "b_dec": (0.1 * torch.randn(d, generator=g)).numpy(),
             "threshold": np.ones(d_sae, np.float32)}
        p["W_enc"][:, :n_live] = (2 * torch.randn(d, n_live, generator=g) / d ** 0.5).numpy()
        p["W_dec"][:n_live] = (torch.randn(n_live, d, generator=g) / n_live ** 0.5).numpy()
        p["b_enc"][:n_live] = (0.1 * torch.randn(n_live, generator=g)).numpy()
        p["threshold"][:n_live] = (0.3 * torch.rand(n_live, generator=g)).numpy()
        params.append(p)
        data = _npz(p)
        for sae_id, path in ids.items():
            if sae_id.startswith(f"layer_{layer}/width_16k/"):
                files[f"{path}/params.npz"] = data
    write_repo(home, GEMMASCOPE, files)
    return params


def write_mwhanna(home: Path, d_model: int, n_layers: int, d_sae: int = 48, seed: int = 2) -> list[dict]:
    """mwhanna's Qwen 3 transcoders (``mwhanna/qwen3-0.6b-transcoders-lowl0``), readable both
    ways the hub repo is: by circuit-tracer (``config.yaml`` listing ``hf://`` URIs of
    per-layer safetensors) and by SAE-Lens's ``mwhanna_transcoder`` loader (which reads
    ``wandb-config.yaml`` for the sizes and ``config.yaml`` for the model name).
    ``layer_L.safetensors``: ``W_enc [d_sae, d_model]``, ``W_dec [d_sae, d_model]``,
    ``b_enc``, ``b_dec`` (ReLU, no skip).

    Returns:
        Per layer, the stored tensors.
    """
    g = torch.Generator().manual_seed(seed)
    files, params = {}, []
    for layer in range(n_layers):
        p = {"W_enc": torch.randn(d_sae, d_model, generator=g) / d_model ** 0.5,
             "W_dec": torch.randn(d_sae, d_model, generator=g) / d_sae ** 0.5,
             "b_enc": 0.1 * torch.randn(d_sae, generator=g) - 0.1,
             "b_dec": 0.1 * torch.randn(d_model, generator=g)}
        params.append(p)
        files[f"layer_{layer}.safetensors"] = _safetensors(p)
    files["config.yaml"] = yaml.safe_dump({
        "model_name": QWEN_3, "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "scan": MWHANNA,
        "transcoders": [f"hf://{MWHANNA}/layer_{layer}.safetensors" for layer in range(n_layers)],
    }, sort_keys=False)
    files["wandb-config.yaml"] = yaml.safe_dump({
        "d_model": {"value": d_model}, "d_feature": {"value": d_sae}, "batch_size": {"value": 4096}})
    write_repo(home, MWHANNA, files)
    return params


def write_tiny(home: Path, tokenizer) -> dict:
    """The tiny repositories: a Gemma 2 with GemmaScope transcoders and a Qwen 3 with
    mwhanna's (circuit-tracer) transcoders.

    Returns:
        ``{"gemmascope": [...], "mwhanna": [...]}``: the stored transcoder parameters.
    """
    gemma2 = tiny_gemma_2(tokenizer)
    write_pretrained(home, TINY_GEMMA_2, gemma2, tokenizer)
    qwen3 = tiny_qwen_3(tokenizer)
    write_pretrained(home, QWEN_3, qwen3, tokenizer)
    return {
        "gemmascope": write_gemmascope(home, gemma2.config.num_hidden_layers),
        "mwhanna": write_mwhanna(home, qwen3.config.hidden_size, qwen3.config.num_hidden_layers),
    }


def hooked_gemma_2(repo_id: str = TINY_GEMMA_2) -> tuple[HookedTransformer, object]:
    """A Gemma 2 from the hub cache as a ``HookedTransformer``, unprocessed.

    TransformerLens loads only its official names and hard-codes gemma-2-2b's sizes, so the
    transformers model is loaded from the hub here (``from_pretrained``, offline) and
    converted by TransformerLens's own Gemma 2 config and weight conversion, resized.

    Returns:
        ``(hooked, hf_model)``.
    """
    hf_model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(repo_id, add_bos_token=True)
    c = hf_model.config
    cfg_dict = tl_loading.convert_hf_model_config("google/gemma-2-2b")
    cfg_dict.update(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
        window_size=c.sliding_window, eps=c.rms_norm_eps,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
        attn_scale=c.query_pre_attn_scalar ** 0.5, tokenizer_name=None,
        model_name=repo_id.split("/")[-1], init_weights=False, dtype=torch.float32)
    cfg = HookedTransformerConfig(**cfg_dict)
    state = tl_loading.get_pretrained_state_dict("google/gemma-2-2b", cfg, hf_model=hf_model)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("IGNORE", "mask", "rotary_sin", "rotary_cos")) for k in missing), missing
    return model.eval(), hf_model


# ------------------------------------------------------------ cross-layer transcoders

#: Tiny CLT repositories: circuit-tracer's layout (config.yaml at the root, W_enc_<layer> and
#: W_dec_<layer> safetensors, as mntss's), the same reading hook_resid_mid, Gemma Scope 2's
#: CLT folder layout, and a circuit-tracer config listing those Gemma Scope 2 files (as
#: circuit-tracer's mwhanna/gemma-scope-2-*/clt/* repositories do).
TINY_CLT = "circuitlab-tests/tiny-clt"
TINY_CLT_RESID_MID = "circuitlab-tests/tiny-clt-resid-mid"
TINY_GEMMA_SCOPE_2 = "circuitlab-tests/gemma-scope-2-tiny-pt"
TINY_GEMMA_SCOPE_2_CT = "circuitlab-tests/gemma-scope-2-tiny-ct"
TINY_CLT_FOLDER = "clt/width_16_l0_medium_affine"


def gemma_scope_2_clt_params(n_layers: int, d_model: int, d_sae: int = 16, seed: int = 3) -> list[dict]:
    """Random Gemma Scope 2 CLT tensors per layer, as its ``params_layer_<layer>.safetensors``
    store them: ``w_enc [d, d_sae]``, ``w_dec [d_sae, n_layers, d]`` (every layer, the ones
    before the source included), ``b_enc``, ``b_dec``, ``threshold``,
    ``affine_skip_connection [d_in, d_out]``."""
    g = torch.Generator().manual_seed(seed)
    d = d_model
    return [{"w_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5 * 2,
             "w_dec": torch.randn(d_sae, n_layers, d, generator=g) / d_sae ** 0.5,
             "b_enc": 0.1 * torch.randn(d_sae, generator=g),
             "b_dec": 0.1 * torch.randn(d, generator=g),
             "threshold": 0.3 * torch.rand(d_sae, generator=g),
             "affine_skip_connection": torch.randn(d, d, generator=g) / d}
            for _ in range(n_layers)]


def write_tiny_clts(home: Path, clt) -> dict:
    """The tiny CLT repositories (``TINY_CLT`` ...) in the hub cache of ``home``: ``clt`` (a
    ``CrossLayerTranscoder``) saved in circuit-tracer's layout, and random Gemma Scope 2 CLT
    files of its layers and width.

    Returns:
        ``{"clt": clt, "gemma-scope-2": [per layer tensors]}``.
    """
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        folder = clt.save(Path(tmp) / "clt")
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_repo(home, TINY_CLT, files)
    config = yaml.safe_load(files["config.yaml"])
    resid_mid = {**config, "feature_input_hook": "hook_resid_mid"}
    write_repo(home, TINY_CLT_RESID_MID, {**files, "config.yaml": yaml.safe_dump(resid_mid)})
    params = gemma_scope_2_clt_params(clt.n_layers, clt.d_model)
    gs2 = {f"{TINY_CLT_FOLDER}/params_layer_{s}.safetensors": _safetensors(p)
           for s, p in enumerate(params)}
    gs2[f"{TINY_CLT_FOLDER}/config.json"] = json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-tiny-pt", "type": "clt",
        "affine_connection": True,
        "hf_hook_point_in": "model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.{layer}.post_feedforward_layernorm.output"})
    write_repo(home, TINY_GEMMA_SCOPE_2, gs2)
    uris = [f"hf://{TINY_GEMMA_SCOPE_2}/{TINY_CLT_FOLDER}/params_layer_{s}.safetensors"
            for s in range(clt.n_layers)]
    write_repo(home, TINY_GEMMA_SCOPE_2_CT, {f"{TINY_CLT_FOLDER}/config.yaml": yaml.safe_dump({
        "model_name": "google/gemma-3-tiny", "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": uris + uris[-1:]})})  # the last file twice, as in some such configs
    return {"clt": clt, "gemma-scope-2": params}
