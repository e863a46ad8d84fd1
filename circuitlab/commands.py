"""What each ``circuitlab`` command does (the parser is ``circuitlab.cli``)."""

from __future__ import annotations

import json
import re
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
from .targets import Feature, Logit
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


#: The ``--target`` forms, for error messages (``circuitlab trace --help`` shows examples).
TARGET_SPECS = ('TOKEN (its logit at the last position), TOKEN@POS (at position POS), '
                '"A"-"B" or "A"-"B"@POS (a logit difference, both tokens in double quotes) '
                'and feature:LAYER:POS:FEATURE')
_INT = r"-?\d+"


def target_spec(spec: str) -> Logit | Feature:
    """A ``--target`` as a ``Logit`` or ``Feature``: ``TOKEN``, ``TOKEN@POS``,
    ``"A"-"B"[@POS]`` or ``feature:LAYER:POS:FEATURE``. A token in double quotes is a JSON
    string.

    Raises:
        CircuitlabError: naming the spec, what is wrong with it and the accepted forms.
    """
    def bad(why: str) -> CircuitlabError:
        return CircuitlabError(f"--target {spec!r}: {why}. Accepted forms: {TARGET_SPECS}; "
                               "see circuitlab trace --help.")

    if spec.startswith("feature:"):
        parts = spec.split(":")[1:]
        if len(parts) != 3 or not all(re.fullmatch(_INT, x) for x in parts):
            raise bad("a feature target is feature:LAYER:POS:FEATURE, three integers")
        return Feature(*map(int, parts))
    body, pos = spec, -1
    at = re.search(rf"@({_INT})$", spec)
    if at and at.start() > 0:
        body, pos = spec[:at.start()], int(at.group(1))
    if not body.startswith('"'):
        if not body:
            raise bad("it names no token")
        return Logit(body, pos)
    first, rest = _quoted(body, bad)
    if not rest.strip():
        return Logit(first, pos)
    if not rest.lstrip().startswith("-"):
        raise bad(f"{rest.strip()!r} follows the quoted token; a difference is \"A\"-\"B\"")
    second, rest = _quoted(rest.lstrip()[1:].lstrip(), bad)
    if rest.strip():
        raise bad(f"{rest.strip()!r} follows the difference")
    return Logit((first, second), pos)


def _quoted(text: str, bad) -> tuple[str, str]:
    """The JSON string that starts ``text``, and what follows it."""
    if not text.startswith('"'):
        raise bad("write both tokens of a difference in double quotes")
    try:
        token, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        raise bad(f"{text!r} is not a token in double quotes ({err.msg})") from None
    if not token:
        raise bad('"" names no token')
    return token, text[end:]


def explain_item(text: str) -> int | str:
    """An ``--explain`` entry: an integer is an index among the completion's tokens, other
    text a token's text (in double quotes, a JSON string: ``"5"`` is the token 5)."""
    if re.fullmatch(_INT, text):
        return int(text)
    if text.startswith('"'):
        try:
            token = json.loads(text)
        except json.JSONDecodeError as err:
            raise CircuitlabError(f"--explain {text!r} is not a token in double quotes "
                                  f"({err.msg}); pass an index or a token's text.") from None
        if isinstance(token, str):
            return token
    return text


def trace_targets(args) -> dict:
    """``attribute``'s ``targets``, ``completion`` and ``explain`` from ``--target``,
    ``--completion`` and ``--explain``.

    Raises:
        CircuitlabError: for a bad spec, ``--explain`` without ``--completion``, or logit
            targets beside a completion (its tokens are the logit targets).
    """
    targets = [target_spec(s) for s in args.target or []] or None
    explain = [explain_item(e) for e in args.explain or []] or None
    if explain and args.completion is None:
        raise CircuitlabError("--explain picks tokens of the completion; add --completion TEXT.")
    logits = [s for s, t in zip(args.target or [], targets or []) if isinstance(t, Logit)]
    if args.completion is not None and logits:
        raise CircuitlabError(
            f"With --completion the logit targets are the completion's tokens (pick them with "
            f"--explain); drop --target {logits[0]!r}, or keep only feature:LAYER:POS:FEATURE "
            "targets.")
    return dict(targets=targets, completion=args.completion, explain=explain)


def trace(args) -> None:
    """``circuitlab trace``: attribute a prompt, write both graphs, Neuronpedia JSON and HTML."""
    wanted = trace_targets(args)  # before anything loads: a bad spec fails at once
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
    graph = attribute(rm, args.prompt, max_feature_nodes=args.max_feature_nodes, **wanted)
    t2 = time.perf_counter()
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    graph.save(out / "graph")
    pruned.save(out / "pruned")
    pruned.to_neuronpedia(out / "neuronpedia.json")
    pruned.to_html(out / "graph.html", rm)
    print(f"\nPrompt: {args.prompt!r}  ({len(graph.tokens)} tokens)")
    if args.completion is not None:
        print(f"Completion: {graph.prompt[len(args.prompt):]!r}")
    print(f"Loaded {rm} in {t1 - t0:.1f} s; attribution took {t2 - t1:.1f} s.\n")
    targets = graph.nodes[graph.target_mask.numpy()]
    logits = targets[targets["kind"] == "logit"]
    if len(logits):
        print("Logit targets:")
        for r in logits.itertuples():
            print(f"  {r.token!r:>14} @ {r.pos:<3}  p={r.prob:.3f}")
    features = targets[targets["kind"] == "feature"]
    if len(features):
        print("Feature targets:")
        for r in features.itertuples():
            print(f"  L{r.layer}/F{r.feature} @ {r.pos} {r.token!r}  act={r.activation:.2f}")
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
