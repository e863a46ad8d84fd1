"""Features: the former home of feature cards, search and graph comparison.

Kept so that existing code such as ``from circuitlab.features import features_for`` keeps
working; new code should import from where things live now:

- ``circuitlab.cards``: the feature-card store at runtime (``FeatureCard``, ``Examples``,
  ``find_examples``, ``feature_card``, ``output_tokens``, ...).
- ``circuitlab.prompts``: per-prompt helpers, also methods of ``ReplacementModel``
  (``activations``, ``locate``, ``token_strs``, ``unembedding``).
- ``circuitlab.search``: feature search (``features_for``, ``features_by_output``,
  ``features_by_examples``).
- ``circuitlab.comparison``: graph comparison (``compare``, ``Comparison``) and
  ``suggest_supernodes``.
- ``circuitlab.train.build_cards``: building the cards (``build_examples``, the
  ``circuitlab cards`` command); not re-exported here, so the runtime never imports
  the training package.
"""

from __future__ import annotations

from .cards import (FORMAT, N_BINS, N_TOP, NO_EXAMPLES, Examples, FeatureCard, cards_path,
                    feature_card, find_examples, manifest_key, output_tokens, read_examples,
                    transcoder_key)
from .comparison import Comparison, compare, suggest_supernodes
from .prompts import activations, locate, token_strs, unembedding
from .search import features_by_examples, features_by_output, features_for

__all__ = [
    "FORMAT", "N_BINS", "N_TOP", "NO_EXAMPLES", "Examples", "FeatureCard", "activations",
    "cards_path", "feature_card", "find_examples", "locate", "manifest_key", "output_tokens",
    "read_examples", "token_strs", "transcoder_key", "unembedding",
    "Comparison", "compare", "suggest_supernodes",
    "features_by_examples", "features_by_output", "features_for",
]
