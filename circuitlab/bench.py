"""``make bench``: attribution, intervention and explorer speed on the embedded model.

Runs each attribution configuration in a fresh subprocess (so peak RSS is per
configuration) and prints a markdown table: seconds, feature nodes, edges, rows recomputed,
peak RSS and the memory `estimate_memory` expects (prompts up to 2,000 tokens).
Then times the tools around a graph on a 10-token prompt: an intervention in each mode,
generation, ``validate``, opening the explorer and the HTML export. Uses the bundled
transcoders, or random JumpReLU skip transcoders of the same shape (calibrated to fire
``k`` features per token) when no bundle exists, or any transcoder source ``load`` reads
(``--transcoders``, e.g. a cross-layer transcoder's folder).

    python -m circuitlab.bench [--dtype auto|float32|bfloat16] [--random | --transcoders SOURCE]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
from sae_lens import SAE

from .attribution import _copied_params, attribute, estimate_memory
from .hooks import mlp_io
from .interventions import ablate
from .loading import BUNDLE_DIR, DEFAULT_BUNDLE, load, load_model
from .precision import default_dtype
from .replacement import ReplacementModel
from .validation import validate
from .viz.state import ViewState

BASE = ("The quick brown fox jumps over the lazy dog while the farmer counts sheep in the "
        "green valley near the old stone bridge, and children sing songs about rivers, "
        "mountains, cities and the long roads that connect them across the wide land. In the "
        "evening the lights of the town come on one by one, the bakery closes its doors, and "
        "travellers stop at the inn to rest before the next day of their journey north")
CONFIGS = [(10, 8192), (30, 8192), (60, 8192), (250, 8192), (1000, 8192), (2000, 8192),
           (10, None)]


def random_transcoders(model, width: int = 2048, k: int = 48, seed: int = 0):
    """JumpReLU skip transcoders with random weights, thresholds set so that about ``k``
    features fire per token on ``BASE``."""
    g = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    x, _ = mlp_io(model, model.to_tokens(BASE))
    out = []
    for layer in range(model.cfg.n_layers):
        tc = SAE.from_dict({
            "architecture": "jumprelu_skip_transcoder", "d_in": d, "d_sae": width, "d_out": d,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
            "metadata": {"hook_name": f"blocks.{layer}.hook_mlp_in",
                         "hook_name_out": f"blocks.{layer}.hook_mlp_out"}})
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(d, width, generator=g) / d ** 0.5)
            tc.W_dec.copy_(torch.randn(width, d, generator=g) / width ** 0.5)
            tc.W_skip.copy_(torch.randn(d, d, generator=g) / d)
            pre = x[layer, 0, 1:] @ tc.W_enc
            tc.threshold.copy_(torch.quantile(pre, 1 - k / width, dim=0).clamp_min(1e-3))
        out.append(tc)
    return out


def prompt_of(n_tokens: int, tokenizer) -> str:
    """A prefix of ``BASE`` (repeated as often as needed) with ``n_tokens`` tokens
    including BOS."""
    ids = tokenizer.encode(BASE, add_special_tokens=False)
    ids = (ids + tokenizer.encode(". ", add_special_tokens=False)) * (n_tokens // len(ids) + 1)
    return tokenizer.decode(ids[: n_tokens - 1])


def run_one(n_tokens: int, max_nodes: int | None, dtype: str, source) -> dict:
    rm = _model(source)
    prompt = prompt_of(n_tokens, rm.tokenizer)
    attribute(rm, prompt[:20], max_feature_nodes=64, progress=False)  # warm-up
    start = time.perf_counter()
    graph = attribute(rm, prompt, max_feature_nodes=max_nodes, progress=False,
                      dtype=None if dtype == "auto" else getattr(torch, dtype))
    seconds = time.perf_counter() - start
    return {"tokens": len(graph.tokens), "max_feature_nodes": max_nodes, "seconds": round(seconds, 2),
            "active_features": graph.metadata["n_active_features"],
            "feature_nodes": int((graph.nodes["kind"] == "feature").sum()),
            "edges": graph.n_edges, "transcoders": rm.transcoder_source,
            "recomputed_rows": graph.metadata["recomputed_rows"],
            "estimate_gb": round(_estimate(rm, graph, max_nodes, dtype) / 2**30, 2),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _estimate(rm, graph, max_nodes, dtype: str) -> int:
    """``estimate_memory`` for this attribution, as ``attribute`` checks it."""
    n_logits = int((graph.nodes["kind"] == "logit").sum())
    dt = default_dtype("cpu") if dtype == "auto" else getattr(torch, dtype)
    return estimate_memory(graph.metadata["n_active_features"], len(graph.tokens), rm.n_layers,
                           max_nodes, n_logits, rm.d_model, 128, dt, _copied_params(rm),
                           rm.cfg.n_heads)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 2)


def run_tools(dtype: str, source) -> dict:
    """Seconds for the interventions and the explorer on a graph of a 10-token prompt."""
    rm = _model(source)
    prompt = prompt_of(10, rm.tokenizer)
    graph = attribute(rm, prompt, progress=False,
                      dtype=None if dtype == "auto" else getattr(torch, dtype))
    feats = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(10, "influence")["node_id"].tolist()
    out = {f"intervene ({mode}, 10 features)": _timed(lambda m=mode: rm.intervene(prompt, ablate(feats), m))
           for mode in ("free", "frozen-attention", "constrained")}
    out["generate (20 new tokens, greedy)"] = _timed(lambda: rm.generate(prompt, ablate(feats), 20))
    out["validate (n=20 edges)"] = _timed(lambda: validate(graph, rm, n=20))
    pruned = graph.prune()
    out["explorer state of the pruned graph"] = _timed(lambda: ViewState(pruned, rm=rm))
    with tempfile.TemporaryDirectory() as tmp:
        out["to_html of the pruned graph"] = _timed(lambda: pruned.to_html(f"{tmp}/g.html", rm))
    return out


def _model(source):
    """``source``: ``True`` for random transcoders, ``False`` for the bundle, or a source for ``load``."""
    if source is not True:
        return load("gemma-3-270m", source or None)
    model = load_model("gemma-3-270m")
    return ReplacementModel(model, random_transcoders(model), name="gemma-3-270m",
                            transcoder_source="random")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="backward dtype; auto is attribute()'s default")
    parser.add_argument("--random", action="store_true", help="random transcoders, even with a bundle")
    parser.add_argument("--transcoders", default=None,
                        help="a transcoder source for load() instead of the bundle")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--tools", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    source = args.random or args.transcoders or not (
        BUNDLE_DIR / DEFAULT_BUNDLE["gemma-3-270m"]).exists()
    flags = ["--random"] if source is True else ["--transcoders", source] if source else []
    if args.one:
        n, m = int(args.one[0]), None if args.one[1] == "all" else int(args.one[1])
        print(json.dumps(run_one(n, m, args.dtype, source)))
        return
    if args.tools:
        print(json.dumps(run_tools(args.dtype, source)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, dtype {args.dtype}")
    print("| tokens | max_feature_nodes | active features | feature nodes | edges | rows recomputed "
          "| seconds | peak RSS (GB) | estimate (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, m in CONFIGS:
        cmd = [sys.executable, "-m", "circuitlab.bench", "--one", str(n), str(m or "all"),
               "--dtype", args.dtype] + flags
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"| {r['tokens']} | {r['max_feature_nodes'] or 'all'} | {r['active_features']} | "
              f"{r['feature_nodes']} | {r['edges']} | {r['recomputed_rows']} | {r['seconds']} | "
              f"{r['peak_rss_gb']} | {r['estimate_gb']} |", flush=True)
    print(f"transcoders: {r['transcoders']}\n")
    cmd = [sys.executable, "-m", "circuitlab.bench", "--tools", "--dtype", args.dtype] + flags
    tools = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print("| on a 10-token prompt | seconds |\n|---|---|")
    for name, seconds in tools.items():
        print(f"| {name} | {seconds} |")


if __name__ == "__main__":
    main()
