// circuitlab's graph explorer: the one front end of the offline HTML file and of the notebook
// widget. circuitlabViewer(root, data, bridge) builds the explorer inside the element root
// from the payload data (nodes, edges as base64 typed arrays with the grid pruning codes,
// layouts, cards, labels, pins and supernodes). bridge is null in the HTML file; in the
// notebook it carries changes back to Python (bridge.changed) and asks Python for the cards
// of features without cached examples (bridge.card) and for the head loadings and QK tables
// the file does not hold (bridge.ask, answered through api.answer). Every user text goes into the page
// through textContent, and into Plotly texts through esc(); annotations changed here can be
// downloaded as labels.json.
var SKELETON = '<header><b id="cl-title"></b>' +
  '<span id="cl-counts"></span><span id="cl-scores"></span>' +
  '<label>node threshold <input id="cl-node" type="range" min="0" step="1"> <span id="cl-node-value"></span></label>' +
  '<label>edge threshold <input id="cl-edge" type="range" min="0" step="1"> <span id="cl-edge-value"></span></label>' +
  '<label>links <select id="cl-linktype"><option>both</option><option>input</option><option>output</option></select></label>' +
  '<span id="cl-drawn"></span></header>' +
  '<details class="cl-legend-box"><summary>Legend: what the glyphs, sizes, colours and links mean</summary><div id="cl-legend"></div></details>' +
  '<main><div class="cl-wrap"><svg id="cl-links"></svg><div id="cl-plot"></div></div>' +
  '<aside><input id="cl-search" placeholder="search a label, token or node id" style="width:95%">' +
  '<div id="cl-search-results"></div><div id="cl-status"></div>' +
  '<div id="cl-selection"></div>' +
  '<div id="cl-node-tools" hidden><button id="cl-pin">pin / unpin</button> <button id="cl-trace">trace from this node</button>' +
  '<span id="cl-trace-why" class="cl-muted"></span><br>' +
  '<input id="cl-label" placeholder="label of the selected node"><button id="cl-set-label">set label</button></div>' +
  '<div id="cl-link"></div><div id="cl-qk"></div>' +
  '<div id="cl-card"></div><div id="cl-connections"></div>' +
  '<div class="cl-title">Subgraph: pinned nodes and supernodes</div><div id="cl-pinned"></div>' +
  '<div><input id="cl-group-name" placeholder="supernode name"><button id="cl-group">group pinned</button></div>' +
  '<div id="cl-supernodes"></div><div id="cl-subscores"></div><div id="cl-subplot" style="height:260px"></div>' +
  '<button id="cl-download">download labels.json</button></aside></main>';

