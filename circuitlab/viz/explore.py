"""``explore``: the widget explorer where widgets work, a static figure where not."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import CircuitlabError
from ..graph import Graph
from .figure import graph_figure
from .state import ViewState

try:  # the explorer is an anywidget (which needs ipywidgets)
    import anywidget  # noqa: F401 - imported to check it is there

    from .explorer import Explorer
    _WHY = None
except ImportError as e:
    Explorer, _WHY = None, f"{e.name} is not installed (pip install ipywidgets anywidget)"


def widgets_unavailable() -> str | None:
    """Why the widget explorer cannot run here, or ``None`` if it can."""
    return _WHY


def enable_colab() -> bool:
    """On Colab, enable the custom widget manager that third-party widgets need."""
    try:
        from google.colab import output
    except ImportError:
        return False
    output.enable_custom_widget_manager()
    return True


def as_graph(graph) -> Graph:
    """A ``Graph`` from a graph, a saved-graph folder or a Neuronpedia JSON file or dict."""
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, dict) or str(graph).endswith(".json"):
        return Graph.from_neuronpedia(graph)
    if isinstance(graph, (str, os.PathLike)) and Path(graph).is_dir():
        return Graph.load(graph)
    raise CircuitlabError(f"Cannot explore {graph!r}: pass a Graph, a saved-graph folder or a "
                          "Neuronpedia graph JSON file.")


def explore(graph, rm=None, *, prune: bool = True, height: int = 560):
    """Explore an attribution graph in the notebook.

    Args:
        graph: a ``Graph``, a saved-graph folder or a Neuronpedia graph JSON (path or dict).
        rm: optional ``ReplacementModel``: top output tokens in hovers and feature cards.
        prune: prune an unpruned graph once for display (``graph.prune()`` defaults);
            the explorer's sliders prune that display graph further.
        height: the explorer's height in pixels.

    Returns:
        An ``Explorer`` widget: the offline HTML viewer in the notebook, synced with
        Python (``view.selected``, ``view.pinned``, ``view.supernodes``, ``view.labels``,
        ``view.pin(ids)``, ``view.group(ids, name)``, ``view.label(id, text)``,
        ``view.set_thresholds(node, edge)``); labels, pins and supernodes set in the page
        land in the graph and its labels file. Where widgets are unavailable, a static
        Plotly figure whose title says so.
    """
    graph = as_graph(graph)
    why = widgets_unavailable()
    if why is None:
        enable_colab()
        return Explorer(graph, rm, prune=prune, height=height)
    message = f"static figure: interactive widgets unavailable ({why})"
    warnings.warn(message, stacklevel=2)
    fig = graph_figure(ViewState(graph, prune, rm), height=height)
    fig.update_layout(title={"text": message, "font": {"size": 13}}, margin={"t": 40})
    return fig
