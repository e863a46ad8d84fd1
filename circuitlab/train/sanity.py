"""Interpretability sanity check of a transcoder set.

Two concepts, each found by code, never by index: ``features_by_examples`` ranks the
middle layers' features on example prompts against contrast prompts, and each candidate's
top-activating held-out contexts (the ``circuitlab cards`` examples) decide whether it is
selective: most of them must sit on the concept's tokens.

- ``texas``: a feature that fires selectively on Texas/Dallas-related tokens.
- ``small``: a feature shared by "small", "petit" and "pequeño" (it fires on every
  example), whose top contexts are words for small in any language.

Run it with ``python -m circuitlab.train.sanity`` (after ``circuitlab cards``).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import pandas as pd

from ..cards import N_TOP, find_examples
from ..errors import CircuitlabError
from ..search import features_by_examples


@dataclass(frozen=True)
class Concept:
    """A concept to look for.

    Attributes:
        examples: prompts whose last token is the concept (see ``features_by_examples``).
        against: contrast prompts whose last token is a related non-concept.
        pattern: regex (case-insensitive, full match of the stripped token) of the
            concept's tokens in held-out contexts.
        shared: require the feature to fire on every example.
    """

    examples: tuple
    against: tuple
    pattern: str
    shared: bool = False


CONCEPTS = {
    "texas": Concept(
        examples=("I grew up in Texas", "She moved to Dallas last year", "We flew into Houston",
                  "The capital of Texas", "a hotel in downtown Dallas", "a ranch outside Austin, Texas"),
        against=("I grew up in Ohio", "She moved to Chicago last year", "We flew into Boston",
                 "The capital of France", "a hotel in downtown Denver", "a farm outside Lyon, France"),
        pattern=r"texas|texans?|dallas|houston|austin|antonio|paso|lubbock|waco|tx",
    ),
    "small": Concept(
        examples=("The house is very small", "La maison est très petit", "La casa es muy pequeño",
                  "a small", "un petit", "un pequeño"),
        against=("The house is very large", "La maison est très grand", "La casa es muy grande",
                 "a red", "un rouge", "un rojo"),
        pattern=r"small(er|est)?|little|tiny|petite?s?|pequeñ[oa]s?|peque|chic[oa]s?|klein\w*|小",
        shared=True,
    ),
}


def middle_layers(n_layers: int) -> list[int]:
    """The middle half of the layers."""
    return list(range(n_layers // 4, (3 * n_layers + 3) // 4))


def _matches(token: str, pattern: str) -> bool:
    return bool(re.fullmatch(pattern, token.strip(), flags=re.I))


def selectivity(examples, layer: int, feature: int, pattern: str) -> tuple[float, list[str]]:
    """Share of a feature's top held-out contexts whose max sits on a token matching
    ``pattern``, and those max tokens."""
    tops = [c for c in examples.contexts(layer, feature) if c["quantile"] == "top"]
    tokens = [c["tokens"][c["center"]] for c in tops]
    return (sum(_matches(t, pattern) for t in tokens) / len(tokens) if tokens else 0.0), tokens


def occurrences(examples, pattern: str) -> int:
    """How many scanned held-out tokens match ``pattern`` (the most a feature could show)."""
    ids = [int(t) for t, text in examples.meta["vocab"].items() if _matches(text, pattern)]
    stream = examples.tokens[1:]  # BOS tokens never match
    return int(sum((stream == i).sum() for i in ids))


def concept_features(rm, concept: Concept, candidates: int = 20) -> pd.DataFrame:
    """The candidate features for ``concept`` in the middle layers with their selectivity.

    Returns:
        ``features_by_examples``' DataFrame (only features active on every example when
        ``concept.shared``), with ``selectivity`` and ``top_tokens`` (the tokens of the top
        held-out contexts), most selective first.

    Raises:
        CircuitlabError: if no examples are cached for ``rm``'s transcoders.
    """
    examples, why = find_examples(rm)
    if examples is None:
        raise CircuitlabError(f"The sanity check needs the feature-card examples: {why}.")
    df = features_by_examples(rm, list(concept.examples), list(concept.against),
                              layer=middle_layers(rm.n_layers), top=10 * candidates)
    if concept.shared:
        df = df[df["hits"] == len(concept.examples)]
    df = df.head(candidates).copy()
    found = [selectivity(examples, l, f, concept.pattern) for l, f in zip(df["layer"], df["feature"])]
    df["selectivity"] = [s for s, _ in found]
    df["top_tokens"] = [tokens for _, tokens in found]
    return df.sort_values(["selectivity", "score"], ascending=False, kind="stable").reset_index(drop=True)


def sanity(rm, threshold: float = 0.5, min_hits: int = 3) -> dict:
    """Check every concept in ``CONCEPTS``.

    A concept passes when some candidate has more than ``threshold`` of its top held-out
    contexts (up to ``N_TOP``) on the concept's tokens, and at least ``min_hits`` of them.

    Returns:
        ``{name: {"passed": bool, "best": row dict or None, "candidates": DataFrame,
        "occurrences": int}}``; ``occurrences`` counts the concept's tokens in the scanned
        held-out text.
    """
    report = {}
    examples, _ = find_examples(rm)
    for name, concept in CONCEPTS.items():
        df = concept_features(rm, concept)
        hits = df["selectivity"] * df["top_tokens"].map(len)
        ok = df[(df["selectivity"] > threshold) & (hits >= min_hits)]
        best = (ok if len(ok) else df).head(1).to_dict("records")
        report[name] = {"passed": bool(len(ok)), "best": best[0] if best else None, "candidates": df,
                        "occurrences": occurrences(examples, concept.pattern)}
    return report


def main() -> int:
    """Print the sanity report of the embedded model's bundled transcoders."""
    import circuitlab

    report = sanity(circuitlab.load("gemma-3-270m"))
    for name, result in report.items():
        best = result["best"]
        print(f"{name}: {'PASS' if result['passed'] else 'FAIL'} "
              f"({result['occurrences']} such tokens in the scanned held-out text)")
        if best is not None:
            print(f"  best L{best['layer']}/F{best['feature']}: selectivity {best['selectivity']:.2f} "
                  f"over top {len(best['top_tokens'])} (of {N_TOP}) contexts, fires on {best['hits']} examples, "
                  f"top tokens {best['top_tokens']}")
        print(result["candidates"][["layer", "feature", "score", "hits", "selectivity"]].head(8).to_string())
    return 0 if all(r["passed"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
