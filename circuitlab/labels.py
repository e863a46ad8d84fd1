"""Automatic feature labels, offline: what a feature reads and what it writes.

A label joins the tokens a feature fires on most (the centres of its top-activating
held-out contexts, from the cards) with the tokens its decoder direction raises most
through the unembedding, e.g. ``"small" "little" → say large/big``.

Output tokens are ranked only among *word-like tokens of the held-out text*: tokens
that occur there at least ``MIN_COUNT`` times and are letters (with an optional leading
space), in the script of the feature's own contexts. That drops the tokenizer's rare
pieces (``'蟆'``, ``'nements'``) that dominate a raw ranking over 262k tokens. A label
names output tokens only when they stand out: at least ``MIN_Z`` standard deviations
above the mean effect over that vocabulary; features whose direct effect on the logits
is diffuse are labelled by what they read alone.

The labels are built by ``circuitlab cards`` and stored in the cards file; the explorer,
the HTML export and the CLI show them wherever a feature appears, unless the user has
labelled the node.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import torch

from .cards import Examples

#: Reads: distinct top-context tokens named in a label; writes: output tokens named.
N_READS, N_WRITES = 3, 2
#: A token must occur this often in the held-out text to be named as an output.
MIN_COUNT = 3
#: Output tokens ranked per feature (the candidates a label names from).
N_OUTPUTS = 5
#: How far (in standard deviations of the feature's effect over the vocabulary) an output
#: token must stand out to be named in the label.
MIN_Z = 4.0
WORD = re.compile(r"^ ?[^\W\d_]+$")


def script(text: str) -> str:
    """The script of ``text``'s first letter: ``"latin"``, ``"han"``, ``"cyrillic"``, ...
    (``""`` without letters)."""
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            if name.startswith("CJK"):
                return "han"
            return name.split(" ")[0].lower()
    return ""


def shown(token: str) -> str:
    """A token as a label names it: stripped, quoted, whitespace made visible."""
    text = token.strip()
    if not text:
        return {"\n": "↵", " ": "␣"}.get(token[:1], "⎵")
    return f'"{text}"' if len(text) <= 20 else f'"{text[:19]}…"'


def reads(examples: Examples, layer: int, feature: int, n: int = N_READS) -> list[str]:
    """The most common tokens at the centre of a feature's top contexts (at most ``n``),
    most frequent first; tokens holding under a tenth of the contexts are left out when
    others are named."""
    centres = [c["tokens"][c["center"]] for c in examples.contexts(layer, feature)
               if c["quantile"] == "top"]
    counts = Counter(centres).most_common()
    if not counts:
        return []
    keep = [t for t, k in counts if k >= max(1, len(centres) // 10)] or [counts[0][0]]
    return list({shown(t): t for t in reversed(keep)}.values())[::-1][:n]


class Vocabulary:
    """The word-like tokens of the held-out text, by script (see the module docstring)."""

    def __init__(self, examples: Examples, min_count: int = MIN_COUNT):
        counts = torch.bincount(examples.tokens.long())
        ids = torch.nonzero(counts >= min_count)[:, 0].tolist()
        groups: dict[str, list[int]] = {}
        for i in ids:
            text = examples.token_str(i)
            if WORD.match(text):
                groups.setdefault(script(text), []).append(i)
        self.by_script = {k: torch.tensor(v) for k, v in groups.items()}
        self.all = torch.tensor(sorted(i for v in groups.values() for i in v), dtype=torch.long)

    def ids(self, name: str) -> torch.Tensor:
        """Word-like token ids of script ``name`` (all scripts if it has none)."""
        return self.by_script.get(name, self.all)


def writes(tokens: list[str], z: list[float], n: int = N_WRITES) -> list[str]:
    """The output tokens a label names: those at least ``MIN_Z`` above the mean, one per
    word (case and leading space ignored), at most ``n``."""
    seen: dict[str, str] = {}
    for token, score in zip(tokens, z):
        if score >= MIN_Z:
            seen.setdefault(token.strip().lower(), token)
    return list(seen.values())[:n]


def label(read: list[str], write: list[str]) -> str:
    """``"small" "little" → say large/big`` from the read tokens and the written tokens."""
    left = " ".join(shown(t) for t in read)
    right = "/".join(t.strip() for t in write)
    if left and right:
        return f"{left} → say {right}"
    return left or (f"→ say {right}" if right else "")


def build_labels(rm, examples: Examples, chunk: int = 256) -> tuple[dict, dict]:
    """Labels and output tokens of every feature of ``rm``'s transcoders.

    Args:
        rm: the ``ReplacementModel`` whose transcoders ``examples`` was built for.
        examples: the cards' examples (held-out contexts and token counts).
        chunk: features per matrix product.

    Returns:
        ``(labels, outputs)``: per layer (a string key, as in the cards file), a list with
        one label per feature and a list with each feature's ``N_OUTPUTS`` top output
        tokens (word-like, in the script of its contexts; ``[]`` for a dead feature). The
        cards file stores the labels.
    """
    vocab = Vocabulary(examples)
    W_U = rm.unembedding().detach().float()
    labels, outputs = {}, {}
    for layer in range(rm.n_layers):
        W_dec = rm.decoder(layer).detach().float()
        read = [reads(examples, layer, f) for f in range(W_dec.shape[0])]
        scripts = [script("".join(r)) for r in read]
        tops: list[list[str]] = [[] for _ in read]
        named: list[list[str]] = [[] for _ in read]
        for name in set(scripts):
            ids = vocab.ids(name)
            feats = [f for f, s in enumerate(scripts) if s == name]
            for start in range(0, len(feats), chunk):
                part = torch.tensor(feats[start:start + chunk])
                effect = W_dec[part] @ W_U[:, ids]
                z = (effect - effect.mean(1, keepdim=True)) / effect.std(1, keepdim=True)
                top = z.topk(min(2 * N_OUTPUTS, len(ids)))
                for f, row, score in zip(part.tolist(), ids[top.indices].tolist(), top.values.tolist()):
                    tops[f] = [examples.token_str(i) for i in row]
                    named[f] = writes(tops[f], score)
                    tops[f] = tops[f][:N_OUTPUTS]
        dead = examples.max_act[layer] <= 0
        labels[str(layer)] = ["" if dead[f] else label(read[f], named[f]) for f in range(len(read))]
        outputs[str(layer)] = [[] if dead[f] else tops[f] for f in range(len(read))]
    return labels, outputs
