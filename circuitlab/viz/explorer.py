"""The notebook explorer: the offline viewer (``viewer.js``) as an anywidget, fed by the
HTML export's payload, with selection, pins, supernodes, labels and thresholds synced
with Python (and the graph's labels file).

The front end runs in JupyterLab, Notebook 7, VS Code and Colab (anywidget). What a
user does there reaches Python as trait changes (``selected``, ``pinned``, ``supernodes``,
``labels``, ``grid``); what Python sets reaches the page the same way. Annotations are
checked against the graph (``ViewState``) and written to its labels file when it has a
folder; a change the graph refuses is undone in the page.
"""

from __future__ import annotations

import anywidget
import plotly.offline
import traitlets

from ..errors import CircuitlabError
from ..prune import scores
from .card import card_data, fetch
from ..attention import head_loadings
from ..attribution import attribute
from ..graph import Graph
from ..targets import Feature
from .heads import HEADS_PER_LINK, link_key, loadings_data, qk_data, qk_key
from .html import front_end, payload, script_json
from .state import ViewState, node_name

#: The widget's module: Plotly (loaded once per page), the viewer, and its anywidget glue.
ESM = """
function loadPlotly(source) {  // Plotly's bundle sets globalThis.Plotly (module loaders hidden)
  if (!globalThis.Plotly) new Function("define", "module", "exports", source).call(globalThis);
  return globalThis.Plotly;
}
%%VIEWER%%
function render({ model, el }) {
  loadPlotly(model.get("_plotly"));
  const height = model.get("height"), viewers = [];
  function mount(data, view, title) {  // view 0: the graph; then the graphs traced from its nodes
    if (title) {
      const head = document.createElement("div");
      head.className = "cl-traced-title";
      head.textContent = title;
      el.appendChild(head);
    }
    const root = document.createElement("div");
    root.style.height = height + "px";
    if (view) root.classList.add("cl-traced");
    el.appendChild(root);
    const bridge = {
      changed(s) {
        if (view) return;  // only the first graph's selection and annotations sync
        for (const [k, v] of Object.entries(s)) model.set(k, v);
        model.save_changes();
      },
      card(request) { model.send({ type: "card", view, ...request }); },
      ask(request) { model.send({ view, ...request }); },
    };
    viewers[view] = circuitlabViewer(root, data, bridge);
    return viewers[view];
  }
  const api = mount(JSON.parse(model.get("_data")), 0, null);
  const names = ["selected", "pinned", "labels", "supernodes", "grid"];
  const sync = () => api.update(Object.fromEntries(names.map((k) => [k, model.get(k)])));
  names.forEach((k) => model.on("change:" + k, sync));
  model.on("msg:custom", (msg) => {
    const viewer = viewers[msg.view || 0];
    if (msg.type === "traced") mount(JSON.parse(msg.data), msg.view, msg.title);
    else if (!viewer) return;
    else if (msg.type === "card") viewer.setCard(msg.key, msg.card);
    else viewer.answer(msg);
  });
}
export default { render };
"""


