"""Viewing attribution graphs: the notebook explorer, the offline HTML export and
Neuronpedia graph JSON import."""

from __future__ import annotations

from .explore import explore
from .html import to_html
from .neuronpedia import from_neuronpedia

__all__ = ["explore", "to_html", "from_neuronpedia"]
