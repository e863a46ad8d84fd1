"""What the explorer's glyphs, sizes, colours and links mean: one text for the offline
HTML viewer and the notebook widget (static HTML, no user text in it)."""

from __future__ import annotations

from .links import MAGNITUDES, NEGATIVE, POSITIVE, WIDTHS

#: Links drawn at most for the hovered, selected and pinned nodes (the strongest by |weight|).
MAX_LINKS = 300
#: Links always drawn, faintly: the strongest of the shown graph by their share of their
#: target's input. 150 shows a pruned graph's backbone (a few hundred features at the default
#: thresholds) without hiding its nodes; hovering, selecting and pinning draw the rest.
BACKBONE_LINKS = 150
#: Features with a text label beside their marker (the most influential shown), logits aside.
N_TEXT = 12

ERROR = ("the part of the MLP output at layer {layer}, position {pos} that the transcoder "
         "fails to reconstruct; a big error node means the transcoders miss part of the "
         "computation there")


def error_text(layer: int, pos: int) -> str:
    """What an error node is, for its hover."""
    return ERROR.format(layer=layer, pos=pos)


def _swatch(colour: str, width: float) -> str:
    return (f'<span style="display:inline-block;width:22px;height:{max(width, 1):.0f}px;'
            f'background:{colour};vertical-align:middle;margin:0 2px"></span>')


def _bins() -> str:
    edges = [f"{100 * a:g}" for a in MAGNITUDES[1:]]
    ranges = [f"&lt;{edges[0]}%"] + [f"{a}–{b}%" for a, b in zip(edges, edges[1:])] + [f"≥{edges[-1]}%"]
    return " ".join(f"{_swatch(p, w)}{_swatch(n, w)}{r}" for p, n, w, r in
                    zip(POSITIVE, NEGATIVE, WIDTHS, ranges))


LEGEND = f"""<div class="cl-legend" style="font-size:12px;line-height:1.5">
<b>Nodes</b>: ● feature (a transcoder feature active at that token) · ◆ error node · 
<span style="color:#7f9cc0">■</span> token embedding (bottom row) · 
<span style="color:#e0904a">■</span> output logit (top row, with its token) ·
<span style="color:#c0392b">★</span> a direction the graph explains in a layer's MLP input. Columns are
prompt tokens, rows are layers.<br>
<b>Size</b>: a feature's diameter ∝ √(its influence on the logits), the total weight of
its paths to the logits (weighted by their probabilities); darker orange = more influence.
In a crowded cell the strongest node sits left and drawn on top, and markers shrink so
they never overlap (zoom in to enlarge them). The most influential features carry their
label beside the marker.<br>
<b>Error node</b> ◆: {ERROR.format(layer="ℓ", pos="p")}.<br>
<b>Links</b>: the {BACKBONE_LINKS} strongest of the shown graph, faintly, and those of the
hovered, selected and pinned nodes (at most the {MAX_LINKS} strongest by |weight|): green excites the target, purple inhibits it; colour depth and width give
the link's share of the target's total absolute input: {_bins()}.<br>
<b>Outlines</b>: black = selected, gold = pinned, red = a feature the graph explains (a
target, like the logits); the selected node's neighbours take the colour of their link to it.<br>
<b>Scores</b>: replacement = share of the influence reaching the logits that starts at token
embeddings rather than error nodes; completeness = influence-weighted share of node inputs
not coming from error nodes. Pruning keeps the features carrying the node threshold's share
of influence, then the edges carrying the edge threshold's share.
</div>"""
