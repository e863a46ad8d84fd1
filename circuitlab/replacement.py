"""The replacement model: a HookedTransformer whose MLPs are read through transcoders.

Each MLP block at layer ``l`` is replaced by its transcoder plus an error term::

    mlp_out[l] = decode(encode(x[l])) + W_skip x[l] + error[l]

where ``x[l]`` is the MLP input: the output of the pre-MLP norm. TransformerLens has no
hook that carries it, so it is computed as ``blocks.l.ln2.hook_normalized * ln2.w`` (plus
``ln2.b`` for LayerNorm models); for Gemma 3 this equals HF's
``pre_feedforward_layernorm`` output. Transcoders write ``blocks.l.hook_mlp_out``, which for
Gemma includes the post-MLP norm (HF ``post_feedforward_layernorm`` output).

For attribution, attention patterns and every normalization denominator are frozen at
their values on the prompt (``Trace``); the map from feature outputs, error terms and
token embeddings to transcoder pre-activations and logits is then linear.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from .loading import MLP_IN_HOOKS, MLP_OUT_HOOKS, CircuitlabError

#: Norm denominators frozen for attribution (q/k norms only shape the frozen patterns).
FROZEN_SCALES = ("ln1.hook_scale", "ln1_post.hook_scale", "ln2.hook_scale", "ln_final.hook_scale")

#: Longest prompt (in tokens, BOS included) that ``tokenize`` accepts.
MAX_PROMPT_TOKENS = 256


@dataclass
class Trace:
    """Everything attribution needs from one clean forward pass of a prompt.

    Shapes use ``L`` layers, ``P`` positions, ``d`` = d_model, ``H`` heads.

    Attributes:
        tokens: ``[P]`` token ids.
        logits: ``[P, d_vocab]`` model logits.
        embed: ``[P, d]`` the residual stream entering layer 0 (scaled embeddings).
        mlp_in: ``[L, P, d]`` MLP inputs (pre-MLP norm outputs).
        mlp_out: ``[L, P, d]`` MLP outputs (``hook_mlp_out``).
        resid_final: ``[P, d]`` residual stream entering the final norm.
        scales: normalization denominators by TL hook name (``[P, 1]`` each).
        patterns: ``[L, H, P, P]`` attention patterns.
        features: per layer, ``(pos [n], feature [n], activation [n])`` of active features.
        errors: ``[L, P, d]`` MLP output minus the transcoder's reconstruction from
            ``features`` (features at a skipped BOS position are folded into it).
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    embed: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    resid_final: torch.Tensor
    scales: dict
    patterns: torch.Tensor
    features: list
    errors: torch.Tensor


def mlp_input(model: HookedTransformer, layer: int, normalized: torch.Tensor) -> torch.Tensor:
    """The MLP input (pre-MLP norm output) at ``layer`` from ``blocks.layer.ln2.hook_normalized``.

    TransformerLens exposes the norm output only before its weight; Gemma Scope 2 and
    circuitlab transcoders read ``ln2.hook_normalized * ln2.w`` (+ ``ln2.b`` for LayerNorm),
    which equals HF Gemma 3's ``pre_feedforward_layernorm`` output.
    """
    ln2 = model.blocks[layer].ln2
    out = normalized * ln2.w
    return out + ln2.b if hasattr(ln2, "b") else out


