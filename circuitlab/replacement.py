"""The replacement model: a HookedTransformer whose MLPs are read through transcoders.

Each MLP block at layer ``l`` is replaced by its transcoder plus an error term::

    mlp_out[l] = decode(encode(x[l])) + W_skip x[l] + error[l]

where ``x[l]`` is the MLP input: the output of the pre-MLP norm (see ``circuitlab.hooks``,
which names every TransformerLens hook the model is run with), or for transcoders that read
it (``rm.reads == "resid_mid"``, as circuit-tracer's CLTs do) the residual stream before
that norm; ``mlp_in`` below always means that input. Transcoders write the MLP
output, which for Gemma includes the post-MLP norm. With a cross-layer transcoder
(``circuitlab.clt``) the features of every layer ``s <= l`` write into ``mlp_out[l]``, and
``error[l]`` is what all of those writes together miss.

For attribution, attention patterns and every normalization denominator are frozen at
their values on the prompt (``Trace``); the map from feature outputs, error terms and
token embeddings to transcoder pre-activations and logits is then linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import pandas as pd
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer

from . import prompts
from .clt import CrossLayerTranscoder
from .errors import CircuitlabError
from .hooks import (FINAL_NORMALIZED, RESID_IN, is_frozen, is_scale, mlp_hooks, pattern_hooks,
                    pattern_name, resid_out, scale_name)
from .splice import check_splice


@dataclass
class Trace:
    """Everything attribution needs from one clean forward pass of a prompt.

    Shapes use ``L`` layers, ``P`` positions, ``d`` = d_model, ``H`` heads.

    Attributes:
        tokens: ``[P]`` token ids.
        logits: ``[P, d_vocab]`` model logits.
        embed: ``[P, d]`` the residual stream entering layer 0 (scaled embeddings).
        mlp_in: ``[L, P, d]`` the transcoders' inputs (pre-MLP norm outputs, or the residual
            before that norm where the transcoders read it).
        mlp_out: ``[L, P, d]`` MLP outputs (``hook_mlp_out``).
        resid_final: ``[P, d]`` residual stream entering the final norm.
        scales: normalization denominators by TL hook name (``[P, 1]`` each).
        patterns: ``[L, H, P, P]`` attention patterns.
        features: per layer, ``(pos [n], feature [n], activation [n])`` of active features.
        errors: ``[L, P, d]`` MLP output minus the transcoders' reconstruction from
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


@dataclass
class Outcome:
    """One run of an (edited) replacement model on one prompt.

    Attributes:
        logits: ``[P, d_vocab]``.
        mlp_in: ``[L, P, d]`` the MLP inputs of that run.
        final: ``[P, d]`` the final norm's output.
    """

    logits: torch.Tensor
    mlp_in: torch.Tensor
    final: torch.Tensor


