"""``make bench``: attribution, intervention and explorer speed on the embedded model.

Runs each attribution configuration in a fresh subprocess (so peak RSS is per
configuration) and prints a markdown table: seconds, feature nodes, edges, rows recomputed,
peak RSS and the memory `estimate_memory` expects (prompts up to 2,000 tokens).
Then times the tools around a graph on a 10-token prompt: an intervention in each mode,
generation, ``validate``, opening the explorer and the HTML export. With ``--memory`` it
instead measures, each in a fresh subprocess, the peak memory above the loaded model of
forward passes (``ReplacementModel.run``) of long prompts and of graphs that keep every
active feature, against what ``attribute`` estimates for them before refusing (the RSS
high-water mark, reset after loading on Linux). Uses the bundled
transcoders, or random JumpReLU skip transcoders of the same shape (calibrated to fire
``k`` features per token) when no bundle exists, or any transcoder source ``load`` reads
(``--transcoders``, e.g. a cross-layer transcoder's folder).

    python -m circuitlab.bench [--dtype auto|float32|bfloat16] [--random | --transcoders SOURCE]
    python -m circuitlab.bench --memory
    python -m circuitlab.bench --training
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch
from sae_lens import SAE

from . import attribution as _attribution
from .attribution import attribute, copied_params
from .hooks import mlp_io
from .interventions import ablate
from .loading import load, load_model
from .memory import estimate_memory, forward_parts, replacement_shape, trace_bytes
from .precision import default_dtype
from .presets import BUNDLE_DIR, DEFAULT_BUNDLE
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
#: ``--memory``: (what, tokens, max_feature_nodes): forward passes alone, and graphs.
MEMORY_CONFIGS = [("forward", 200, None), ("forward", 800, None), ("forward", 1600, None),
                  ("graph", 10, None), ("graph", 16, None)]


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
    """What ``attribute`` checks for this attribution: the larger of the forward pass and the
    attribution with the trace it leaves (``estimate_memory``)."""
    n_logits = int((graph.nodes["kind"] == "logit").sum())
    dt = default_dtype("cpu") if dtype == "auto" else getattr(torch, dtype)
    N, P = graph.metadata["n_active_features"], len(graph.tokens)
    shape, kw = replacement_shape(rm)
    return max(sum(forward_parts(P, shape, **kw).values()),
               estimate_memory(N, P, rm.n_layers, max_nodes, n_logits, rm.d_model, 128, dt,
                               copied_params(rm), rm.cfg.n_heads,
                               trace=trace_bytes(P, N, shape, kw["itemsize"])))


def _rss(key: str = "VmRSS") -> int | None:
    """This process's ``VmRSS`` (or ``VmHWM``, its high-water mark) in bytes; ``None`` where
    ``/proc`` has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux: ``/proc/self/clear_refs``); whether it was."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(what: str, n_tokens: int, max_nodes: int | None, source=False,
                   dtype: str = "auto") -> dict:
    """Peak memory above the loaded model (after a warm-up) of ``rm.run`` (``what="forward"``)
    or of ``attribute`` (``"graph"``) on a prompt of ``n_tokens``, with what ``attribute``
    estimates for it: ``forward_parts`` for a forward pass; for a graph, the larger of that
    and the attribution's ``memory_parts`` with its trace, as ``attribute`` checked them.
    Run it in a fresh process: the high-water mark is the process's."""
    rm = _model(source)
    prompt = prompt_of(n_tokens, rm.tokenizer)
    tokens = rm.tokenize(prompt)
    shape, kw = replacement_shape(rm)
    if what == "forward":
        rm.run(rm.tokenize(prompt_of(8, rm.tokenizer)))  # warm-up
    else:
        attribute(rm, prompt_of(8, rm.tokenizer), max_feature_nodes=16, progress=False)
    gc.collect()
    base = _rss()
    exact = _reset_peak() and base is not None
    if not exact:  # the process's peak so far (loading) is a floor on what is measured
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    checked = []
    out = {"what": what, "tokens": len(tokens), "max_feature_nodes": max_nodes,
           "forward_estimate_gb": sum(forward_parts(len(tokens), shape, **kw).values()) / 2**30}
    start = time.perf_counter()
    if what == "forward":
        rm.run(tokens)
        out["estimate_gb"] = out["forward_estimate_gb"]
    else:
        check = _attribution.check_attribution

        def record(parts, *args, **kwargs):
            checked.append(dict(parts))
            return check(parts, *args, **kwargs)

        _attribution.check_attribution = record
        try:
            graph = attribute(rm, prompt, max_feature_nodes=max_nodes, progress=False,
                              dtype=None if dtype == "auto" else getattr(torch, dtype))
        finally:
            _attribution.check_attribution = check
        out["active_features"] = graph.metadata["n_active_features"]
        out["parts_gb"] = {k: round(v / 2**30, 3) for k, v in checked[0].items()}
        out["estimate_gb"] = max(out["forward_estimate_gb"], sum(checked[0].values()) / 2**30)
    peak = _rss("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.update(seconds=round(time.perf_counter() - start, 1), peak_gb=(peak - base) / 2**30,
               exact=exact)
    return out


