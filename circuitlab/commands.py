"""What each ``circuitlab`` command does (the parser is ``circuitlab.cli``)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from . import checks
from .attribution import attribute
from .batch import read_prompts, slug, trace_many
from .cards import find_examples
from .clt import is_clt_folder
from .clt import load as load_clt
from .errors import CircuitlabError
from .files import atomic_write_text, cache_dir
from .loading import load, load_model, load_transcoders
from .precision import check_device, fast_bf16
from .presets import is_pack
from .quantize import quantize_folder
from .sizing import plan as make_plan
from .sizing import table as plan_table
from .train.build_cards import build_examples, relabel
from .train.clt_trainer import train_clt
from .train.corpus import build_corpus
from .train.data import check_corpus
from .train.evaluate import evaluate_transcoders, format_table
from .train.finetune import finetune_transcoders
from .train.pack import pack_inputs
from .train.trainer import train_transcoders
from .viz.state import node_name

#: What ``trace`` writes into its folder.
OUTPUTS = ("graph", "pruned", "neuronpedia.json", "graph.html")


def trace(args) -> None:
    """``circuitlab trace``: attribute a prompt, write both graphs, Neuronpedia JSON and HTML."""
    out = Path(args.out) if args.out else Path("out") / slug(args.prompt)
    written = [out / name for name in OUTPUTS]
    if not args.force and any(p.exists() for p in written):
        raise CircuitlabError(
            f"{out} already holds a traced graph; pass --force to replace it, or choose another "
            "folder with --out.")
    if out.is_file():
        raise CircuitlabError(f"--out {out} is a file; pass a folder.")
    device = check_device(args.device)
    t0 = time.perf_counter()
    rm = load(args.model, args.transcoders, device=device)
    t1 = time.perf_counter()
    graph = attribute(rm, args.prompt, max_feature_nodes=args.max_feature_nodes)
    t2 = time.perf_counter()
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    graph.save(out / "graph")
    pruned.save(out / "pruned")
    pruned.to_neuronpedia(out / "neuronpedia.json")
    pruned.to_html(out / "graph.html", rm)
    print(f"\nPrompt: {args.prompt!r}  ({len(graph.tokens)} tokens)")
    print(f"Loaded {rm} in {t1 - t0:.1f} s; attribution took {t2 - t1:.1f} s.\n")
    logits = graph.nodes[graph.nodes["kind"] == "logit"]
    print("Logit targets:")
    for r in logits.itertuples():
        print(f"  {r.token!r:>14}  p={r.prob:.3f}")
    for name, g in (("full", graph), ("pruned", pruned)):
        s = g.scores()
        counts = g.nodes["kind"].value_counts().to_dict()
        print(f"\n{name:>6} graph: {len(g.nodes)} nodes ({counts.get('feature', 0)} features), "
              f"{g.n_edges} edges; replacement {s['replacement']:.3f}, "
              f"completeness {s['completeness']:.3f}")
    feats = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(args.top, "influence")
    examples = find_examples(rm)[0]
    print("\nMost influential features (name, layer/feature @ position):")
    for r in feats.to_dict("records"):
        print(f"  {node_name(r, graph.labels, examples)[:40]:<40}  L{r['layer']}/F{r['feature']} @ {r['pos']} "
              f"{r['token']!r:>8}  act={r['activation']:7.2f}  influence={r['influence']:.4f}")
    print(f"\nWrote {out}/graph, {out}/pruned, {out}/neuronpedia.json and {out}/graph.html "
          "(open it in a browser: it works offline)")


def trace_batch(args) -> None:
    """``circuitlab trace-batch``: trace the prompts of a file into ``--out``, then print the
    summary: wall time, prompts per second, failures and a line per prompt."""
    prompts = read_prompts(args.prompts)
    begun, t0 = datetime.now(timezone.utc).isoformat(timespec="microseconds"), time.perf_counter()
    summary = trace_many(prompts, args.model, args.transcoders, out=args.out, engine=args.engine,
                         address=args.address, workers=args.workers,
                         gpus_per_worker=args.gpus_per_worker, save=args.save,
                         node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                         device=args.device, retries=args.retries,
                         max_feature_nodes=args.max_feature_nodes)
    wall = time.perf_counter() - t0
    traced = int((summary["finished"] >= begun).sum())
    failed = summary[summary["status"] != "ok"]
    print(f"\nPrompts traced: {traced} in {wall:.1f} s ({traced / wall:.3f} prompts/s, start-up "
          f"included); already traced in {args.out}: {len(summary) - traced}; failed: "
          f"{len(failed)}.")
    for r in failed.itertuples():
        print(f"  failed {r.id}: {r.error}")
    ok = summary[summary["status"] == "ok"]
    table = pd.DataFrame({
        "id": ok["id"], "top target": [repr(t[0]) if len(t) else "" for t in ok["targets"]],
        "p": [p[0] if len(p) else float("nan") for p in ok["probs"]],
        "features": ok["features_pruned"], "replacement": ok["replacement_pruned"],
        "top feature": [f[0][:40] if len(f) else "" for f in ok["top_features"]],
        "seconds": ok["seconds"]})
    if len(table):
        print("\nPruned graphs:\n" + table.to_string(index=False, float_format="{:.3f}".format))
    print(f"\nWrote {args.out}/<id>/ and {args.out}/summary.parquet")


def corpus(args) -> None:
    """``circuitlab corpus``: build the offline training corpus and its evaluation splits."""
    tokenizer = None if args.tokenizer == "none" else load_model(args.tokenizer).tokenizer
    t0 = time.perf_counter()
    out = build_corpus(args.out, tokens=args.tokens, seed=args.seed, prose_tokens=args.prose_tokens,
                       tokenizer=tokenizer)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    langs = ", ".join(f"{lang} {share:.1%}" for lang, share in manifest["languages"].items())
    print(f"Wrote {out} in {time.perf_counter() - t0:.0f} s: {manifest['tokens']:,} tokens "
          f"({langs}), prose split {manifest['prose']['tokens']:,} tokens")


def command(args) -> str:
    """The command line as typed, for manifests."""
    return "circuitlab " + " ".join(sys.argv[1:] if args.argv is None else args.argv)


def corpus_dir(args) -> Path:
    """``--corpus``; else the ``--model`` pack, or the corpus ``circuitlab corpus`` builds."""

    if args.corpus:
        return Path(args.corpus)
    return Path(args.model) if is_pack(getattr(args, "model", "")) else cache_dir() / "corpus"


def pack(args) -> None:
    """``circuitlab pack``: compact training inputs for an offline GPU host."""
    print(pack_inputs(args.out, corpus_dir(args), tokens=args.tokens, shard_mb=args.shard_mb,
                      verify=not args.no_verify, command=command(args)))


def model_dtype(args):
    """``--model-dtype`` as a torch dtype; ``auto`` is bfloat16 where bf16 is fast."""


    if args.model_dtype == "auto":
        return torch.bfloat16 if fast_bf16(getattr(args, "device", "cpu")) else torch.float32
    return getattr(torch, args.model_dtype)


def train(args) -> None:
    """``circuitlab train``: train one transcoder per layer, or a cross-layer one (``--clt``)."""
    if args.clt and args.layers:
        raise CircuitlabError("--clt trains a cross-layer transcoder over all layers; drop "
                              "--layers.")
    clt_only = [f"--{n.replace('_', '-')}" for n in ("window", "k_start", "k_anneal_tokens")
                if getattr(args, n) is not None]
    if clt_only and not args.clt:
        raise CircuitlabError(f"{', '.join(clt_only)} set the cross-layer training; add --clt "
                              "or drop them.")
    if args.lr is not None:
        checks.number("--lr", args.lr, 0, low_open=True)
    names = ("width", "k", "tokens", "time_budget", "context", "batch_tokens", "buffer_tokens",
             "passes", "lr", "seed", "device", "checkpoint_every", "init_from", "bf16")
    if args.clt:
        names += ("window", "k_start", "k_anneal_tokens")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.layers:
        kwargs["layers"] = layer_list(args.layers)
    corpus = corpus_dir(args)
    check_corpus(corpus)  # before the model loads: a missing or empty corpus fails at once
    model = load_model(args.model, device=check_device(args.device), dtype=model_dtype(args))
    run = train_clt if args.clt else train_transcoders
    print(run(model, corpus, args.out, resume=not args.fresh, command=command(args), **kwargs))


def layer_list(text: str) -> list[int]:
    """``--layers``: comma-separated layer numbers.

    Raises:
        CircuitlabError: naming the part that is not an integer.
    """
    layers = []
    for part in text.split(","):
        try:
            layers.append(int(part))
        except ValueError:
            raise CircuitlabError(f"--layers {text}: {part.strip()!r} is not a layer number; "
                                  "pass comma-separated integers such as 0,3,5.") from None
    return layers


def finetune(args) -> None:
    """``circuitlab finetune``: fine-tune transcoder decoders on the spliced-in KL."""
    model = load_model(args.model, device=check_device(args.device))
    names = ("tokens", "time_budget", "context", "batch_rows", "kl_positions", "lr", "fvu_coef",
             "seed", "device", "checkpoint_every")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    print(finetune_transcoders(model, args.transcoders, corpus_dir(args), args.out,
                               resume=not args.fresh, command=command(args), **kwargs))


def evaluate(args) -> None:
    """``circuitlab eval-transcoders``: FVU, L0, dead share and spliced-in CE, per split."""
    device = check_device(args.device)
    model = load_model(args.model, device=device)
    if is_clt_folder(args.transcoders):
        tcs = load_clt(args.transcoders, device=device)
    else:
        tcs = load_transcoders(args.transcoders, args.model, model.cfg.n_layers, device=device)
    result = evaluate_transcoders(model, tcs, corpus_dir(args), tokens=args.tokens,
                                  split=args.split, per_layer=args.per_layer)
    print(format_table(result))
    if args.json:
        def record(df):
            return {"layers": df.to_dict("records"), **df.attrs}

        doc = ({"splits": {split: record(df) for split, df in result.items()}}
               if isinstance(result, dict) else record(result))
        atomic_write_text(args.json, json.dumps(doc, indent=1, default=float))


def quantize(args) -> None:
    """``circuitlab quantize``: the 8-bit twin of a folder of transcoders."""
    report = quantize_folder(args.transcoders, args.out, command=command(args))
    before = sum(r["bytes_before"] for r in report.values())
    after = sum(r["bytes_after"] for r in report.values())
    error = max(r["relative_error"] for r in report.values())
    print(f"Wrote {len(report)} layers to {args.out}: {after / 1e6:.1f} MB of weights "
          f"(from {before / 1e6:.1f} MB); rounding changed each matrix by at most "
          f"{error:.1%} of its norm")


def cards(args) -> None:
    """``circuitlab cards``: precompute feature cards and labels over held-out text."""
    device = check_device(args.device)
    t0 = time.perf_counter()
    model = load_model(args.model, device=device, dtype=model_dtype(args))
    rm = load(model, args.transcoders, device=device)
    if args.labels_only:
        path = relabel(rm, args.out)
        print(f"Relabelled {path} in {time.perf_counter() - t0:.0f} s")
        return
    path = build_examples(rm, args.corpus, tokens=args.tokens, context=args.context,
                          batch_size=args.batch_size, out=args.out, n_top=args.top,
                          per_band=args.per_band, command=command(args))
    size = path.stat().st_size / 1e6
    print(f"Wrote {path} ({size:.1f} MB) in {time.perf_counter() - t0:.0f} s")


def plan(args) -> None:
    """``circuitlab plan``: memory of a model, its transcoders and one attribution on a device,
    from shapes alone; or, with ``--table``, the README's table."""
    if args.table:
        print(plan_table(tokens=args.tokens, max_feature_nodes=args.max_feature_nodes))
        return
    transcoders = args.transcoders
    if transcoders is not None and transcoders.isdigit():
        transcoders = int(transcoders)
    p = make_plan(args.model, transcoders, tokens=args.tokens, device=args.device,
                  max_feature_nodes=args.max_feature_nodes, dtype=args.dtype)
    print(p)
    if not p.fits:
        print(f"To make it fit: {p.fixes()}.")
