"""Train one skip transcoder per layer of a TransformerLens model and export SAE-Lens folders.

Each transcoder maps the MLP input ``x`` (the pre-MLP norm output) to the MLP output ``y``
(``blocks.l.hook_mlp_out``). During training it is a TopK transcoder with an affine skip::

    y_hat = W_dec^T topk_k(W_enc x + b_enc) + W_skip x + b_dec

trained with Adam on the normalized MSE plus Gao et al.'s (2024) AuxK loss, which lets the
top ``aux_k`` dead latents (not fired in the last ``dead_tokens`` tokens) reconstruct the
residual error so they come back to life. Gradients are computed by hand with sparse
kernels (only the k selected decoder rows and encoder columns are touched per token), and
the dense encoder and skip products run in bfloat16 when ``bf16`` is set.

The data: documents are tokenized, packed into rows of ``context`` tokens that each start
with BOS, and run through the model once per batch for all layers (``mlp_io``); the
activation pairs (BOS positions dropped) go through a shuffled in-memory buffer and are
never written to disk.

At every checkpoint and at the end, each layer is converted to an SAE-Lens
``JumpReLUSkipTranscoder``: feature ``f``'s threshold is set so that, on a calibration
sample, the JumpReLU fires on exactly as many tokens as the TopK selected ``f``
(per-feature quantile matching). A JumpReLU lets the number of active features vary
from token to token, which costs a TopK-trained model some FVU, so the last
``jumprelu_share`` of training already runs these JumpReLUs (thresholds re-matched on
every buffer) and the weights adapt to them. Folders ``out_dir/layer_XX/`` hold ``cfg.json`` and
``sae_weights.safetensors`` (matrices in bfloat16, vectors in float32; SAE-Lens casts to
the cfg's float32 on load) and ``out_dir/manifest.json`` lists their sha256.

This module is the run (its settings, budgets, buffers, checkpoints and exports in turn);
the pieces live in ``data`` (token rows, activation buffers), ``topk`` (the model and its
Adam step), ``sparse`` (the kernels), ``export`` (SAE-Lens folders, manifest),
``checkpoints`` and ``schedule`` (budgets, learning rate).

Example::

    from circuitlab.loading import load_model
    from circuitlab.train.trainer import train_transcoders
    train_transcoders(load_model("gemma-3-270m"), "~/.cache/circuitlab/corpus", "out")
"""


from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitlab.errors import CircuitlabError
from circuitlab.files import machine
from circuitlab.memory import free_memory
from circuitlab.precision import fast_bf16
from circuitlab.train import K, WIDTH
from circuitlab.train.checkpoints import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from circuitlab.train.corpus import fingerprint_change
from circuitlab.train.data import TokenRows, activation_buffer, check_corpus
from circuitlab.train.export import HISTORY, export_layers, to_jumprelu
from circuitlab.train.schedule import Budgets, lr_at
from circuitlab.train.topk import TopKTranscoders