function circuitlabViewer(root, data, bridge) {
  "use strict";
  root.classList.add("cl-root");
  root.innerHTML = SKELETON;  // static markup: no user text in it
  var $ = function (id) { return root.querySelector("#" + id); };
  $("cl-title").textContent = data.prompt;
  $("cl-legend").innerHTML = data.legend;  // circuitlab's own static legend
  var plot = $("cl-plot"), svg = $("cl-links"), N = data.nodes, G = data.grid;
  var n = N.id.length, nBins = data.bins.colours.length, never = G.edge.length;

  function bytes(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var k = 0; k < s.length; k++) out[k] = s.charCodeAt(k);
    return out;
  }
  var src = new (data.edges.src_bytes === 2 ? Uint16Array : Uint32Array)(bytes(data.edges.src).buffer), w = new Float32Array(bytes(data.edges.w).buffer);
  var code3 = bytes(data.edges.code), E = src.length, tgt = new Uint32Array(E);
  var off = data.edges.offsets, outEdges = [];
  for (var i = 0; i < n; i++) { outEdges.push([]); for (var e = off[i]; e < off[i + 1]; e++) tgt[e] = i; }
  for (e = 0; e < E; e++) outEdges[src[e]].push(e);
  var index = {};
  N.id.forEach(function (id, r) { index[id] = r; });

  var state = { i: G["default"][0], j: G["default"][1], hovered: null, selected: null,
                pinned: [], labels: Object.assign({}, data.labels), supernodes: {}, linkType: "both",
                link: null, head: null };
  data.pinned.forEach(function (id) { if (id in index) state.pinned.push(id); });
  Object.keys(data.supernodes).forEach(function (k) { state.supernodes[k] = data.supernodes[k].slice(); });
  var kept = new Uint8Array(E), shown = new Uint8Array(n), total = new Float64Array(n), share = new Float32Array(E);

  function el(tag, text, cls) {
    var x = document.createElement(tag);
    if (text !== undefined) x.textContent = text;
    if (cls) x.className = cls;
    return x;
  }
  function esc(t) { return String(t).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
  function short(t) { return t.length <= 28 ? t : t.slice(0, 27) + "…"; }
  function name(r) { return state.labels[N.id[r]] || N.auto[r]; }
  function fid(r) { return "L" + N.layer[r] + "/F" + N.feature[r]; }
  function status(text, bad) { var s = $("cl-status"); s.textContent = text || ""; s.className = bad ? "cl-error" : "cl-muted"; }
  function fmt(x) { return x.toLocaleString("en-US"); }

  // ------------------------------------------------------------------ pruning on the grid
  function prune() {
    var shift = 3 * state.i, nodes = 0, feats = 0, edges = 0;
    shown.fill(0); total.fill(0);
    for (var r = 0; r < n; r++) if (N.kind[r] === "logit" || N.target[r]) shown[r] = 1;
    for (var e = 0; e < E; e++) {
      var c = code3[3 * e] | (code3[3 * e + 1] << 8) | (code3[3 * e + 2] << 16);
      kept[e] = ((c >> shift) & 7) <= state.j ? 1 : 0;
      if (kept[e]) { shown[src[e]] = 1; total[tgt[e]] += Math.abs(w[e]); edges++; }
    }
    for (e = 0; e < E; e++) share[e] = kept[e] ? w[e] / Math.max(total[tgt[e]], 1e-30) : 0;
    for (r = 0; r < n; r++) if (shown[r]) { nodes++; if (N.kind[r] === "feature") feats++; }
    var c = { nodes: nodes, features: feats, edges: edges };
    var sc = G.scores[state.i][state.j];
    $("cl-counts").textContent = fmt(nodes) + " nodes (" + fmt(feats) + " features) · " + fmt(edges) + " links";
    $("cl-counts").dataset.nodes = nodes; $("cl-counts").dataset.features = feats; $("cl-counts").dataset.links = edges;
    $("cl-scores").textContent = "replacement " + sc[0].toFixed(3) + " · completeness " + sc[1].toFixed(3);
    $("cl-node-value").textContent = G.node[state.i]; $("cl-edge-value").textContent = G.edge[state.j];
    if (state.selected !== null && !shown[state.selected]) state.selected = null;
    return c;
  }
  function binOf(s) {
    var m = data.bins.magnitudes, k = 0;
    while (k + 1 < m.length && Math.abs(s) >= m[k + 1]) k++;
    return (s < 0 ? 0 : m.length) + k;
  }
  function edgesOf(r, side) {  // kept in- or out-edges of node r
    var out = [], e;
    if (side !== "output") for (e = off[r]; e < off[r + 1]; e++) if (kept[e]) out.push(e);
    if (side !== "input") outEdges[r].forEach(function (e) { if (kept[e]) out.push(e); });
    return out;
  }

  // ------------------------------------------------------------------ the plot
  var lay = function () { return G.layouts[state.i]; };
  function pixels() {
    var fl = plot._fullLayout, xa = fl.xaxis, ya = fl.yaxis;
    return [xa._length / (xa.range[1] - xa.range[0]), ya._length / (ya.range[1] - ya.range[0])];
  }
  function neighbours() {
    var out = {};
    if (state.selected === null) return out;
    edgesOf(state.selected, "output").forEach(function (e) { out[tgt[e]] = data.bins.colours[binOf(share[e])]; });
    edgesOf(state.selected, "input").forEach(function (e) { out[src[e]] = data.bins.colours[binOf(share[e])]; });
    return out;
  }
  function traces() {
    var L = lay(), px = plot._fullLayout ? pixels() : [8, 25], nb = neighbours();
    var pinned = new Set(state.pinned.map(function (id) { return index[id]; }));
    var out = data.kinds.map(function (k) {
      var rs = [];
      for (var r = 0; r < n; r++) if (shown[r] && N.kind[r] === k) rs.push(r);
      rs.sort(function (a, b) { return N.influence[a] - N.influence[b]; });  // strongest on top
      return { type: "scatter", mode: "markers", name: k, hoverinfo: "text", opacity: data.opacity[k],
        x: rs.map(function (r) { return L.x[r]; }), y: rs.map(function (r) { return N.y[r]; }), customdata: rs,
        hovertext: rs.map(function (r) { return "<b>" + esc(name(r)) + "</b><br>" + N.hover[r]; }),
        marker: { symbol: data.symbols[k],
          size: rs.map(function (r) { return N.size[r] * Math.min(1, L.room[r] * px[0], 0.9 * px[1] / 20); }),
          color: rs.map(function (r) { return nb[r] || N.fill[r]; }),
          line: { width: rs.map(function (r) { return r === state.selected || pinned.has(r) || (N.target[r] && k === "feature") ? 3 : 0.5; }),
                  color: rs.map(function (r) { return r === state.selected ? "#111111" : pinned.has(r) ? "#d4a017" : N.target[r] && k === "feature" ? "#c0392b" : "#555555"; }) } } };
    });
    var feats = [];
    for (var r = 0; r < n; r++) if (shown[r] && N.kind[r] === "feature") feats.push(r);
    feats.sort(function (a, b) { return N.influence[b] - N.influence[a]; });
    var text = feats.slice(0, data.n_text);
    for (r = 0; r < n; r++) if (shown[r] && (N.kind[r] === "logit" || (N.target[r] && text.indexOf(r) < 0))) text.push(r);
    var nLogit = 0;  // logits sit side by side: their tokens alternate above and below
    var where = text.map(function (r) { return N.kind[r] === "logit" && nLogit++ % 2 ? "bottom center" : "top center"; });
    out.push({ type: "scatter", mode: "text", hoverinfo: "skip", name: "labels", textposition: where,
      textfont: { size: 10, color: "#333333" }, x: text.map(function (r) { return L.x[r]; }),
      y: text.map(function (r) { return N.y[r]; }),
      text: text.map(function (r) { return esc(short(N.kind[r] === "logit" ? N.auto[r].replace(/^Logit /, "") : name(r))); }) });
    return out;
  }
  function figureLayout() {
    var L = lay(), top = data.layout.yaxis.range[1];
    var shapes = L.left.slice(1).map(function (x) {
      return { type: "line", x0: x - 0.3, x1: x - 0.3, y0: -0.5, y1: top - 0.1, line: { color: "#eeeeee", width: 1 } };
    });
    var xaxis = Object.assign({}, data.layout.xaxis, { tickvals: L.ticks, range: [-0.5, L.right + 0.5] });
    return Object.assign({}, data.layout, { xaxis: xaxis, shapes: shapes, autosize: true,
      paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", showlegend: false });
  }
  function redraw() { return Plotly.react(plot, traces(), figureLayout()).then(drawLinks); }

  // ------------------------------------------------------------------ links (an SVG under the plot)
  function focusLinks() {
    var focus = new Set(state.pinned.map(function (id) { return index[id]; }).filter(function (r) { return shown[r]; }));
    if (state.selected !== null) focus.add(state.selected);
    if (state.hovered !== null) focus.add(state.hovered);
    var edges = new Set();
    focus.forEach(function (r) { edgesOf(r, state.linkType).forEach(function (e) { edges.add(e); }); });
    var all = Array.from(edges).sort(function (a, b) { return Math.abs(w[b]) - Math.abs(w[a]); });
    return { all: all.length, drawn: all.slice(0, data.max_links) };
  }
  var drawnCount = 0;
  function backbone() {  // the strongest kept links by |share of their target's input|
    var all = [];
    for (var e = 0; e < E; e++) if (kept[e]) all.push(e);
    all.sort(function (a, b) { return Math.abs(share[b]) - Math.abs(share[a]); });
    return all.slice(0, data.backbone_links);
  }
  function drawLinks() {
    var fl = plot._fullLayout;
    if (!fl) return;
    var xa = fl.xaxis, ya = fl.yaxis, L = lay(), f = focusLinks(), ns = "http://www.w3.org/2000/svg";
    var focused = new Set(f.drawn), faint = f.drawn.length ? 0.25 : 0.6;
    var base = backbone().filter(function (e) { return !focused.has(e); });
    svg.replaceChildren();
    var clip = document.createElementNS(ns, "svg");
    clip.setAttribute("x", xa._offset); clip.setAttribute("y", ya._offset);
    clip.setAttribute("width", xa._length); clip.setAttribute("height", ya._length);
    function line(e, opacity) {
      var b = binOf(share[e]), l = document.createElementNS(ns, "line");
      l.setAttribute("x1", xa.l2p(L.x[src[e]])); l.setAttribute("y1", ya.l2p(N.y[src[e]]));
      l.setAttribute("x2", xa.l2p(L.x[tgt[e]])); l.setAttribute("y2", ya.l2p(N.y[tgt[e]]));
      l.setAttribute("stroke", data.bins.colours[b]); l.setAttribute("stroke-width", data.bins.widths[b]);
      l.setAttribute("stroke-opacity", opacity);
      clip.appendChild(l);
    }
    base.slice().reverse().forEach(function (e) { line(e, faint); });  // strongest last: on top
    f.drawn.slice().reverse().forEach(function (e) { line(e, 0.85); });
    svg.appendChild(clip);
    drawnCount = base.length + f.drawn.length;
    $("cl-drawn").textContent = drawnCount + " links drawn (the " + base.length + " strongest" +
      (f.drawn.length ? ", and " + f.drawn.length + " of the focused nodes" + (f.all > f.drawn.length ? " of " + fmt(f.all) : "") : "") + ")";
  }

  // ------------------------------------------------------------------ side panels
  function row(text, r, cls) {
    var x = el("div", text, cls || "cl-row");
    if (r !== undefined && r !== null) {
      x.dataset.node = N.id[r];
      x.addEventListener("click", function () { select(r); });
    }
    return x;
  }
  function connections(r) {
    var box = $("cl-connections");
    box.replaceChildren();
    [["inputs", "input", 1], ["inputs", "input", -1], ["outputs", "output", 1], ["outputs", "output", -1]].forEach(function (s) {
      var list = edgesOf(r, s[1]).filter(function (e) { return s[2] > 0 ? w[e] > 0 : w[e] < 0; })
        .sort(function (a, b) { return Math.abs(w[b]) - Math.abs(w[a]); });
      box.appendChild(el("div", s[0] + ", " + (s[2] > 0 ? "positive" : "negative") + " (" + list.length + ")", "cl-title"));
      list.slice(0, 25).forEach(function (e) {
        var o = s[1] === "input" ? src[e] : tgt[e], x = el("div", undefined, "cl-link-row");
        var heads = el("button", "heads", "cl-heads-button");
        heads.title = "which attention heads carry this link";
        heads.dataset.link = N.id[src[e]] + ">" + N.id[tgt[e]];
        heads.addEventListener("click", function () { showLink(e); });
        x.appendChild(heads);
        x.appendChild(row((w[e] > 0 ? "+" : "") + w[e].toFixed(3) + "  " + (N.place[o] + "    ").slice(0, 5) + name(o) +
          (N.pos[o] !== N.pos[r] ? "  ↔pos" : ""), o));
        box.appendChild(x);
      });
    });
  }
  function card(r) {
    var key = N.layer[r] + "/" + N.feature[r], c = data.cards[key], box = $("cl-card");
    box.replaceChildren();
    if (N.kind[r] !== "feature") return;
    if (bridge && bridge.card && (!c || (c.message === data.no_examples && !c.requested))) {
      data.cards[key] = c = Object.assign({}, c || {}, { requested: true });
      bridge.card({ layer: N.layer[r], feature: N.feature[r], pos: N.pos[r], node: N.id[r] });
    }
    if (!c || c.label === undefined) { box.appendChild(el("i", "loading the card…")); return; }
    box.appendChild(el("div", "activation on this prompt " + N.activation[r].toPrecision(3) + " · influence " + N.influence[r].toPrecision(3)));
    if (c.label) box.appendChild(el("div", "automatic label: " + c.label));
    if (c.message) box.appendChild(el("i", c.message));
    if (c.frequency !== null) box.appendChild(el("div", "fires on " + (100 * c.frequency).toPrecision(3) + "% of held-out tokens · max " + c.max.toPrecision(3)));
    [["raises", c.raises], ["lowers", c.lowers]].forEach(function (p) {
      if (p[1].length) box.appendChild(el("div", p[0] + ": " + p[1].map(function (t) { return JSON.stringify(t[0]) + " " + t[1].toFixed(2); }).join("  ")));
    });
    if (c.histogram) {
      var ns = "http://www.w3.org/2000/svg", h = document.createElementNS(ns, "svg"), counts = c.histogram[1];
      var top = Math.max.apply(null, counts.concat([1])), bw = 240 / counts.length;
      h.setAttribute("width", 240); h.setAttribute("height", 40);
      counts.forEach(function (v, k) {
        var rect = document.createElementNS(ns, "rect"), hh = 40 * v / top;
        rect.setAttribute("x", k * bw); rect.setAttribute("y", 40 - hh); rect.setAttribute("width", Math.max(bw - 1, 1));
        rect.setAttribute("height", hh); rect.setAttribute("fill", "#e0904a");
        h.appendChild(rect);
      });
      box.appendChild(el("div", "activation histogram (held-out text), 0 … " + c.histogram[0].toPrecision(3)));
      box.appendChild(h);
    }
    var q = null;
    c.contexts.forEach(function (ctx) {
      if (ctx[0] !== q) { q = ctx[0]; box.appendChild(el("div", q, "cl-title")); }
      var line = el("div", undefined, "cl-ctx"), top = Math.max.apply(null, ctx[2].concat([1]));
      ctx[1].forEach(function (t, k) {
        var span = el("span", (typeof t === "number" ? data.vocab[t] : t).replace(/\n/g, "↵"));
        span.title = (ctx[2][k] * c.scale).toPrecision(3);
        span.style.background = "rgba(224,144,74," + (ctx[2][k] / top).toFixed(2) + ")";
        line.appendChild(span);
      });
      box.appendChild(line);
    });
  }
  function panels() {
    var sel = $("cl-selection"), r = state.selected;
    sel.replaceChildren();
    $("cl-node-tools").hidden = r === null;
    var live = !!(bridge && bridge.ask), feature = r !== null && N.kind[r] === "feature";
    $("cl-trace").disabled = !live || !feature;
    $("cl-trace-why").textContent = !feature ? "" : live ? "" :
      " needs the model: open the graph in a notebook with it (graph.show(rm))";
    if (r === null) {
      sel.appendChild(el("i", "hover a node for its links; click to select it (shift-click pins it)"));
      $("cl-connections").replaceChildren(); $("cl-card").replaceChildren();
      $("cl-link").replaceChildren(); $("cl-qk").replaceChildren(); state.link = state.head = null;
    } else {
      sel.appendChild(el("div", name(r), "cl-heading"));
      sel.appendChild(el("div", (N.kind[r] === "feature" ? fid(r) + " · " : "") + "node " + N.id[r], "cl-muted"));
      $("cl-label").value = state.labels[N.id[r]] || "";
      card(r); connections(r);
    }
    subgraphPanel();
  }

  // ------------------------------------------------------------------ attention: head loadings, QK tables
  var H = data.heads, asked = {};
  function pct(x) { return x === null || !isFinite(x) ? "–" : (100 * x).toFixed(0) + "%"; }
  function tokenAt(p) { return JSON.stringify(data.tokens[p]); }
  function ask(key, request, box) {  // a notebook computes what the file lacks
    if (!(bridge && bridge.ask)) return false;
    if (!asked[key]) { asked[key] = true; bridge.ask(request); }
    box.appendChild(el("i", "computing on the model…"));
    return true;
  }
  function showLink(e) {  // which heads carry link e: direct + heads + other heads + remainder = weight
    var s = src[e], t = tgt[e], key = N.id[s] + ">" + N.id[t], box = $("cl-link"), rows = H.loadings[key];
    state.link = e;
    box.replaceChildren(); $("cl-qk").replaceChildren();
    box.appendChild(el("div", "Link " + name(s) + " → " + name(t), "cl-title"));
    box.appendChild(el("div", "weight " + w[e].toPrecision(3) + (N.pos[s] === N.pos[t] ? " · within position " + N.pos[s]
      : " · from position " + N.pos[s] + " " + tokenAt(N.pos[s]) + " to " + N.pos[t] + " " + tokenAt(N.pos[t])), "cl-muted"));
    if (H.errors && H.errors[key]) { box.appendChild(el("div", H.errors[key], "cl-error")); return; }
    if (!rows) {
      if (!ask(key, { type: "loadings", source: N.id[s], target: N.id[t] }, box))
        box.appendChild(el("i", "This file holds the head loadings of the " + H.budget.links + " strongest links and of those stored " +
          "with the graph; store this one (graph.head_loadings(rm, edges, store=True)) or open the graph in a notebook with its model."));
      return;
    }
    box.appendChild(el("div", "its parts (direct: no head; remainder: through several heads); click a head for its QK table", "cl-muted"));
    rows.filter(function (x) { return x[3] !== 0 || x[0] === "remainder"; })  // no empty "direct" or "other heads"
      .sort(function (a, b) { return Math.abs(b[3]) - Math.abs(a[3]); }).forEach(function (x) {
      var what = x[0] === "head" ? "head L" + x[1] + ".H" + x[2] : x[0];
      var line = el("div", ((x[3] >= 0 ? "+" : "") + x[3].toFixed(4) + "      ").slice(0, 9) + (pct(x[3] / w[e]) + "     ").slice(0, 6) + what, "cl-row");
      if (x[0] === "head") {
        line.dataset.head = x[1] + "." + x[2];
        line.addEventListener("click", function () { showQK(x[1], x[2], N.pos[t], N.pos[s]); });
      }
      box.appendChild(line);
    });
  }
  function side(text, id) {  // one component of a QK pair: selects its node when it is shown
    var r = index[id], x = el("span", short(text), r !== undefined && shown[r] ? "cl-pick" : undefined);
    x.title = text;
    if (r !== undefined && shown[r]) x.addEventListener("click", function () { select(r); });
    return x;
  }
  function showQK(layer, head, q, k) {  // why head (layer, head) attends from q to k
    var key = [layer, head, q, k].join("/"), box = $("cl-qk"), c = H.qk[key];
    state.head = [layer, head, q, k];
    box.replaceChildren();
    box.appendChild(el("div", "Head L" + layer + ".H" + head + ": query " + q + " " + tokenAt(q) + ", key " + k + " " + tokenAt(k), "cl-title"));
    if (!c) {
      if (!ask(key, { type: "qk", layer: layer, head: head, q: q, k: k }, box))
        box.appendChild(el("i", "This file holds the QK tables of the " + H.budget.qk + " strongest head paths; open the graph in a notebook with its model for this one (rm.qk)."));
      return;
    }
    if (c.error) { box.appendChild(el("div", c.error, "cl-error")); return; }
    box.appendChild(el("div", "score " + c.score.toPrecision(3) + " · attention " + pct(c.probability) +
      " · the " + c.pairs.length + " pairs below carry " + pct(c.top_share) + " of the score", "cl-muted"));
    box.appendChild(el("div", "where it attends from position " + q, "cl-title"));
    c.row.forEach(function (x) {
      var line = el("div", (pct(x[3]) + "     ").slice(0, 6) + (x[0] + "    ").slice(0, 5) + JSON.stringify(x[1]), "cl-row");
      if (x[0] === k) line.style.fontWeight = "bold";
      line.addEventListener("click", function () { showQK(layer, head, q, x[0]); });
      box.appendChild(line);
    });
    box.appendChild(el("div", "query component × key component", "cl-title"));
    c.pairs.forEach(function (p) {
      var line = el("div", undefined, "cl-pair");
      line.appendChild(el("span", ((p[4] >= 0 ? "+" : "") + p[4].toFixed(3) + "      ").slice(0, 8) + (pct(c.score ? p[4] / c.score : null) + "     ").slice(0, 6)));
      line.appendChild(side(p[0], p[1])); line.appendChild(el("span", " × ")); line.appendChild(side(p[2], p[3]));
      box.appendChild(line);
    });
  }
  function answer(msg) {  // the model's answer to bridge.ask
    if (msg.type === "trace") { status(msg.error || "", !!msg.error); return; }
    if (msg.type === "loadings") {
      if (msg.error) (H.errors = H.errors || {})[msg.key] = msg.error; else H.loadings[msg.key] = msg.rows;
      if (state.link !== null && N.id[src[state.link]] + ">" + N.id[tgt[state.link]] === msg.key) showLink(state.link);
    } else if (msg.type === "qk") {
      H.qk[msg.key] = msg.error ? { error: msg.error } : msg.table;
      if (state.head && state.head.join("/") === msg.key) showQK.apply(null, state.head);
    }
  }

  // ------------------------------------------------------------------ subgraph
  function units() {
    var grouped = new Set(), out = [];
    Object.keys(state.supernodes).forEach(function (k) {
      state.supernodes[k].forEach(function (id) { grouped.add(id); });
      var rs = state.supernodes[k].map(function (id) { return index[id]; }).filter(function (r) { return r !== undefined && shown[r]; });
      if (rs.length) out.push({ name: k, rows: rs, supernode: true });
    });
    state.pinned.forEach(function (id) {
      var r = index[id];
      if (!grouped.has(id) && shown[r]) out.push({ name: name(r), rows: [r], supernode: false });
    });
    return out;
  }
  function subgraph() {
    var us = units(), unitOf = {}, edges = {}, L = lay();
    us.forEach(function (u, k) { u.rows.forEach(function (r) { unitOf[r] = k; }); });
    us.forEach(function (u, t) {
      var tot = 0;
      u.rows.forEach(function (r) {
        tot += total[r];
        for (var e = off[r]; e < off[r + 1]; e++) {
          var s = unitOf[src[e]];
          if (kept[e] && s !== undefined && s !== t) edges[s + ">" + t] = (edges[s + ">" + t] || 0) + w[e];
        }
      });
      u.total = tot;
      u.x = u.rows.reduce(function (a, r) { return a + L.x[r]; }, 0) / u.rows.length;
      u.y = u.rows.reduce(function (a, r) { return a + N.y[r]; }, 0) / u.rows.length;
    });
    var list = Object.keys(edges).map(function (k) {
      var p = k.split(">").map(Number);
      return { source: p[0], target: p[1], weight: edges[k], share: edges[k] / Math.max(us[p[1]].total, 1e-30) };
    });
    return { units: us, edges: list };
  }
  function subgraphPanel() {
    var pins = $("cl-pinned"), groups = $("cl-supernodes");
    pins.replaceChildren(); groups.replaceChildren();
    state.pinned.forEach(function (id) {
      var r = index[id];
      pins.appendChild(row(name(r) + "  (" + id + ")" + (shown[r] ? "" : "  hidden at these thresholds"), shown[r] ? r : null));
    });
    Object.keys(state.supernodes).forEach(function (k) {
      var box = el("div", undefined, "cl-supernode");
      box.appendChild(el("span", k, "cl-heading"));
      var input = el("input"); input.placeholder = "new name"; input.size = 12;
      var rename = el("button", "rename"), ungroup = el("button", "ungroup");
      rename.addEventListener("click", function () { act(function () { renameGroup(k, input.value); }); });
      ungroup.addEventListener("click", function () { act(function () { delete state.supernodes[k]; }); });
      [input, rename, ungroup].forEach(function (x) { box.appendChild(x); });
      state.supernodes[k].forEach(function (id) {
        var r = index[id];
        box.appendChild(row("  " + (r === undefined ? id : name(r) + "  (" + id + ")"), r !== undefined && shown[r] ? r : null));
      });
      groups.appendChild(box);
    });
    var sg = subgraph(), us = sg.units;
    $("cl-subscores").textContent = us.length ? us.length + " units, " + sg.edges.length + " aggregated edges (sum of member edges)" : "pin nodes to build a subgraph";
    var ys = {}, xs = [];
    us.forEach(function (u, k) { (ys[u.y] = ys[u.y] || []).push(k); });
    Object.keys(ys).forEach(function (y) {
      var ks = ys[y].sort(function (a, b) { return us[a].x - us[b].x; });
      ks.forEach(function (k, m) { xs[k] = (m + 1) / (ks.length + 1); });
    });
    var lines = data.bins.colours.map(function (c, b) {
      return { type: "scatter", mode: "lines", x: [], y: [], hoverinfo: "skip", line: { color: c, width: data.bins.widths[b] } };
    });
    sg.edges.forEach(function (e) {
      var t = lines[binOf(e.share)];
      t.x.push(xs[e.source], xs[e.target], null); t.y.push(us[e.source].y, us[e.target].y, null);
    });
    lines.push({ type: "scatter", mode: "markers+text", x: xs, y: us.map(function (u) { return u.y; }),
      text: us.map(function (u) { return esc(short(u.name)); }), textposition: "top center", hoverinfo: "text",
      hovertext: us.map(function (u) { return esc(u.name) + ": " + u.rows.length + " node(s)"; }),
      marker: { size: us.map(function (u) { return u.supernode ? 18 : 11; }), symbol: us.map(function (u) { return u.supernode ? "hexagon" : "circle"; }),
                color: us.map(function (u) { return u.supernode ? "#8e6bbf" : "#e0904a"; }) } });
    Plotly.react($("cl-subplot"), lines, { margin: { l: 10, r: 10, t: 20, b: 10 }, showlegend: false, plot_bgcolor: "white",
      xaxis: { visible: false, range: [0, 1] }, yaxis: { visible: false } }, { displayModeBar: false });
  }
  function groupPinned(label) {
    var taken = new Set();
    Object.keys(state.supernodes).forEach(function (k) { state.supernodes[k].forEach(function (id) { taken.add(id); }); });
    var ids = state.pinned.filter(function (id) { return !taken.has(id); });
    if (!ids.length) throw new Error("A supernode needs at least one node; pin some and group them.");
    if (!label.trim()) throw new Error("A supernode needs a non-empty name.");
    if (label in state.supernodes) throw new Error("A supernode " + JSON.stringify(label) + " exists already; pick another name or ungroup it first.");
    state.supernodes[label] = ids;
  }
  function renameGroup(old, label) {
    if (!label.trim()) throw new Error("A supernode needs a non-empty name.");
    if (label in state.supernodes) throw new Error("A supernode " + JSON.stringify(label) + " exists already; pick another name or ungroup it first.");
    state.supernodes[label] = state.supernodes[old];
    delete state.supernodes[old];
  }
  function notify() {  // tell Python (in a notebook) what changed here
    if (bridge) bridge.changed({ selected: state.selected === null ? null : N.id[state.selected],
      pinned: state.pinned.slice(), labels: Object.assign({}, state.labels),
      supernodes: JSON.parse(JSON.stringify(state.supernodes)), grid: [state.i, state.j] });
  }
  function act(fn) {
    try { fn(); status(""); } catch (err) { status(err.message, true); return; }
    redraw(); panels(); notify();
  }

  // ------------------------------------------------------------------ search
  function search(q) {
    var box = $("cl-search-results"), hidden = 0, hits = [];
    box.replaceChildren();
    q = q.trim().toLowerCase();
    if (!q) return hits;
    for (var r = 0; r < n; r++) {
      var c = data.cards[N.layer[r] + "/" + N.feature[r]];
      var hay = [name(r), N.id[r], N.kind[r] === "feature" ? fid(r) : "", N.hover[r].split("<br>")[1] || "",
                 N.kind[r] === "feature" && c ? c.label : ""].join(" \u0000 ").toLowerCase();
      if (hay.indexOf(q) < 0) continue;
      if (shown[r]) hits.push(r); else hidden++;
    }
    hits.sort(function (a, b) { return N.influence[b] - N.influence[a]; });
    hits.slice(0, 20).forEach(function (r) { box.appendChild(row(name(r) + "  (" + (N.kind[r] === "feature" ? fid(r) : N.id[r]) + ")", r)); });
    box.appendChild(el("div", hits.length + " shown" + (hidden ? ", " + hidden + " more hidden at these thresholds" : ""), "cl-muted"));
    return hits;
  }

  // ------------------------------------------------------------------ actions
  function select(r) { state.selected = r; redraw(); panels(); notify(); }
  function togglePin(r) {
    var id = N.id[r], k = state.pinned.indexOf(id);
    if (k >= 0) state.pinned.splice(k, 1); else state.pinned.push(id);
    redraw(); panels(); notify();
  }
  function setGrid(i, j) {
    state.i = i; state.j = j;
    $("cl-node").value = i; $("cl-edge").value = j;
    prune(); redraw(); panels(); search($("cl-search").value); notify();
  }
  function update(s) {  // annotations, selection or thresholds set from Python
    if (s.grid) { state.i = s.grid[0]; state.j = s.grid[1]; $("cl-node").value = state.i; $("cl-edge").value = state.j; prune(); }
    if (s.labels) state.labels = Object.assign({}, s.labels);
    if (s.pinned) state.pinned = s.pinned.filter(function (id) { return id in index; });
    if (s.supernodes) state.supernodes = JSON.parse(JSON.stringify(s.supernodes));
    if ("selected" in s) state.selected = s.selected === null || !(s.selected in index) || !shown[index[s.selected]] ? null : index[s.selected];
    redraw(); panels(); search($("cl-search").value);
  }
  function setCard(key, c) { data.cards[key] = c; if (state.selected !== null) card(state.selected); }
  function sidecar() {
    return JSON.stringify({ format: data.format, labels: state.labels, supernodes: state.supernodes, pinned: state.pinned }, null, 1);
  }

  $("cl-node").max = G.node.length - 1; $("cl-edge").max = G.edge.length - 1;
  prune();
  Plotly.newPlot(plot, traces(), figureLayout(), { responsive: true, displaylogo: false, scrollZoom: true }).then(function () {
    plot.on("plotly_hover", function (ev) {
      var p = ev.points[0];
      if (p && p.data.name !== "labels" && p.customdata !== undefined) { state.hovered = p.customdata; drawLinks(); }
    });
    plot.on("plotly_unhover", function () { state.hovered = null; drawLinks(); });
    plot.on("plotly_click", function (ev) {
      var p = ev.points[0];
      if (!p || p.customdata === undefined) return;
      if (ev.event && (ev.event.shiftKey || ev.event.ctrlKey || ev.event.metaKey)) togglePin(p.customdata);
      else select(state.selected === p.customdata ? null : p.customdata);
    });
    plot.on("plotly_relayout", function () { Plotly.restyle(plot, { "marker.size": traces().slice(0, data.kinds.length).map(function (t) { return t.marker.size; }) }, data.kinds.map(function (k, m) { return m; })).then(drawLinks); });
    $("cl-node").addEventListener("input", function (ev) { setGrid(+ev.target.value, state.j); });
    $("cl-edge").addEventListener("input", function (ev) { setGrid(state.i, +ev.target.value); });
    $("cl-linktype").addEventListener("change", function (ev) { state.linkType = ev.target.value; drawLinks(); });
    $("cl-pin").addEventListener("click", function () { if (state.selected !== null) togglePin(state.selected); });
    $("cl-trace").addEventListener("click", function () {
      if (state.selected === null || !bridge || !bridge.ask) return;
      status("tracing from " + name(state.selected) + "…");
      bridge.ask({ type: "trace", node: N.id[state.selected] });
    });
    $("cl-set-label").addEventListener("click", function () {
      var text = $("cl-label").value.trim(), id = N.id[state.selected];
      act(function () { if (text) state.labels[id] = text; else delete state.labels[id]; });
    });
    $("cl-group").addEventListener("click", function () { act(function () { groupPinned($("cl-group-name").value); }); });
    $("cl-search").addEventListener("input", function (ev) { search(ev.target.value); });
    $("cl-search").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") { var hits = search(ev.target.value); if (hits.length) select(hits[0]); }
    });
    $("cl-download").addEventListener("click", function () {
      var a = el("a"); a.download = "labels.json";
      a.href = URL.createObjectURL(new Blob([sidecar()], { type: "application/json" }));
      a.click();
    });
    $("cl-node").value = state.i; $("cl-edge").value = state.j;
    drawLinks(); panels();
    plot.setAttribute("data-ready", "1");
  });
  var api = { state: state, data: data, select: select, togglePin: togglePin, setGrid: setGrid,
              search: search, sidecar: sidecar, drawn: function () { return drawnCount; },
              index: function (id) { return index[id]; }, update: update, setCard: setCard,
              showLink: showLink, showQK: showQK, answer: answer };
  root.circuitlab = api;
  window.circuitlab = api;
  return api;
}
