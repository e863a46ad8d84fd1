"""The notebook explorer: a Plotly ``FigureWidget`` with ipywidgets panels, sharing its
state (selection, pins, supernodes, labels) with Python."""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go

from ..errors import CircuitlabError
from .card import fetch, render
from .figure import (METRICS, NODE_TRACES, graph_figure, link_updates, node_updates, pixels,
                     subgraph_figure)
from .legend import LEGEND
from .links import N_BINS
from .state import LINK_TYPES, ViewState

SIDES = [("input", "positive"), ("input", "negative"), ("output", "positive"), ("output", "negative")]


class Explorer(widgets.VBox):
    """An attribution graph explorer (see ``circuitlab.viz.explore``).

    Hover a node to draw its links, click it to select it (ctrl/shift-click pins it),
    pick rows in the connections panel to move along edges, search by name or id, group
    pinned nodes into supernodes in the subgraph tab, and prune with the sliders.
    Everything is also available from Python.
    """

    def __init__(self, graph, rm=None, *, prune: bool = True, height: int = 560, width: int = 820):
        self.state = ViewState(graph, prune, rm)
        self._filling = False
        self.px = pixels(self.state, width, height)
        self.figure = go.FigureWidget(graph_figure(self.state, height=height, width=width))
        for trace in self.figure.data[NODE_TRACES]:
            trace.on_click(self._on_click)
            trace.on_hover(self._on_hover)
        self.subfigure = go.FigureWidget(subgraph_figure(self.state))
        self.controls = self._controls()
        self.status = widgets.HTML()
        self.drawn = widgets.HTML()
        self.connections = [widgets.Select(options=[], rows=7, layout={"width": "99%"})
                            for _ in SIDES]
        for sel in self.connections:
            sel.observe(self._on_row, "value")
        self.card = widgets.HTML("<i>select a feature</i>")
        legend = widgets.HTML(LEGEND, layout={"width": "98%"})
        self.tabs = widgets.Tab([self._connections_panel(), self.card, self._subgraph_panel(), legend])
        for i, title in enumerate(["Connections", "Feature", "Subgraph", "Legend"]):
            self.tabs.set_title(i, title)
        self.tabs.layout = {"width": "440px", "min_width": "440px"}
        plot = widgets.Box([self.figure], layout={"width": f"{width + 10}px", "overflow": "hidden"})
        main = widgets.HBox([plot, self.tabs], layout={"flex_flow": "row wrap"})  # panel wraps below
        super().__init__([self.controls, widgets.HBox([self.status, self.drawn]), main])
        self.add_class("circuitlab-explorer")
        self._refresh()

    # ------------------------------------------------------------------ Python API

    @property
    def selected(self) -> str | None:
        """The selected node id, or ``None``."""
        return self.state.selected

    def select(self, node_id: str | None) -> None:
        """Select a node (``None`` clears the selection)."""
        self.state.select(node_id)
        self._refresh()

    @property
    def pinned(self) -> list[str]:
        """Pinned node ids (a copy)."""
        return list(self.state.pinned)

    def pin(self, ids) -> None:
        """Pin one node id or several."""
        self.state.pin(ids)
        self._refresh()

    def unpin(self, ids) -> None:
        """Unpin one node id or several."""
        self.state.unpin(ids)
        self._refresh()

    @property
    def supernodes(self) -> dict:
        """Supernode name -> node ids (a copy; the format interventions take)."""
        return {k: list(v) for k, v in self.state.supernodes.items()}

    def group(self, ids, name: str) -> None:
        """Group nodes into supernode ``name`` (they are pinned too)."""
        self.state.group(ids, name)
        self._refresh()

    def rename(self, old: str, new: str) -> None:
        """Rename a supernode."""
        self.state.rename(old, new)
        self._refresh()

    def ungroup(self, name: str) -> None:
        """Dissolve a supernode; its nodes stay pinned."""
        self.state.ungroup(name)
        self._refresh()

    @property
    def labels(self) -> dict:
        """Node id -> label (a copy)."""
        return dict(self.state.labels)

    def label(self, node_id: str, text: str) -> None:
        """Label a node; an empty text removes its label."""
        self.state.label(node_id, text)
        self._refresh()

    def set_thresholds(self, node_threshold: float, edge_threshold: float) -> None:
        """Prune the display (as the sliders do); 1 and 1 show the whole display graph."""
        self.node_slider.value, self.edge_slider.value = node_threshold, edge_threshold

    # ------------------------------------------------------------------ panels

    def _controls(self) -> widgets.Widget:
        self.size_by = widgets.Dropdown(options=METRICS, description="size", layout={"width": "170px"})
        self.colour_by = widgets.Dropdown(options=METRICS, description="colour", layout={"width": "170px"})
        self.link_type = widgets.ToggleButtons(options=LINK_TYPES, value="both",
                                               style={"button_width": "70px"})
        slider = dict(min=0.05, max=1.0, step=0.01, continuous_update=False,
                      readout_format=".2f", style={"description_width": "90px"})
        self.node_slider = widgets.FloatSlider(description="node thresh.", value=self.state.node_threshold, **slider)
        self.edge_slider = widgets.FloatSlider(description="edge thresh.", value=self.state.edge_threshold, **slider)
        self.search = widgets.Combobox(placeholder="search label, token or id", ensure_option=True,
                                       layout={"width": "260px"})
        self.search.observe(self._on_search, "value")
        for w in (self.size_by, self.colour_by, self.link_type):
            w.observe(lambda _: self._refresh(), "value")
        for w in (self.node_slider, self.edge_slider):
            w.observe(self._on_threshold, "value")
        return widgets.VBox([widgets.HBox([self.size_by, self.colour_by, self.link_type]),
                             widgets.HBox([self.node_slider, self.edge_slider, self.search])])

    def _connections_panel(self) -> widgets.Widget:
        self.pin_button = widgets.Button(description="pin / unpin", layout={"width": "100px"})
        self.pin_button.on_click(lambda _: self._toggle_pin(self.selected))
        self.label_text = widgets.Text(placeholder="label of the selected node", layout={"width": "60%"})
        label_button = widgets.Button(description="set label", layout={"width": "90px"})
        label_button.on_click(lambda _: self.selected and self.label(self.selected, self.label_text.value))
        self.heading = widgets.HTML("<i>click a node</i>")
        rows = [self.heading, widgets.HBox([self.pin_button, self.label_text, label_button])]
        for (side, sign), sel in zip(SIDES, self.connections):
            rows += [widgets.HTML(f"<b>{side}s</b>, {sign}"), sel]
        return widgets.VBox(rows)

    def _subgraph_panel(self) -> widgets.Widget:
        self.group_name = widgets.Text(placeholder="supernode name", layout={"width": "45%"})
        group = widgets.Button(description="group pinned", layout={"width": "110px"})
        group.on_click(lambda _: self._guard(self.group, self._ungrouped_pins(), self.group_name.value))
        self.supernode_pick = widgets.Dropdown(options=[], layout={"width": "35%"})
        self.new_name = widgets.Text(placeholder="new name", layout={"width": "30%"})
        rename = widgets.Button(description="rename", layout={"width": "70px"})
        rename.on_click(lambda _: self._guard(self.rename, self.supernode_pick.value, self.new_name.value))
        ungroup = widgets.Button(description="ungroup", layout={"width": "70px"})
        ungroup.on_click(lambda _: self._guard(self.ungroup, self.supernode_pick.value))
        self.scores_html = widgets.HTML()
        return widgets.VBox([self.scores_html, self.subfigure, widgets.HBox([self.group_name, group]),
                             widgets.HBox([self.supernode_pick, self.new_name, rename, ungroup])])

    # ------------------------------------------------------------------ events

    def _guard(self, fn, *args) -> None:
        """Run a UI action; show a ``CircuitlabError`` in the status line instead of raising."""
        try:
            fn(*args)
        except CircuitlabError as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"

    def _ungrouped_pins(self) -> list[str]:
        grouped = {i for ids in self.state.supernodes.values() for i in ids}
        return [i for i in self.state.pinned if i not in grouped]

    def _toggle_pin(self, node_id: str | None) -> None:
        if node_id is not None:
            (self.unpin if node_id in self.state.pinned else self.pin)(node_id)

    def _on_click(self, trace, points, state) -> None:
        if not points.point_inds:
            return
        node_id = self.state.ids[int(trace.customdata[points.point_inds[0]])]
        if getattr(state, "ctrl", False) or getattr(state, "shift", False) or getattr(state, "meta", False):
            self._toggle_pin(node_id)
        else:
            self.select(None if node_id == self.selected else node_id)

    def _on_hover(self, trace, points, state) -> None:
        if points.point_inds:
            self.state.hovered = self.state.ids[int(trace.customdata[points.point_inds[0]])]
            self._draw_links()

    def _on_search(self, change) -> None:
        node_id = self._search_ids.get(change["new"])
        if node_id is not None and node_id != self.selected:
            self.select(node_id)

    def _on_unit_click(self, trace, points, state) -> None:
        units, _ = self.state.subgraph()
        if points.point_inds:
            self.select(units[points.point_inds[0]]["members"][0])

    def _on_row(self, change) -> None:
        if not self._filling and change["new"] and change["new"] != self.selected:
            self._guard(self.select, change["new"])

    def _on_threshold(self, _) -> None:
        self.status.value = "<i>pruning…</i>"
        self.state.set_thresholds(self.node_slider.value, self.edge_slider.value)
        self._rebuild()

    # ------------------------------------------------------------------ drawing

    def _rebuild(self) -> None:
        """Redraw everything after the shown nodes changed."""
        fresh = graph_figure(self.state, self.size_by.value, self.colour_by.value,
                             height=self.figure.layout.height, width=self.figure.layout.width)
        self.px = pixels(self.state, self.figure.layout.width, self.figure.layout.height)
        with self.figure.batch_update():
            for old, new in zip(self.figure.data, fresh.data):
                old.update(x=new.x, y=new.y, customdata=new.customdata, hovertext=new.hovertext,
                           text=new.text)
            self.figure.layout.xaxis.update(fresh.layout.xaxis)
            self.figure.layout.shapes = fresh.layout.shapes
        self._refresh()

    def _refresh(self) -> None:
        """Redraw styles, links and panels from the state."""
        self.state.link_type = self.link_type.value
        with self.figure.batch_update():
            for trace, marker in zip(self.figure.data[NODE_TRACES], node_updates(
                    self.state, self.size_by.value, self.colour_by.value, self.px)):
                trace.marker.update(marker)
        self._draw_links()
        names = self.state.names()
        self._search_ids = {f"{name} · {i}": i for name, i in zip(names, self.state.ids)}
        self.search.options = list(self._search_ids)
        fresh = subgraph_figure(self.state)
        with self.subfigure.batch_update():
            self.subfigure.data = []
            self.subfigure.add_traces(fresh.data)
        if len(self.subfigure.data) > N_BINS:
            self.subfigure.data[-1].on_click(self._on_unit_click)
        self.supernode_pick.options = list(self.state.supernodes)
        self._show_counts()
        self._show_selection()

    def _draw_links(self) -> None:
        """Redraw the links of the hovered, selected and pinned nodes."""
        with self.figure.batch_update():
            for trace, (x, y) in zip(self.figure.data[:N_BINS], link_updates(self.state)):
                trace.x, trace.y = x, y
        drawn, total = len(self.state.links()[0]), len(self.state.all_links()[0])
        self.drawn.value = f"{drawn:,} links drawn" + (
            f" (the strongest of {total:,})" if total > drawn else "")

    def _show_counts(self) -> None:
        c, s = self.state.counts(), self.state.scores()
        self.status.value = (
            f"nodes {c['nodes']:,} / {c['base_nodes']:,} · edges {c['edges']:,} / "
            f"{c['base_edges']:,} · replacement {s['graph']['replacement']:.3f} · "
            f"completeness {s['graph']['completeness']:.3f}")
        pinned = s["pinned"]
        self.scores_html.value = (
            f"<b>pinned subgraph</b>: {len(self.state.pinned)} pinned · " + (
                f"replacement {pinned['replacement']:.3f} · completeness "
                f"{pinned['completeness']:.3f}" if pinned else "pin nodes to score them"))

    def _show_selection(self) -> None:
        node_id = self.selected
        if node_id is None:
            self.heading.value = "<i>click a node (ctrl/shift-click pins it)</i>"
            self._filling = True
            for sel in self.connections:
                sel.options = []
            self._filling = False
            return
        row = self.state.shown.nodes.iloc[self.state.row[node_id]]
        name = self.state.names()[self.state.row[node_id]]
        self.heading.value = f"<b>{html.escape(name)}</b> <code>{html.escape(node_id)}</code>"
        self.label_text.value = self.state.labels.get(node_id, "")
        conns = self.state.connections(node_id)
        self._filling = True
        for (side, sign), sel in zip(SIDES, self.connections):
            sel.options = [(f"{r['weight']:+.3f}  {r['place']:<4} {r['name']}"
                            + ("  ↔pos" if r["other_pos"] else ""), r["node_id"])
                           for r in conns[side][sign]]
            sel.value = None
        self._filling = False
        if row["kind"] == "feature":
            card = fetch(self.state.rm, int(row["layer"]), int(row["feature"]),
                         tokens=self.state.shown.tokens, pos=int(row["pos"]),
                         label=self.state.labels.get(node_id, ""), activation=float(row["activation"]),
                         transcoders=self.state.shown.metadata.get("transcoders"))
            self.card.value = render(card)
        else:
            self.card.value = f"<i>{html.escape(name)}: not a feature</i>"