CALIBRATION_TOKENS = 16_384  # tokens used to set the JumpReLU thresholds


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a resumed run must share with its checkpoint."""

    model_name: str
    n_layers: int
    d_model: int
    layers: tuple[int, ...]
    width: int
    k: int
    aux_k: int
    dead_tokens: int
    context: int
    batch_tokens: int
    buffer_tokens: int
    passes: int
    lr: float
    jumprelu_share: float
    bf16: bool
    seed: int
    corpus: str
    init_from: str | None = None


def check_args(model: HookedTransformer, layers: list[int], width: int, k: int, aux_k: int,
               jumprelu_share: float, tokens: int, context: int, batch_tokens: int,
               buffer_tokens: int, passes: int, lr: float | None = None) -> None:
    """Refuse training settings that cannot work with ``model``, naming every problem."""
    n = model.cfg.n_layers
    problems = []
    if not layers or any(not 0 <= l < n for l in layers) or len(set(layers)) != len(layers):
        problems.append(f"layers={layers} must be distinct layers of the model, 0..{n - 1}")
    if not 1 <= k < width:
        problems.append(f"width={width}, k={k}: need 1 <= k < width")
    if aux_k < 0:
        problems.append(f"aux_k={aux_k} must be >= 0")
    if not 0 <= jumprelu_share <= 1:
        problems.append(f"jumprelu_share={jumprelu_share} must be in [0, 1]")
    if tokens < 1:
        problems.append(f"tokens={tokens} must be >= 1")
    if not 2 <= context <= model.cfg.n_ctx:
        problems.append(f"context={context} must be in 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if batch_tokens < 1 or buffer_tokens < batch_tokens:
        problems.append(f"need 1 <= batch_tokens ({batch_tokens}) <= buffer_tokens "
                        f"({buffer_tokens})")
    if passes < 1:
        problems.append(f"passes={passes} must be >= 1")
    if lr is not None and not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        problems.append(f"lr={lr!r} must be a finite number > 0, such as 3e-3")
    if problems:
        raise CircuitlabError("Bad training arguments: " + "; ".join(problems) + ".")


def train_transcoders(
    model: HookedTransformer,
    corpus,
    out_dir,
    *,
    layers=None,
    width: int = WIDTH,
    k: int = K,
    tokens: int = 2_000_000,
    time_budget: float | None = None,
    context: int = 128,
    batch_tokens: int = 4096,
    buffer_tokens: int = 65_536,
    passes: int = 1,
    lr: float = 3e-3,
    aux_k: int = 64,
    dead_tokens: int = 50_000,
    jumprelu_share: float = 0.1,
    device: str = "cpu",
    bf16: bool | None = None,
    seed: int = 0,
    checkpoint_every: float = 600.0,
    checkpoint_dir=None,
    resume: bool = True,
    init_from=None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train TopK skip transcoders on ``model``'s MLPs and export SAE-Lens JumpReLU ones.

    Args:
        model: the HookedTransformer (on any device; left unchanged).
        corpus: text for ``iter_documents`` (a built corpus, .txt, .jsonl, a folder).
        out_dir: output folder: ``layer_XX/`` SAE-Lens folders and ``manifest.json``.
        layers: layers to train (default all).
        width: features per layer.
        k: features active per token (TopK).
        tokens: budget of training tokens (BOS positions not counted; a token trained on in
            two passes counts twice), over all resumed runs.
        time_budget: wall-clock budget in seconds over all resumed runs (None: no limit).
        context: row length in tokens, BOS included.
        batch_tokens: tokens per optimizer step.
        buffer_tokens: size of the shuffled activation buffer.
        passes: times each buffer is trained on (reshuffled each time). On a CPU the model
            forward costs about as much as a pass of training, so 2 passes nearly double
            the optimizer steps per hour, each token being seen twice.
        lr: peak Adam learning rate.
        aux_k: dead features used by the AuxK loss per token (0 disables it).
        dead_tokens: a feature not selected in this many tokens counts as dead.
        jumprelu_share: the last share of training (by tokens or time, whichever is
            further along) runs the JumpReLU that will be exported instead of the TopK,
            with thresholds re-matched to the TopK firing counts on every buffer, so the
            weights adapt to its variable number of active features per token.
        device: where the transcoders train ("cpu", "cuda", ...).
        bf16: run the dense encoder and skip products in bfloat16 and keep the
            activation buffer in bfloat16 (master weights stay float32). None: where
            bf16 is fast (``fast_bf16``); a CPU without AVX-512 BF16 emulates it at
            about a quarter of float32's speed.
        seed: seed of the initialization and the shuffles.
        checkpoint_every: seconds between checkpoints (each also exports the bundle);
            checkpoints are taken when a buffer is used up.
        checkpoint_dir: checkpoint folder (default ``out_dir/checkpoint``).
        resume: continue from the checkpoint if there is one. The first start records a
            fingerprint of the corpus files (size, mtime, hashes of their ends); a resume
            after any of them changed is refused.
        init_from: warm start from exported transcoders of the same width (a folder of
            ``layer_XX/`` SAE-Lens folders, e.g. an earlier ``out_dir`` or the bundle)
            instead of the exemplar initialization. If its ``manifest.json`` says how many
            tokens it read from the same corpus with the same ``context``, training goes
            on from there, so it sees new text. Adam starts afresh: pass a lower ``lr``.
            The new manifest keeps the earlier one's command and budgets.
        progress: show a progress bar with tokens/s and the mean FVU over layers.
        command: the command to record in the manifest (default: a description of
            this call).

    Returns:
        ``out_dir``.

    Raises:
        CircuitlabError: for bad arguments, a width that does not fit in memory, a corpus
            without usable text or changed since the checkpoint, a checkpoint with other
            settings, or a full disk.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    bf16 = fast_bf16(device) if bf16 is None else bf16
    check_args(model, layers, width, k, aux_k, jumprelu_share, tokens, context, batch_tokens,
               buffer_tokens, passes, lr)
    out_dir = Path(out_dir).expanduser()
    if init_from is not None:
        init_from = Path(init_from).expanduser().resolve()
        earlier = check_init_from(init_from, layers, width, model.cfg.d_model)
    ckpt_dir = out_dir / "checkpoint" if checkpoint_dir is None else Path(checkpoint_dir)
    settings = Settings(
        model_name=model.cfg.model_name, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        layers=tuple(layers), width=width, k=k, aux_k=aux_k, dead_tokens=dead_tokens,
        context=context, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, passes=passes,
        lr=lr, jumprelu_share=jumprelu_share, bf16=bf16, seed=seed,
        corpus=str(Path(corpus).expanduser().resolve()),
        init_from=None if init_from is None else str(init_from))
    check_memory(settings, device)
    command = command or describe("train_transcoders", settings, out_dir, tokens, time_budget,
                                  device)
    history = None
    if init_from is not None:
        history = {"path": str(init_from), **{n: earlier[n] for n in HISTORY if n in earlier}}
    run = start_run(Run, model, settings, out_dir, ckpt_dir, device, tokens, time_budget,
                    checkpoint_every, command, history, resume)
    if run.state is None and history is not None and earlier.get("settings", {}).get(
            "corpus") == settings.corpus and earlier["settings"].get("context") == context:
        run.skip_rows(earlier.get("tokens_read", 0) // (context - 1))
    return run.train(progress)


def describe(function: str, settings: Settings, out_dir: Path, tokens: int, time_budget,
             device: str) -> str:
    """The call of ``function`` with ``settings``, as a manifest records a run's command."""
    return (f"{function}({settings.model_name!r}, {settings.corpus!r}, {str(out_dir)!r}, "
            f"tokens={tokens}, time_budget={time_budget}, device={device!r}, "
            + ", ".join(f"{n}={v!r}" for n, v in dataclasses.asdict(settings).items()
                        if n not in ("model_name", "n_layers", "d_model", "corpus")) + ")")