class Explorer(anywidget.AnyWidget):
    """An attribution graph explorer (see ``circuitlab.viz.explore``).

    Hover a node to draw its links, click it to select it (shift-click pins it), follow
    its connections, read its feature card, search by label, token or id, group pinned
    nodes into supernodes, label nodes and prune with the sliders: the offline HTML
    viewer, in the notebook. With the model, a link's head loadings and a head's QK table
    are computed when clicked, and "trace from this node" traces a new graph with the
    selected feature as its target, shown below. Everything is also available from Python.

    Attributes:
        selected: the selected node id, or ``None``.
        pinned: pinned node ids.
        supernodes: supernode name -> node ids (the format interventions take).
        labels: node id -> label.
        grid: ``[node, edge]`` indices of the prune sliders (``set_thresholds`` sets them).
        traced: the graphs traced from this graph's nodes (``trace_from``), in order.
    """

    _esm = traitlets.Unicode(ESM.replace("%%VIEWER%%", front_end("viewer.js"))).tag(sync=True)
    _css = traitlets.Unicode(front_end("viewer.css")).tag(sync=True)
    _plotly = traitlets.Unicode().tag(sync=True)
    _data = traitlets.Unicode().tag(sync=True)
    height = traitlets.Int(640).tag(sync=True)
    selected = traitlets.Unicode(None, allow_none=True).tag(sync=True)
    pinned = traitlets.List(traitlets.Unicode()).tag(sync=True)
    supernodes = traitlets.Dict().tag(sync=True)
    labels = traitlets.Dict().tag(sync=True)
    grid = traitlets.List(traitlets.Int(), minlen=2, maxlen=2).tag(sync=True)
    _syncing = False

    def __init__(self, graph, rm=None, *, prune: bool = True, height: int = 640):
        self.state = ViewState(graph, prune, rm)
        self.state.set_thresholds(1.0, 1.0)
        self._views = [self.state]
        self.traced: list[Graph] = []
        data = payload(self.state, precompute=False)
        self._thresholds = (data["grid"]["node"], data["grid"]["edge"])
        super().__init__(_plotly=plotly.offline.get_plotlyjs(), _data=script_json(data),
                         height=height, grid=list(data["grid"]["default"]))
        self._pull()
        self.observe(self._on_annotations, names=["pinned", "supernodes", "labels"])
        self.observe(self._on_selected, names=["selected"])
        self.on_msg(self._on_message)

    # ------------------------------------------------------------------ Python API

    def select(self, node_id: str | None) -> None:
        """Select a node shown at the current thresholds (``None`` clears the selection)."""
        if node_id is not None:
            self.state.check_ids(node_id)
            if node_id not in self.state.row:
                raise CircuitlabError(f"Node {node_id!r} is not in the displayed graph; explore "
                                      "the graph with prune=False to show it.")
        self.selected = node_id

    def pin(self, ids) -> None:
        """Pin one node id or several."""
        self._apply(self.state.pin, ids)

    def unpin(self, ids) -> None:
        """Unpin one node id or several."""
        self._apply(self.state.unpin, ids)

    def group(self, ids, name: str) -> None:
        """Group nodes into supernode ``name`` (they are pinned too)."""
        self._apply(self.state.group, ids, name)

    def rename(self, old: str, new: str) -> None:
        """Rename a supernode."""
        self._apply(self.state.rename, old, new)

    def ungroup(self, name: str) -> None:
        """Dissolve a supernode; its nodes stay pinned."""
        self._apply(self.state.ungroup, name)

    def label(self, node_id: str, text: str) -> None:
        """Label a node; an empty text removes its label."""
        self._apply(self.state.label, node_id, text)

    def set_thresholds(self, node_threshold: float, edge_threshold: float) -> None:
        """Move the prune sliders to the grid's thresholds nearest these (1 and 1: all)."""
        nodes, edges = self._thresholds
        self.grid = [min(range(len(nodes)), key=lambda i: abs(nodes[i] - node_threshold)),
                     min(range(len(edges)), key=lambda j: abs(edges[j] - edge_threshold))]

    def trace_from(self, node_id: str, **options) -> Graph:
        """Trace a new graph of this prompt whose target is feature node ``node_id`` (why
        does it fire?), and show it below this one (the "trace from this node" button).

        Args:
            node_id: a feature node of this graph.
            **options: for ``circuitlab.attribute`` (default: this graph's node budget).

        Returns:
            The new graph (also appended to ``traced``).

        Raises:
            CircuitlabError: without the model, or for a node that is not a feature.
        """
        return self._trace(self.state, node_id, **options)

    def _trace(self, s: ViewState, node_id: str, **options) -> Graph:
        """``trace_from`` a node of the graph of view ``s`` (this graph or a traced one)."""
        if s.rm is None:
            raise CircuitlabError("Tracing from a node needs the model: explore the graph with "
                                  "it (graph.show(rm)).")
        s.check_ids(node_id)
        node = s.source.nodes.iloc[s.source.index(node_id)]
        if node["kind"] != "feature":
            raise CircuitlabError(f"{node_id!r} is a {node['kind']} node; trace from a feature "
                                  "(a logit is what the graph already explains).")
        options = {"max_feature_nodes": s.source.metadata.get("max_feature_nodes", 8192),
                   "progress": False, **options}
        target = Feature(int(node["layer"]), int(node["pos"]), int(node["feature"]))
        graph = attribute(s.rm, s.source.prompt, targets=[target], **options)
        self.traced.append(graph)
        state = ViewState(graph, True, s.rm)
        state.set_thresholds(1.0, 1.0)
        self._views.append(state)
        self.send({"type": "traced", "view": len(self._views) - 1,
                   "title": f"Traced from {node_name(node.to_dict(), s.labels, s.examples)} "
                            f"({node_id}): what makes it fire",
                   "data": script_json(payload(state, precompute=False))})
        return graph

    @property
    def thresholds(self) -> tuple[float, float]:
        """The node and edge thresholds the sliders are at."""
        return self._thresholds[0][self.grid[0]], self._thresholds[1][self.grid[1]]

    def scores(self) -> dict:
        """Replacement and completeness of the graph at the sliders' thresholds and of its
        pinned subgraph (the pinned nodes shown there, plus the logits; ``None`` without).
        """
        shown = self.state.base.prune(*self.thresholds)
        out = {"graph": scores(shown), "pinned": None}
        rows = [shown.index(i) for i in self.pinned if i in set(shown.nodes["node_id"])]
        if rows:
            mask = shown.target_mask.clone()
            mask[rows] = True
            out["pinned"] = scores(shown, nodes=mask)
        return out

    # ------------------------------------------------------------------ syncing

    def _apply(self, fn, *args) -> None:
        """Run an annotation change on the graph, then show the result in the page."""
        fn(*args)
        self._pull()

    def _pull(self) -> None:
        """Copy the graph's annotations into the traits (without echoing them back)."""
        self._syncing = True
        try:
            doc = self.state.source.annotations()
            self.pinned, self.supernodes, self.labels = doc["pinned"], doc["supernodes"], doc["labels"]
        finally:
            self._syncing = False

    def _on_annotations(self, change) -> None:
        """Annotations edited in the page: checked on the graph and saved to its labels
        file; a change the graph refuses is undone in the page."""
        if self._syncing:
            return
        graph = self.state.source
        before = graph.annotations()
        try:
            self.state.check_ids(list(self.pinned) + list(self.labels)
                                 + [i for ids in self.supernodes.values() for i in ids])
            graph.annotate({"labels": {k: v for k, v in self.labels.items() if str(v).strip()},
                            "pinned": list(dict.fromkeys(self.pinned)),
                            "supernodes": dict(self.supernodes)})
            self.state.save()
        except CircuitlabError:
            graph.annotate(before)
        self._pull()

    def _on_selected(self, change) -> None:
        if change["new"] is not None and change["new"] not in self.state.row:
            self.selected = None

    def _on_message(self, widget, content, buffers) -> None:
        """What the page asks for: a card (computed on the model, with live examples, when
        there is one), a link's head loadings or a head's QK table (on the model)."""
        if not isinstance(content, dict):
            return
        kind, view = content.get("type"), int(content.get("view", 0))
        if not 0 <= view < len(self._views):
            return
        s = self._views[view]
        if kind == "trace":
            try:
                self._trace(s, content["node"])
                self.send({"type": "trace", "view": view})
            except CircuitlabError as err:
                self.send({"type": "trace", "view": view, "error": str(err)})
        if kind in ("loadings", "qk"):
            self.send({**self._attention(s, content), "view": view})
        if kind != "card":
            return
        layer, feature, node = int(content["layer"]), int(content["feature"]), content["node"]
        card = fetch(s.rm, layer, feature, tokens=s.shown.tokens, pos=int(content["pos"]),
                     transcoders=s.shown.metadata.get("transcoders"))
        outputs = s.outputs.get(node, {})
        card.top_tokens = outputs.get("raises", card.top_tokens)
        card.bottom_tokens = outputs.get("lowers", card.bottom_tokens)
        vocab: dict = {}
        data = card_data(card, vocab)
        data["contexts"] = [[q, [list(vocab)[t] for t in toks], acts]
                            for q, toks, acts in data["contexts"]]
        self.send({"type": "card", "view": view, "key": f"{layer}/{feature}", "card": data})

    def _attention(self, s: ViewState, request: dict) -> dict:
        """The answer to a request for a link's head loadings or a head's QK table (on the
        graph of view ``s``): the data, or an error message the page shows."""
        if request["type"] == "loadings":
            key = link_key(request["source"], request["target"])
            answer = {"type": "loadings", "key": key}
        else:
            args = [int(request[k]) for k in ("layer", "head", "q", "k")]
            answer = {"type": "qk", "key": qk_key(*args)}
        if s.rm is None:
            return {**answer, "error": "no model: pass the model to show() to compute this"}
        try:
            if request["type"] == "loadings":
                edge = [(request["source"], request["target"])]
                table = head_loadings(s.rm, s.shown, edge, top=HEADS_PER_LINK)
                return {**answer, "rows": loadings_data(table).get(answer["key"], [])}
            return {**answer, "table": qk_data(s.rm, s.shown, *args)}
        except CircuitlabError as err:
            return {**answer, "error": str(err)}