def run_memory(source, flags: list[str], configs=MEMORY_CONFIGS) -> None:
    """Print ``measure_memory`` for ``configs``, each in a fresh subprocess."""
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; peak above the loaded model")
    print("| run | tokens | active features | peak (GiB) | estimate (GiB) | estimate / peak |")
    print("|---|---|---|---|---|---|")
    for what, n, m in configs:
        cmd = [sys.executable, "-m", "circuitlab.bench", "--memory-one", what, str(n),
               str(m or "all")] + flags
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                      text=True).stdout.strip().splitlines()[-1])
        run = "rm.run" if what == "forward" else f"graph, max_feature_nodes={m or 'all'}"
        print(f"| {run} | {r['tokens']} | {r.get('active_features', '')} | "
              f"{r['peak_gb']:.2f} | {r['estimate_gb']:.2f} | "
              f"{r['estimate_gb'] / r['peak_gb']:.2f} |", flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return round(time.perf_counter() - start, 2)


def run_tools(dtype: str, source) -> dict:
    """Seconds for the interventions, the explorer, head loadings and a QK table on a graph
    of a 10-token prompt."""
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
    out["head loadings of every edge of the pruned graph (6 heads each)"] = _timed(
        lambda: pruned.head_loadings(rm, top=6))
    out["QK table of one head (last layer, head 0, last query, first key)"] = _timed(
        lambda: rm.qk(prompt, rm.n_layers - 1, 0, -1, 0))
    return out


def run_training(steps: int = 3) -> list[dict]:
    """Seconds of one CLT training step (the median of ``steps`` after a warm-up) at the shape
    of the default CLT run on the embedded model: 18 layers, d_model 640, 1536 features per
    layer writing into 6 layers, k 32, 4,096 tokens a step, random activations."""
    from .train.clt_trainer import TopKCLT

    L, d, width, window, k, batch = 18, 640, 1536, 6, 32, 4096
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(L, batch, d, generator=g), torch.randn(L, batch, d, generator=g)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        state = TopKCLT.init(x[:, :1024], y[:, :1024], width, k, 1e-3, seed=0, window=window)
        times = []
        for _ in range(steps + 1):
            times.append(_timed(lambda: state.step(x, y, k, 64, 50_000, 1e-3, dtype)))
        rows.append({"dtype": str(dtype).split(".")[-1],
                     "decoder products": "sparse" if dtype == torch.float32 else "dense",
                     "seconds per step": round(sorted(times[1:])[len(times[1:]) // 2], 2),
                     "tokens/s": round(batch / sorted(times[1:])[len(times[1:]) // 2])})
        del state
    return rows


def _print_training() -> None:
    print("| CLT training step (18 layers x 1536 features, window 6, k 32, 4,096 tokens) "
          "| decoder products | seconds per step | tokens/s |\n|---|---|---|---|")
    for r in run_training():
        print(f"| {r['dtype']} | {r['decoder products']} | {r['seconds per step']} | {r['tokens/s']} |")


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
    parser.add_argument("--memory", action="store_true",
                        help="measured peak memory against the estimates, instead")
    parser.add_argument("--memory-one", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--training", action="store_true",
                        help="only the cross-layer transcoder training step")
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
    if args.memory_one:
        what, n, m = args.memory_one
        print(json.dumps(measure_memory(what, int(n), None if m == "all" else int(m), source,
                                        args.dtype)))
        return
    if args.memory:
        run_memory(source, flags + ["--dtype", args.dtype])
        return
    if args.training:
        print(f"machine: {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        _print_training()
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
    print()
    _print_training()


if __name__ == "__main__":
    main()