def start_run(run_class, model, settings: Settings, out_dir: Path, ckpt_dir: Path, device: str,
              tokens: int, time_budget, checkpoint_every: float, command: str,
              history: dict | None, resume: bool) -> "Run":
    """A ``run_class`` run, resumed from the checkpoint in ``ckpt_dir`` if there is one and
    ``resume`` is set (its state class is ``run_class.State``).

    A new run records the corpus's ``fingerprint`` in its counters; a resumed one checks it.
    """
    corpus = check_corpus(settings.corpus)
    state, counters = None, {"tokens_seen": 0, "steps": 0, "seconds": 0.0, "buffers": 0,
                             "docs_done": 0, "pending": [], "corpus_fingerprint": corpus}
    if resume and (ckpt_dir / CHECKPOINT_FILE).exists():
        tensors, counters = load_checkpoint(ckpt_dir, settings)
        _check_corpus_unchanged(counters, corpus, ckpt_dir)
        counters.setdefault("corpus_fingerprint", corpus)
        state = run_class.State.from_state_tensors(tensors, settings.lr, device)
    return run_class(model, settings, state, counters, out_dir, ckpt_dir, device, tokens,
                     time_budget, checkpoint_every, command, history)


def _check_corpus_unchanged(counters: dict, corpus: dict, ckpt_dir: Path) -> None:
    """Refuse to resume if the corpus differs from its fingerprint in the checkpoint's
    ``counters`` (checkpoints from before fingerprints have none: they are not checked, and
    record the corpus as it is now)."""
    change = fingerprint_change(counters.get("corpus_fingerprint", corpus), corpus)
    if change is not None:
        raise CircuitlabError(
            f"The corpus file {change} since the checkpoint in {ckpt_dir} was made, so "
            "resuming would not read on where training stopped. Restore the file, or pass "
            "--fresh (resume=False) to start over."
        )


def training_memory(settings: Settings) -> tuple[int, int]:
    """``(per_feature, fixed)``: estimated peak bytes of training ``settings`` are
    ``per_feature * width + fixed``.

    Per feature and layer: the float32 encoder row and decoder row with their gradients and
    Adam's two moments, ``b_enc`` and ``since_fired``; per feature, one layer's
    pre-activations (and a masked copy) over a batch or the calibration sample. Fixed: the
    skip matrices and ``b_dec`` likewise, and the activation buffer's inputs and outputs.
    """
    s, act_bytes = settings, 2 if settings.bf16 else 4
    L, d = len(s.layers), s.d_model
    rows = max(s.batch_tokens, min(CALIBRATION_TOKENS, s.buffer_tokens))
    per_feature = L * (2 * d * 16 + 16 + 8) + 2 * rows * 4
    fixed = L * (d * d + d) * 16 + 2 * L * s.buffer_tokens * d * act_bytes
    return per_feature, fixed