class ReplacementModel:
    """A TransformerLens model with one SAE-Lens transcoder per layer, or a cross-layer
    transcoder.

    Attributes:
        model: the ``HookedTransformer``.
        transcoders: one transcoder per layer (SAE-Lens ``Transcoder`` subclasses), or a
            ``CrossLayerTranscoder``.
        clt: the ``CrossLayerTranscoder``, or ``None`` for per-layer transcoders.
        tokenizer: the model's tokenizer.
        name: model name (preset or HF id).
        transcoder_source: where the transcoders came from (for graph metadata).
    """

    def __init__(
        self,
        model: HookedTransformer,
        transcoders: Sequence[SAE] | CrossLayerTranscoder,
        *,
        name: str | None = None,
        transcoder_source: str | None = None,
    ):
        self.model = model.eval()
        self.clt = transcoders if isinstance(transcoders, CrossLayerTranscoder) else None
        self.transcoders = transcoders if self.clt is not None else list(transcoders)
        self.tokenizer = model.tokenizer
        self.name = name or model.cfg.model_name
        self.transcoder_source = transcoder_source
        for tc in [self.clt] if self.clt is not None else self.transcoders:
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
        #: What the transcoders read: ``"mlp_in"`` (the MLP input) or ``"resid_mid"`` (the
        #: residual stream before the pre-MLP norm).
        self.reads = check_splice(self.model, self.clt if self.clt is not None else self.transcoders)

    # ------------------------------------------------------------------ properties

    @property
    def cfg(self):
        """The TransformerLens config of the model."""
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        """The device of the model's weights, where every tensor of a run lives."""
        return self.model.W_E.device

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.model.cfg.d_model

    def d_sae(self, layer: int) -> int:
        """Number of features of the transcoder at ``layer``."""
        return self.clt.d_sae if self.clt is not None else self.transcoders[layer].cfg.d_sae

    def skip_matrix(self, layer: int) -> torch.Tensor | None:
        """``W_skip [d_out, d_in]`` of a skip transcoder, else ``None``."""
        if self.clt is not None:
            return None if self.clt.W_skip is None else self.clt.W_skip[layer]
        return getattr(self.transcoders[layer], "W_skip", None)

    def encoder(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_enc [d, d_sae], b_enc [d_sae])`` of the features of ``layer``."""
        if self.clt is not None:
            return self.clt.W_enc[layer], self.clt.b_enc[layer]
        return self.transcoders[layer].W_enc, self.transcoders[layer].b_enc

    def decoders(self, layer: int) -> torch.Tensor:
        """``[d_sae, n, d]``: the writes of ``layer``'s features into the MLP outputs of layers
        ``layer, ..., layer + n - 1`` (``n = 1`` for per-layer transcoders; for a CLT, the
        layers of its write window)."""
        if self.clt is not None:
            return self.clt.stored_decoders(layer)
        return self.transcoders[layer].W_dec[:, None]

    def decoder(self, layer: int) -> torch.Tensor:
        """``[d_sae, d]``: each feature's total write into the residual stream (the sum of its
        writes into every layer), which sets its direct effect on the logits."""
        if self.clt is not None:
            return self.clt.stored_decoders(layer).sum(1)
        return self.transcoders[layer].W_dec

    def __repr__(self) -> str:
        kind = "cross-layer transcoder, " if self.clt is not None else ""
        return (f"ReplacementModel({self.name!r}, {self.n_layers} layers, {kind}"
                f"{self.d_sae(0)} features/layer, transcoders={self.transcoder_source!r})")

    # ------------------------------------------------------------------ prompts

    def tokenize(self, prompt: str) -> torch.Tensor:
        """See ``circuitlab.prompts.tokenize``."""
        return prompts.tokenize(self, prompt)

    def to_tokens(self, prompt) -> torch.Tensor:
        """See ``circuitlab.prompts.to_tokens``."""
        return prompts.to_tokens(self, prompt)

    def token_id(self, token) -> int:
        """See ``circuitlab.prompts.token_id``."""
        return prompts.token_id(self, token)

    def token_str(self, token: int) -> str:
        """See ``circuitlab.prompts.token_str``."""
        return prompts.token_str(self, token)

    def token_strs(self, tokens) -> list[str]:
        """See ``circuitlab.prompts.token_strs``."""
        return prompts.token_strs(self, tokens)

    def locate(self, tokens: torch.Tensor, text: str) -> list[int]:
        """See ``circuitlab.prompts.locate``."""
        return prompts.locate(self, tokens, text)

    def layers(self, layer=None) -> list[int]:
        """See ``circuitlab.prompts.layers``."""
        return prompts.layers(self, layer)

    def check_feature(self, layer: int, feature: int) -> None:
        """See ``circuitlab.prompts.check_feature``."""
        prompts.check_feature(self, layer, feature)

    def activations(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """See ``circuitlab.prompts.activations``."""
        return prompts.activations(self, tokens, layers)

    def unembedding(self, norm: bool = True) -> torch.Tensor:
        """See ``circuitlab.prompts.unembedding``."""
        return prompts.unembedding(self, norm)

    # ------------------------------------------------------------------ hooks

    def encode(self, layer: int, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Feature activations ``[P, d_sae]`` of the transcoder at ``layer`` for MLP inputs
        ``x [P, d]``. Given the prompt's ``tokens``, a leading BOS gets no features (its huge,
        constant activations carry no prompt information; its MLP output is left to the error).
        """
        acts = (self.clt.encode(layer, x) if self.clt is not None
                else self.transcoders[layer].encode(x))
        if tokens is not None and tokens[0].item() == self.tokenizer.bos_token_id:
            acts[..., :1, :] = 0
        return acts

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Transcoder pre-activations ``x @ W_enc + b_enc`` (a feature target's input)."""
        W_enc, b_enc = self.encoder(layer)
        return x.to(W_enc.dtype) @ W_enc + b_enc

    def write(self, layer: int, acts: Sequence) -> torch.Tensor | float:
        """What the features write into ``layer``'s MLP output: ``acts[s]`` (``[P, d_sae]``, or
        ``None`` for nothing) holds the activations of layer ``s``; a per-layer transcoder
        reads only ``acts[layer]``, a cross-layer one every ``s <= layer``."""
        out = 0.0
        for s in range(layer + 1) if self.clt is not None else [layer]:
            if acts[s] is not None and (self.clt is None or layer - s < self.clt.n_out(s)):
                out = out + acts[s] @ self.decoders(s)[:, layer - s]
        return out

    def decode(self, layer: int, acts: Sequence, x: torch.Tensor) -> torch.Tensor:
        """Transcoder output (reconstruction of ``hook_mlp_out``) incl. the skip path, from the
        activations ``acts`` of every layer (see ``write``) and the MLP input ``x [P, d]``."""
        b_dec = self.clt.b_dec[layer] if self.clt is not None else self.transcoders[layer].b_dec
        out = self.write(layer, acts) + b_dec
        skip = self.skip_matrix(layer)
        return out if skip is None else out + x.to(skip.dtype) @ skip.T

    # ------------------------------------------------------------------ runs

    def run(self, tokens: torch.Tensor) -> Trace:
        """Clean forward pass of one prompt that records a ``Trace``.

        Args:
            tokens: ``[P]`` token ids.

        Raises:
            CircuitlabError: if an activation is NaN or infinite.
        """
        cache: dict[str, torch.Tensor] = {}
        pairs: dict[int, tuple] = {}

        def keep(act, hook):
            cache[hook.name] = act[0].detach()

        def keep_mlp(layer, x, out):
            pairs[layer] = (x[0].detach(), out[0].detach())

        names = lambda n: is_frozen(n) or n in (RESID_IN, resid_out(self.n_layers))  # noqa: E731
        hooks = [(names, keep)] + mlp_hooks(self.model, keep_mlp, read=self.reads)
        with torch.no_grad():
            logits = self.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
        if not torch.isfinite(logits).all():
            raise CircuitlabError(
                "The model produced NaN/inf logits on this prompt; check the weights "
                "(rebuild the cache) and the dtype (use float32)."
            )
        L = self.n_layers
        mlp_in = torch.stack([pairs[l][0] for l in range(L)])
        mlp_out = torch.stack([pairs[l][1] for l in range(L)])
        features, errors = [], torch.zeros_like(mlp_out)
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
                # minus what each layer's features write into it and every later layer
                writes = torch.einsum("pf,fnd->npd", acts, self.decoders(l))
                errors[l:l + len(writes)] -= writes.to(errors.dtype)
            for l in range(L):
                errors[l] += mlp_out[l] - self.decode(l, [None] * L, mlp_in[l])
        return Trace(
            tokens=tokens, logits=logits, embed=cache[RESID_IN],
            mlp_in=mlp_in, mlp_out=mlp_out,
            resid_final=cache[resid_out(L)],
            scales={k: v for k, v in cache.items() if is_scale(k)},
            patterns=torch.stack([cache[pattern_name(l)] for l in range(L)]),
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
        def frozen(act, hook):
            return trace.scales[hook.name][None]

        hooks = [(is_scale, frozen), *pattern_hooks(trace.patterns)]
        xs: dict[int, torch.Tensor] = {}

        def replace(layer, x, out):
            xs[layer] = x[0]
            return mlp_out_fn(layer, x[0])[None].to(out.dtype)

        hooks += mlp_hooks(self.model, replace, read=self.reads)
        if embed is not None:
            hooks.append((RESID_IN, lambda act, hook: embed[None]))
        return hooks, xs

    def frozen_run(self, trace: Trace, mlp_out_fn: Callable, embed: torch.Tensor | None = None):
        """Run the frozen model (see ``frozen_hooks``).

        Returns:
            ``(mlp_in [L, P, d], resid_final [P, d])`` of that run.
        """
        final = {}
        hooks, xs = self.frozen_hooks(trace, mlp_out_fn, embed)
        hooks.append((resid_out(self.n_layers), lambda act, hook: final.setdefault("r", act[0])))
        with torch.no_grad():
            self.model.run_with_hooks(trace.tokens[None], fwd_hooks=hooks,
                                      stop_at_layer=self.n_layers)
        return torch.stack([xs[l] for l in range(self.n_layers)]), final["r"]

    def final_normed(self, trace: Trace, resid: torch.Tensor) -> torch.Tensor:
        """The final norm applied to ``resid [P, d]`` with the prompt's frozen denominator."""
        ln = self.model.ln_final
        if self.cfg.normalization_type == "LN":
            resid = resid - resid.mean(-1, keepdim=True)
        out = (resid / trace.scales[scale_name("ln_final")]).to(ln.w.dtype) * ln.w
        return out + ln.b if hasattr(ln, "b") else out

    def unembed(self, final: torch.Tensor) -> torch.Tensor:
        """Logits ``[P, d_vocab]`` from final-norm outputs ``final [P, d]`` (with the
        model's logit soft-cap, if it has one)."""
        logits = self.model.unembed(final[None])[0]
        cap = getattr(self.cfg, "output_logits_soft_cap", 0.0) or 0.0
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def edited_run(self, tokens: torch.Tensor, mlp_out_fn: Callable | None = None, *,
                   patterns: torch.Tensor | None = None) -> Outcome:
        """Run the model on ``tokens [P]``, optionally editing MLP outputs and freezing
        attention; norms and (unless frozen) attention respond to the edits.

        Args:
            tokens: ``[P]`` token ids.
            mlp_out_fn: ``mlp_out_fn(layer, x, out)`` with the MLP input ``x [P, d]`` and
                output ``out [P, d]``; returns the new output, or ``None`` to keep it.
            patterns: ``[L, H, P, P]`` attention patterns to freeze (a ``Trace``'s).
        """
        xs, final = {}, {}

        def edit(layer, x, out):
            xs[layer] = x[0]
            new = None if mlp_out_fn is None else mlp_out_fn(layer, x[0], out[0])
            return None if new is None else new[None].to(out.dtype)

        def grab_final(act, hook):
            ln = self.model.ln_final
            final["x"] = act[0].to(ln.w.dtype) * ln.w + (ln.b if hasattr(ln, "b") else 0)

        hooks = mlp_hooks(self.model, edit, read=self.reads) + [(FINAL_NORMALIZED, grab_final)]
        if patterns is not None:
            hooks += pattern_hooks(patterns)
        with torch.no_grad():
            logits = self.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
        return Outcome(logits, torch.stack([xs[l] for l in range(self.n_layers)]), final["x"])

    def forward(self, tokens: torch.Tensor, errors: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[P, d_vocab]`` of the replacement model (free mode: nothing frozen).

        Args:
            tokens: ``[P]`` token ids.
            errors: ``[L, P, d]`` error terms to add (from ``run``); ``None`` runs the
                transcoders alone, without error terms.
        """
        acts = []

        def replace(layer, x, out):
            acts.append(self.encode(layer, x, tokens))
            recon = self.decode(layer, acts, x)
            return recon if errors is None else recon + errors[layer]

        return self.edited_run(tokens, replace).logits

    def predict(self, prompt: str, k: int = 5):
        """The model's top ``k`` next tokens after ``prompt``.

        Returns:
            A DataFrame with columns ``token, id, prob``, most likely first.
        """
        probs = torch.softmax(self.edited_run(self.tokenize(prompt)).logits[-1].double(), -1)
        top = torch.topk(probs, k)
        ids = top.indices.tolist()
        return pd.DataFrame({"token": self.token_strs(ids), "id": ids,
                             "prob": top.values.tolist()})

    def prob(self, prompt: str, tokens):
        """The model's probability of the next token being ``tokens`` after ``prompt``.

        Args:
            prompt: the text.
            tokens: a token (a string that is one token, or an id) or a list of them.

        Returns:
            A float for one token, a list of floats for a list.
        """
        many = isinstance(tokens, (list, tuple))
        ids = [self.token_id(t) for t in (tokens if many else [tokens])]
        probs = torch.softmax(self.edited_run(self.tokenize(prompt)).logits[-1].double(), -1)
        values = [float(probs[i]) for i in ids]
        return values if many else values[0]

    # ------------------------------------------------------------------ interventions

    def qk(self, prompt, layer: int, head: int, query_pos: int, key_pos: int, top: int = 20):
        """See ``circuitlab.qk.qk``."""
        from .qk import qk

        return qk(self, prompt, layer, head, query_pos, key_pos, top=top)

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
        """See ``circuitlab.search.features_for``."""
        from .search import features_for

        return features_for(self, prompt, token_or_text, layer, pos, top)

    def features_by_output(self, token, layer=None, top: int = 20, **kwargs):
        """See ``circuitlab.search.features_by_output``."""
        from .search import features_by_output

        return features_by_output(self, token, layer, top, **kwargs)

    def features_by_examples(self, examples, against=None, layer=None, top: int = 20):
        """See ``circuitlab.search.features_by_examples``."""
        from .search import features_by_examples

        return features_by_examples(self, examples, against, layer, top)
