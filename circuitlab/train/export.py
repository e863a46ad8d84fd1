"""Export of trained transcoders as SAE-Lens folders with a sha256 manifest.

Each layer is converted to an SAE-Lens ``JumpReLUSkipTranscoder``: feature ``f``'s
threshold is set so that, on a calibration sample, the JumpReLU fires on exactly as many
tokens as the TopK selected ``f`` (per-feature quantile matching). Folders
``out_dir/layer_XX/`` hold ``cfg.json`` and ``sae_weights.safetensors`` (matrices in
bfloat16, vectors in float32; SAE-Lens casts to the cfg's float32 on load), and
``out_dir/manifest.json`` lists their sha256; the whole set is swapped in at once.
``export_clt`` does the same for a cross-layer transcoder's folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from sae_lens import SAE

from circuitlab.clt import CrossLayerTranscoder
from circuitlab.files import atomic_dir, sha256
from circuitlab.train.sparse import Active, decode, jump_active, matching_thresholds
from circuitlab.train.topk import TopKTranscoders

#: Manifest entries of an earlier run that a run started from its output records under
#: ``init_from`` (with the earlier folder's path).
HISTORY = ("command", "tokens_seen", "tokens_read", "steps", "seconds", "init_from")


def to_jumprelu(state: TopKTranscoders, i: int, x: torch.Tensor, y: torch.Tensor, k: int,
                metadata: dict) -> tuple[SAE, dict]:
    """Layer ``i`` of ``state`` as an SAE-Lens ``JumpReLUSkipTranscoder`` (float32, CPU).

    Weights are rounded to bfloat16 (as saved) before the thresholds are set, on the raw
    calibration activations ``x, y [N, d]``, so that each feature fires on as many tokens
    as the TopK selected it.

    Returns:
        The transcoder and calibration stats: ``fvu_topk``, ``fvu_jumprelu``,
        ``l0_jumprelu``, ``dead_share`` (features the JumpReLU never fires on the sample).
    """
    p = {n: v[i].detach().float().cpu() for n, v in state.params.items()}
    s_in, s_out = float(state.scale_in[i]), float(state.scale_out[i])
    # Real space, activations scaled by s_out so decoder rows keep unit norm.
    w = {"W_enc": p["W_enc"].T * (s_out / s_in), "b_enc": p["b_enc"] * s_out,
         "W_dec": p["W_dec"], "W_skip": p["W_skip"] * (s_out / s_in), "b_dec": p["b_dec"] * s_out}
    w = {n: v.to(torch.bfloat16).float() if v.ndim == 2 else v for n, v in w.items()}
    x, y = x.float().cpu(), y.float().cpu()
    pre = x @ w["W_enc"] + w["b_enc"]
    w["threshold"], topk = matching_thresholds(pre, k)
    jump = jump_active(pre, w["threshold"])
    base = x @ w["W_skip"].T + w["b_dec"] - y
    variance = (y - y.mean(0)).pow(2).sum()

    def fvu(a: Active) -> float:
        return float((decode(a, a.pre.relu(), w["W_dec"]) + base).pow(2).sum() / variance)

    d_sae, d = w["W_dec"].shape
    sae = SAE.from_dict({"architecture": "jumprelu_skip_transcoder", "d_in": d, "d_sae": d_sae,
                         "d_out": d, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": False, "metadata": metadata})
    sae.load_state_dict({n: v.contiguous() for n, v in w.items()})
    stats = {"fvu_topk": fvu(topk), "fvu_jumprelu": fvu(jump),
             "l0_jumprelu": len(jump.feats) / len(x),
             "dead_share": 1 - len(jump.feats.unique()) / d_sae}
    return sae, stats


def save_transcoder(sae: SAE, folder: Path) -> None:
    """``sae.save_model(folder)`` with matrices stored in bfloat16 (cfg dtype stays float32)."""
    def to_bf16(state_dict):
        for name, value in state_dict.items():
            if value.ndim == 2:
                state_dict[name] = value.to(torch.bfloat16)

    sae.process_state_dict_for_saving = to_bf16
    sae.save_model(folder)


def export_layers(saes: dict[int, SAE], out_dir: Path, manifest: dict) -> None:
    """Write each ``saes[layer]`` to ``out_dir/layer_XX/`` (``save_transcoder``) and
    ``manifest`` (plus the files' sha256 under ``"sha256"``) to ``out_dir/manifest.json``, all
    swapped in at once: a reader sees the previous complete export or the new one, never a
    mix. Other entries of ``out_dir`` (the checkpoint folder) are kept.
    """
    names = {f"layer_{layer:02d}" for layer in saes} | {"manifest.json"}
    with atomic_dir(out_dir, "the previous export is intact.", carry_except=names) as tmp:
        files = {}
        for layer, sae in saes.items():
            folder = tmp / f"layer_{layer:02d}"
            folder.mkdir()
            save_transcoder(sae, folder)
            for f in sorted(folder.iterdir()):
                files[f"{folder.name}/{f.name}"] = sha256(f)
        (tmp / "manifest.json").write_text(json.dumps({"sha256": files, **manifest}, indent=1),
                                           encoding="utf-8")


def export_clt(clt: CrossLayerTranscoder, out_dir: Path, manifest: dict) -> None:
    """Write ``clt`` to ``out_dir`` (``CrossLayerTranscoder.save``) and ``manifest`` (plus the
    files' sha256 under ``"sha256"``) to ``out_dir/manifest.json``, all swapped in at once, as
    ``export_layers`` does. Other entries of ``out_dir`` (the checkpoint folder) are kept."""
    names = {"config.yaml", "manifest.json"} | {
        f"W_{kind}_{l}.safetensors" for kind in ("enc", "dec") for l in range(clt.n_layers)}
    with atomic_dir(out_dir, "the previous export is intact.", carry_except=names) as tmp:
        clt.save(tmp / ".clt")
        for f in sorted((tmp / ".clt").iterdir()):
            os.replace(f, tmp / f.name)
        (tmp / ".clt").rmdir()
        files = {n: sha256(tmp / n) for n in sorted(names - {"manifest.json"})}
        (tmp / "manifest.json").write_text(json.dumps({"sha256": files, **manifest}, indent=1),
                                           encoding="utf-8")