def check_memory(settings: Settings, device: str) -> None:
    """Refuse a width whose training would not fit in ``device``'s available memory.

    Raises:
        CircuitlabError: with the estimate and the largest width that fits.
    """
    per_feature, fixed = training_memory(settings)
    need, free = per_feature * settings.width + fixed, free_memory(device)
    if need <= free:
        return
    largest, gib = (free - fixed) // per_feature, 2 ** 30
    fix = (f"the largest width that fits is {largest}: pass it or less (--width)"
           if largest > settings.k else "no width fits: lower buffer_tokens (--buffer-tokens)")
    raise CircuitlabError(
        f"width={settings.width} does not fit in memory: training {len(settings.layers)} "
        f"layers of d_model={settings.d_model} with a buffer of {settings.buffer_tokens} tokens "
        f"needs about {need / gib:.2f} GiB, and {device} has {free / gib:.2f} GiB available; "
        f"{fix}, or train fewer layers (--layers)."
    )


def check_init_from(folder: Path, layers: list[int], width: int, d_model: int) -> dict:
    """Check that ``folder`` holds transcoders to warm-start ``layers`` at ``width``;
    return its ``manifest.json`` (empty if it has none)."""
    problems = []
    for layer in layers:
        cfg_path = folder / f"layer_{layer:02d}" / "cfg.json"
        if not cfg_path.is_file():
            problems.append(f"{cfg_path} is missing")
            continue
        cfg = json.loads(cfg_path.read_text())
        if (cfg.get("d_sae"), cfg.get("d_in")) != (width, d_model):
            problems.append(f"layer {layer} has d_sae={cfg.get('d_sae')}, d_in={cfg.get('d_in')}")
    if problems:
        raise CircuitlabError(
            f"Cannot warm-start from {folder}: {'; '.join(problems[:3])}. It needs one "
            f"layer_XX/ SAE-Lens folder per trained layer with d_sae={width} (pass its width) "
            f"and d_in={d_model} (the model's d_model)."
        )
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