def mlp_io(model: HookedTransformer, tokens: torch.Tensor, layers: Sequence[int] | None = None,
           stop_early: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs (the transcoder training pairs) for a batch of token ids.

    Args:
        model: the HookedTransformer.
        tokens: ``[B, P]`` or ``[P]`` token ids.
        layers: layers to capture (default all).
        stop_early: stop the forward after the last requested layer (skips the unembedding).

    Returns:
        ``(mlp_in, mlp_out)``, each ``[len(layers), B, P, d_model]``: the pre-MLP norm output
        and ``blocks.l.hook_mlp_out``.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    ins, outs = {}, {}

    def grab_in(act, hook):
        layer = int(hook.name.split(".")[1])
        ins[layer] = mlp_input(model, layer, act)

    def grab_out(act, hook):
        outs[int(hook.name.split(".")[1])] = act

    hooks = [(f"blocks.{l}.ln2.hook_normalized", grab_in) for l in layers]
    hooks += [(f"blocks.{l}.hook_mlp_out", grab_out) for l in layers]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks,
                             stop_at_layer=max(layers) + 1 if stop_early else None)
    return torch.stack([ins[l] for l in layers]), torch.stack([outs[l] for l in layers])


class ReplacementModel:
    """A TransformerLens model with one SAE-Lens transcoder per layer.

    Attributes:
        model: the ``HookedTransformer``.
        transcoders: one transcoder per layer (SAE-Lens ``Transcoder`` subclasses).
        tokenizer: the model's tokenizer.
        name: model name (preset or HF id).
        transcoder_source: where the transcoders came from (for graph metadata).
    """

    def __init__(
        self,
        model: HookedTransformer,
        transcoders: Sequence[SAE],
        *,
        name: str | None = None,
        transcoder_source: str | None = None,
    ):
        self.model = model.eval()
        self.transcoders = list(transcoders)
        self.tokenizer = model.tokenizer
        self.name = name or model.cfg.model_name
        self.transcoder_source = transcoder_source
        for tc in self.transcoders:
            tc.eval()
            for p in tc.parameters():
                p.requires_grad_(False)
        for p in self.model.parameters():
            p.requires_grad_(False)
        # TransformerLens' Unembed multiplies by ``W_U.T.contiguous()``: store W_U as the
        # transpose of a contiguous [d_vocab, d_model] matrix so that this copy (670 MB for
        # Gemma 3) costs nothing on every forward pass. Same values, another memory layout.
        W_U = self.model.unembed.W_U
        if W_U.is_contiguous():
            self.model.unembed.W_U = torch.nn.Parameter(W_U.detach().T.contiguous().T,
                                                        requires_grad=False)
        self._validate()

    # ------------------------------------------------------------------ properties

    @property
    def cfg(self):
        """The TransformerLens config of the model."""
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    def d_sae(self, layer: int) -> int:
        """Number of features of the transcoder at ``layer``."""
        return self.transcoders[layer].cfg.d_sae

    def skip_matrix(self, layer: int) -> torch.Tensor | None:
        """``W_skip [d_out, d_in]`` of a skip transcoder, else ``None``."""
        return getattr(self.transcoders[layer], "W_skip", None)

    def __repr__(self) -> str:
        return (f"ReplacementModel({self.name!r}, {self.n_layers} layers, "
                f"{self.d_sae(0)} features/layer, transcoders={self.transcoder_source!r})")

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        cfg = self.model.cfg
        if cfg.parallel_attn_mlp or cfg.attn_only:
            raise CircuitlabError(
                f"{cfg.model_name} has parallel attention/MLP or no MLPs; circuitlab needs "
                "sequential pre-norm blocks with MLPs."
            )
        if cfg.normalization_type not in ("RMS", "LN"):
            raise CircuitlabError(
                f"{cfg.model_name} uses normalization {cfg.normalization_type!r}; load it "
                "unfolded (from_pretrained_no_processing) so norms are RMS or LN."
            )
        if len(self.transcoders) != cfg.n_layers:
            raise CircuitlabError(
                f"Got {len(self.transcoders)} transcoders for a model with {cfg.n_layers} layers; "
                "pass exactly one transcoder per layer, in layer order."
            )
        for layer, tc in enumerate(self.transcoders):
            d_in, d_out = tc.cfg.d_in, getattr(tc.cfg, "d_out", None)
            if d_out is None:
                raise CircuitlabError(
                    f"Layer {layer}: {type(tc).__name__} is not a transcoder (no d_out); "
                    "use SAE-Lens Transcoder classes."
                )
            if d_in != cfg.d_model or d_out != cfg.d_model:
                raise CircuitlabError(
                    f"Layer {layer}: transcoder maps d_in={d_in} -> d_out={d_out}, but the model's "
                    f"d_model is {cfg.d_model}. These transcoders belong to another model."
                )
            hook_in = tc.cfg.metadata.hook_name or ""
            hook_out = tc.cfg.metadata.hook_name_out or f"blocks.{layer}.hook_mlp_out"
            ok_in = any(hook_in == f"blocks.{layer}.{h}" for h in MLP_IN_HOOKS)
            ok_out = any(hook_out == f"blocks.{layer}.{h}" for h in MLP_OUT_HOOKS)
            if not (ok_in and ok_out):
                raise CircuitlabError(
                    f"Transcoder #{layer} reads {hook_in!r} and writes {hook_out!r}; the "
                    f"transcoder for layer {layer} must read the MLP input "
                    f"(blocks.{layer}.hook_mlp_in / ln2.hook_normalized) and write "
                    f"blocks.{layer}.hook_mlp_out. Check the layer order and the model."
                )

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids ``[P]`` of ``prompt`` with BOS prepended.

        Raises:
            CircuitlabError: for an empty or whitespace prompt or one longer than
                ``MAX_PROMPT_TOKENS``.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise CircuitlabError(
                f"The prompt is empty or whitespace ({prompt!r}); pass some text to trace, "
                'e.g. \'The opposite of "small" is "\'.'
            )
        tokens = self.model.to_tokens(prompt, prepend_bos=True, truncate=False)[0]
        limit = min(MAX_PROMPT_TOKENS, self.cfg.n_ctx)
        if len(tokens) > limit:
            raise CircuitlabError(
                f"The prompt has {len(tokens)} tokens; the limit is {limit}. "
                "Shorten it to the part that matters for the behaviour you trace."
            )
        return tokens

    def token_id(self, token) -> int:
        """The id of ``token``: an int id (range-checked), or a string that is exactly one token.

        Raises:
            CircuitlabError: if the string is not a single token (the message shows how it
                was tokenized) or the id is out of the vocabulary.
        """
        if isinstance(token, numbers.Integral) and not isinstance(token, bool):
            if not 0 <= token < self.cfg.d_vocab:
                raise CircuitlabError(
                    f"Token id {token} is outside the vocabulary (0..{self.cfg.d_vocab - 1}).")
            return int(token)
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [self.tokenizer.decode([i]) for i in ids]
            raise CircuitlabError(
                f"{token!r} is not a single token: it tokenizes as {pieces}. Pass one of those "
                "pieces or a token id, and mind the leading space (' Austin' and 'Austin' "
                "are different tokens).")
        return ids[0]

    # ------------------------------------------------------------------ hooks

    def mlp_input(self, layer: int, normalized: torch.Tensor) -> torch.Tensor:
        """The MLP input at ``layer`` from ``blocks.layer.ln2.hook_normalized``."""
        return mlp_input(self.model, layer, normalized)

    def encode(self, layer: int, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations ``[P, d_sae]`` of the transcoder at ``layer`` for MLP inputs
        ``x [P, d]``. Given the prompt's ``tokens``, a leading BOS gets no features (its huge,
        constant activations carry no prompt information; its MLP output is left to the error).
        """
        acts = self.transcoders[layer].encode(x)
        if tokens is not None and tokens[0].item() == self.tokenizer.bos_token_id:
            acts[..., :1, :] = 0
        return acts

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Transcoder pre-activations ``x @ W_enc + b_enc`` (a feature target's input)."""
        tc = self.transcoders[layer]
        return x @ tc.W_enc + tc.b_enc

    def decode(self, layer: int, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Transcoder output (reconstruction of ``hook_mlp_out``) incl. the skip path."""
        out = acts @ self.transcoders[layer].W_dec + self.transcoders[layer].b_dec
        skip = self.skip_matrix(layer)
        return out if skip is None else out + x @ skip.T

    # ------------------------------------------------------------------ runs

    def run(self, tokens: torch.Tensor) -> Trace:
        """Clean forward pass of one prompt that records a ``Trace``.

        Args:
            tokens: ``[P]`` token ids.

        Raises:
            CircuitlabError: if an activation is NaN or infinite.
        """
        cache: dict[str, torch.Tensor] = {}

        def keep(act, hook):
            cache[hook.name] = act[0].detach()

        names = lambda n: n.endswith(FROZEN_SCALES + (  # noqa: E731
            "attn.hook_pattern", "ln2.hook_normalized", "hook_mlp_out")) or n in (
            "blocks.0.hook_resid_pre", f"blocks.{self.n_layers - 1}.hook_resid_post")
        with torch.no_grad():
            logits = self.model.run_with_hooks(tokens[None], fwd_hooks=[(names, keep)])[0]
        if not torch.isfinite(logits).all():
            raise CircuitlabError(
                "The model produced NaN/inf logits on this prompt; check the weights "
                "(rebuild the cache) and the dtype (use float32)."
            )
        L = self.n_layers
        mlp_in = torch.stack([self.mlp_input(l, cache[f"blocks.{l}.ln2.hook_normalized"])
                              for l in range(L)])
        mlp_out = torch.stack([cache[f"blocks.{l}.hook_mlp_out"] for l in range(L)])
        features, errors = [], torch.empty_like(mlp_out)
        with torch.no_grad():
            for l in range(L):
                acts = self.encode(l, mlp_in[l], tokens)
                if not torch.isfinite(acts).all():
                    raise CircuitlabError(
                        f"Transcoder at layer {l} gives NaN/inf activations on this prompt; "
                        "its weights are corrupt or in the wrong dtype. Reload them."
                    )
                pos, feat = acts.nonzero(as_tuple=True)
                features.append((pos, feat, acts[pos, feat]))
                errors[l] = mlp_out[l] - self.decode(l, acts, mlp_in[l])
        return Trace(
            tokens=tokens, logits=logits, embed=cache["blocks.0.hook_resid_pre"],
            mlp_in=mlp_in, mlp_out=mlp_out,
            resid_final=cache[f"blocks.{L - 1}.hook_resid_post"],
            scales={k: v for k, v in cache.items() if k.endswith("hook_scale")},
            patterns=torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(L)]),
            features=features, errors=errors,
        )

    def frozen_hooks(self, trace: Trace, mlp_out_fn: Callable, embed: torch.Tensor | None = None):
        """TransformerLens hooks that run the frozen (linear) replacement model.

        Attention patterns and norm denominators are replaced by those in ``trace``.
        ``mlp_out_fn(layer, x)`` gives each layer's MLP output from its current MLP input
        ``x [P, d]``. ``embed`` replaces the residual entering layer 0.

        Returns:
            ``(hooks, mlp_in)``: the hooks, and a dict that fills with each layer's MLP
            input ``[P, d]`` during the run.
        """
        xs: dict[int, torch.Tensor] = {}

        def frozen(act, hook):
            if hook.name.endswith("hook_scale"):
                return trace.scales[hook.name][None]
            return trace.patterns[int(hook.name.split(".")[1])][None]

        def grab_in(act, hook):
            layer = int(hook.name.split(".")[1])
            xs[layer] = self.mlp_input(layer, act)[0]

        def mlp_out(act, hook):
            layer = int(hook.name.split(".")[1])
            return mlp_out_fn(layer, xs[layer])[None]

        hooks = [(lambda n: n.endswith(FROZEN_SCALES + ("attn.hook_pattern",)), frozen),
                 (lambda n: n.endswith("ln2.hook_normalized"), grab_in),
                 (lambda n: n.endswith("hook_mlp_out"), mlp_out)]
        if embed is not None:
            hooks.append(("blocks.0.hook_resid_pre", lambda act, hook: embed[None]))
        return hooks, xs

    def frozen_run(self, trace: Trace, mlp_out_fn: Callable, embed: torch.Tensor | None = None):
        """Run the frozen model (see ``frozen_hooks``).

        Returns:
            ``(mlp_in [L, P, d], resid_final [P, d])`` of that run.
        """
        final = {}
        hooks, xs = self.frozen_hooks(trace, mlp_out_fn, embed)
        hooks.append((f"blocks.{self.n_layers - 1}.hook_resid_post",
                      lambda act, hook: final.setdefault("r", act[0])))
        with torch.no_grad():
            self.model.run_with_hooks(trace.tokens[None], fwd_hooks=hooks,
                                      stop_at_layer=self.n_layers)
        return torch.stack([xs[l] for l in range(self.n_layers)]), final["r"]

    def final_normed(self, trace: Trace, resid: torch.Tensor) -> torch.Tensor:
        """The final norm applied to ``resid [P, d]`` with the prompt's frozen denominator."""
        ln = self.model.ln_final
        if self.cfg.normalization_type == "LN":
            resid = resid - resid.mean(-1, keepdim=True)
        out = resid / trace.scales["ln_final.hook_scale"] * ln.w
        return out + ln.b if hasattr(ln, "b") else out

    def forward(self, tokens: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[P, d_vocab]`` of the replacement model (free mode: nothing frozen).

        Args:
            tokens: ``[P]`` token ids.
            errors: ``[L, P, d]`` error terms to add (from ``run``); ``None`` runs the
                transcoders alone, without error terms.
        """
        def replace(act, hook):
            layer = int(hook.name.split(".")[1])
            x = xs[layer]
            recon = self.decode(layer, self.encode(layer, x, tokens), x)
            return (recon if errors is None else recon + errors[layer])[None]

        xs: dict[int, torch.Tensor] = {}

        def grab_in(act, hook):
            layer = int(hook.name.split(".")[1])
            xs[layer] = self.mlp_input(layer, act)[0]

        with torch.no_grad():
            return self.model.run_with_hooks(
                tokens[None], fwd_hooks=[(lambda n: n.endswith("ln2.hook_normalized"), grab_in),
                                         (lambda n: n.endswith("hook_mlp_out"), replace)])[0]

    # ------------------------------------------------------------------ interventions

    def intervene(self, prompt: str, interventions, mode: str = "free", **kwargs):
        """See ``circuitlab.interventions.intervene``."""
        from .interventions import intervene

        return intervene(self, prompt, interventions, mode, **kwargs)

    def generate(self, prompt: str, interventions=(), max_new_tokens: int = 20, **kwargs) -> str:
        """See ``circuitlab.interventions.generate``."""
        from .interventions import generate

        return generate(self, prompt, interventions, max_new_tokens, **kwargs)

    def sweep(self, prompt: str, features, values, **kwargs):
        """See ``circuitlab.interventions.sweep``."""
        from .interventions import sweep

        return sweep(self, prompt, features, values, **kwargs)

    # ------------------------------------------------------------------ finding features

    def features_for(self, prompt, token_or_text=None, layer=None, pos=None, top: int = 20):
        """See ``circuitlab.features.features_for``."""
        from .features import features_for

        return features_for(self, prompt, token_or_text, layer, pos, top)

    def features_by_output(self, token, layer=None, top: int = 20, **kwargs):
        """See ``circuitlab.features.features_by_output``."""
        from .features import features_by_output

        return features_by_output(self, token, layer, top, **kwargs)

    def features_by_examples(self, examples, against=None, layer=None, top: int = 20):
        """See ``circuitlab.features.features_by_examples``."""
        from .features import features_by_examples

        return features_by_examples(self, examples, against, layer, top)
