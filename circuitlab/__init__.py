"""circuitlab: attribution graphs of transcoder features, inside Jupyter.

The names below load on first use, so ``import circuitlab`` (and ``circuitlab --help``)
stay fast: torch, TransformerLens and SAE-Lens are imported when a model is needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import CircuitlabError

#: Public name -> the module that defines it.
_EXPORTS = {
    "load": "loading", "attribute": "attribution", "Graph": "graph",
    "ReplacementModel": "replacement", "explore": "viz", "compare": "comparison",
    "swap": "interventions", "set_to": "interventions", "scale": "interventions",
    "ablate": "interventions", "add": "interventions", "Claims": "claims",
    "plan": "sizing", "trace_many": "batch", "aggregate": "aggregation",
    "Logit": "targets", "Feature": "targets", "Direction": "targets",
}

__all__ = ["CircuitlabError", *_EXPORTS]

if TYPE_CHECKING:
    from .aggregation import aggregate
    from .attribution import attribute
    from .batch import trace_many
    from .claims import Claims
    from .comparison import compare
    from .graph import Graph
    from .interventions import ablate, add, scale, set_to, swap
    from .loading import load
    from .replacement import ReplacementModel
    from .sizing import plan
    from .targets import Direction, Feature, Logit
    from .viz import explore


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'circuitlab' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