class Run(Budgets):
    """One training run: the loop, its budgets, checkpoints and exports."""

    State = TopKTranscoders  # what checkpoints hold

    def __init__(self, model, settings: Settings, state, counters: dict, out_dir: Path,
                 ckpt_dir: Path, device: str, tokens: int, time_budget, checkpoint_every,
                 command: str, history: dict | None):
        self.model, self.s, self.state, self.counters = model, settings, state, counters
        self.out_dir, self.ckpt_dir, self.device = out_dir, ckpt_dir, device
        self.tokens, self.time_budget, self.checkpoint_every = tokens, time_budget, checkpoint_every
        self.command, self.history = command, history
        self.dtype = torch.bfloat16 if settings.bf16 else torch.float32
        self.started = time.monotonic()
        self.seconds_before = counters["seconds"]
        self.rows = TokenRows(model.tokenizer, settings.corpus, settings.context,
                              docs_done=counters["docs_done"], pending=counters["pending"])
        self.sample = None
        self.stopped = None
        self.last_fvu = None

    def skip_rows(self, n_rows: int) -> None:
        """Skip the first ``n_rows`` rows of the corpus (read by the run warm-started from)."""
        self.rows.skip(n_rows)
        self.counters.update(docs_done=self.rows.docs_done, pending=self.rows.pending)

    def train(self, show: bool) -> Path:
        if self.budget_reached() and (self.out_dir / "manifest.json").exists():
            return self.out_dir
        with tqdm(total=self.tokens, initial=min(self.counters["tokens_seen"], self.tokens),
                  unit="tok", unit_scale=True, disable=not show,
                  desc="Training transcoders") as bar:  # closed before an error is printed
            last_checkpoint = time.monotonic()
            while (self.state is None or not self.budget_reached()) and self._train_buffer(bar):
                if time.monotonic() - last_checkpoint >= self.checkpoint_every:
                    self.save()
                    last_checkpoint = time.monotonic()
        self.save()
        return self.out_dir

    def _fill(self, rows: TokenRows, number: int):
        """Buffer ``number``: ``x, y [L, N, d]`` from ``rows`` and one shuffle ``[N]`` per
        pass (None at the end of the corpus). Keeps a calibration sample of it."""
        s = self.s
        tokens = rows.take(max(1, s.buffer_tokens // (s.context - 1)))
        if not len(tokens):
            return None
        x, y = activation_buffer(self.model, tokens, list(s.layers),
                                 max(1, s.batch_tokens // s.context), self.dtype, self.device)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + number)
        perms = [torch.randperm(x.shape[1], generator=gen).to(x.device) for _ in range(s.passes)]
        self.sample = (x[:, perms[0][:CALIBRATION_TOKENS]], y[:, perms[0][:CALIBRATION_TOKENS]])
        return x, y, perms

    def _train_buffer(self, bar) -> bool:
        """Fill the buffer and train on it; False when the corpus is used up."""
        s, c = self.s, self.counters
        filled = self._fill(self.rows, c["buffers"])
        if filled is None:
            if self.state is None:
                raise CircuitlabError(
                    f"The corpus {s.corpus} has fewer than {s.context - 1} tokens after the "
                    f"{c['docs_done']} documents already used; add text or lower context."
                )
            self.stopped = "corpus"
            warnings.warn(f"The corpus ran out after {c['tokens_seen']} training tokens.")
            return False
        x, y, perms = filled
        c.update(docs_done=self.rows.docs_done, pending=self.rows.pending, buffers=c["buffers"] + 1,
                 tokens_read=c.get("tokens_read", 0) + x.shape[1])
        if self.state is None:
            self.state = self.new_state()
        if self.progress() >= 1 - s.jumprelu_share:
            self.state.calibrate(self.sample[0], s.k, self.dtype)
        size = min(s.batch_tokens, x.shape[1])
        batches = [perm[start:start + size] for perm in perms
                   for start in range(0, len(perm) - size + 1, size)]
        for idx in batches:
            if self.budget_reached():
                break
            fvu = self.state.step(x[:, idx], y[:, idx], self.k_now(), s.aux_k, s.dead_tokens,
                                  lr_at(s.lr, self.progress()), self.dtype)
            self.last_fvu = [round(float(v), 4) for v in fvu]
            c["tokens_seen"] += size
            c["steps"] += 1
            dead = (self.state.since_fired >= s.dead_tokens).float().mean()
            bar.update(size)
            bar.set_postfix(fvu=f"{fvu.mean():.3f}", dead=f"{dead:.1%}", refresh=False)
        return True

    def k_now(self) -> int:
        """Active features per token and layer in the next step."""
        return self.s.k

    def new_state(self):
        """The state training starts from, made from the first buffer's sample."""
        s = self.s
        if s.init_from is not None:
            return TopKTranscoders.from_bundle(Path(s.init_from), list(s.layers), *self.sample,
                                               s.lr)
        return TopKTranscoders.init(*self.sample, s.width, s.k, s.lr, s.seed)

    def save(self) -> None:
        """Export the bundle, then write the checkpoint."""
        if self.sample is None:  # nothing trained in this run: calibrate on the first rows
            self._fill(TokenRows(self.model.tokenizer, self.s.corpus, self.s.context), 0)
        self.counters["seconds"] = self.seconds()
        self.export()
        save_checkpoint(self.ckpt_dir, self.state.state_tensors(), self.s, self.counters)
        self.log()

    def log(self) -> None:
        """Append the run's progress to ``log.jsonl`` beside the checkpoint: the time, the
        machine, tokens and seconds so far, the current k and the last batch's FVU."""
        c = self.counters
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine(), "device": self.device, "tokens_seen": c["tokens_seen"],
                "seconds": round(c["seconds"], 1), "k": self.k_now(),
                "fvu": self.last_fvu, "stopped": self.stopped}
        with open(self.ckpt_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def export(self) -> None:
        """Write the ``layer_XX/`` folders and ``manifest.json`` (swapped in together)."""
        s, c = self.s, self.counters
        x, y = self.sample
        saes, stats = {}, {}
        for i, layer in enumerate(s.layers):
            meta = {"model_name": s.model_name,
                    "hook_name": f"blocks.{layer}.hook_mlp_in",
                    "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                    "hf_hook_name": f"model.layers.{layer}.pre_feedforward_layernorm.output",
                    "hf_hook_name_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
                    "training": {"trainer": "circuitlab TopK skip transcoder -> JumpReLU",
                                 "tokens_seen": c["tokens_seen"], "k": s.k, "width": s.width}}
            saes[layer], stats[layer] = to_jumprelu(self.state, i, x[i], y[i], s.k, meta)
            saes[layer].cfg.metadata.training.update(calibration=stats[layer])
        manifest = {
            "command": self.command, "tokens_seen": c["tokens_seen"],
            "tokens_read": c.get("tokens_read", 0),
            "steps": c["steps"], "seconds": round(c["seconds"], 1),
            "tokens_per_second": round(c["tokens_seen"] / max(c["seconds"], 1e-9), 1),
            "stopped": self.stopped, "settings": dataclasses.asdict(s),
            "calibration": {str(l): v for l, v in stats.items()},
        }
        if self.history is not None:
            manifest["init_from"] = self.history
        export_layers(saes, self.out_dir, manifest)
