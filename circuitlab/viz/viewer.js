// circuitlab offline graph viewer: hover, click-to-select with connections, pins,
// supernodes and labels as saved. Reads its data from <script id="cl-data">; every user
// text goes into the page through textContent, never innerHTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("cl-data").textContent);
  var plot = document.getElementById("cl-plot");
  var nodes = data.nodes, L = data.links, nBins = data.n_bins;
  var inEdges = nodes.map(function () { return []; });
  var outEdges = nodes.map(function () { return []; });
  for (var e = 0; e < L.s.length; e++) { inEdges[L.t[e]].push(e); outEdges[L.s[e]].push(e); }
  var index = {};
  nodes.forEach(function (n, i) { index[n.id] = i; });
  var state = { selected: null, pinned: new Set(), linkType: "both" };
  data.pinned.forEach(function (id) { if (id in index) state.pinned.add(index[id]); });
  var baseColours = data.figure.data.slice(nBins).map(function (t) { return t.marker.color.slice(); });
  var drawn = 0;

  function el(tag, text, cls) {
    var x = document.createElement(tag);
    if (text !== undefined) x.textContent = text;
    if (cls) x.className = cls;
    return x;
  }

  function focusEdges() {
    var focus = new Set(state.pinned), edges = new Set();
    if (state.selected !== null) focus.add(state.selected);
    focus.forEach(function (i) {
      if (state.linkType !== "output") inEdges[i].forEach(function (e) { edges.add(e); });
      if (state.linkType !== "input") outEdges[i].forEach(function (e) { edges.add(e); });
    });
    return { focus: focus, edges: edges };
  }

  function draw() {
    var f = focusEdges(), xs = [], ys = [], b;
    for (b = 0; b < nBins; b++) { xs.push([]); ys.push([]); }
    f.edges.forEach(function (e) {
      b = L.b[e];
      xs[b].push(data.x[L.s[e]], data.x[L.t[e]], null);
      ys[b].push(data.y[L.s[e]], data.y[L.t[e]], null);
    });
    drawn = f.edges.size;
    var bins = []; for (b = 0; b < nBins; b++) bins.push(b);
    Plotly.restyle(plot, { x: xs, y: ys }, bins);
    var neighbour = {};
    if (state.selected !== null) {
      inEdges[state.selected].forEach(function (e) { neighbour[L.s[e]] = data.bin_colours[L.b[e]]; });
      outEdges[state.selected].forEach(function (e) { neighbour[L.t[e]] = data.bin_colours[L.b[e]]; });
    }
    var colours = [], widths = [], lines = [], traces = [];
    data.figure.data.slice(nBins).forEach(function (t, k) {
      traces.push(nBins + k);
      colours.push(t.customdata.map(function (r, j) { return neighbour[r] || baseColours[k][j]; }));
      widths.push(t.customdata.map(function (r) { return f.focus.has(r) ? 3 : 0.5; }));
      lines.push(t.customdata.map(function (r) {
        return r === state.selected ? "#111111" : (state.pinned.has(r) ? "#d4a017" : "#555555");
      }));
    });
    Plotly.restyle(plot, { "marker.color": colours, "marker.line.width": widths,
                           "marker.line.color": lines }, traces);
    panels();
  }

  function rows(title, edgeList, other, sign) {
    var box = el("div", undefined, "cl-section");
    box.appendChild(el("div", title, "cl-title"));
    var list = edgeList.filter(function (e) { return sign > 0 ? L.w[e] > 0 : L.w[e] < 0; })
      .sort(function (a, b) { return Math.abs(L.w[b]) - Math.abs(L.w[a]); }).slice(0, 25);
    list.forEach(function (e) {
      var j = other(e), n = nodes[j];
      var row = el("div", (L.w[e] > 0 ? "+" : "") + L.w[e].toFixed(3) + "  " + (n.place + "    ").slice(0, 5) + n.name +
        (n.pos !== nodes[state.selected].pos ? "  ↔pos" : ""), "cl-row");
      row.setAttribute("data-node", n.id);
      row.addEventListener("click", function () { select(j); });
      box.appendChild(row);
    });
    return box;
  }

  function panels() {
    var conn = document.getElementById("cl-connections");
    conn.replaceChildren();
    if (state.selected === null) {
      conn.appendChild(el("i", "click a node (shift-click pins it)"));
    } else {
      var s = state.selected, n = nodes[s];
      conn.appendChild(el("div", n.name + "  (" + n.id + ")", "cl-heading"));
      var src = function (e) { return L.s[e]; }, tgt = function (e) { return L.t[e]; };
      conn.appendChild(rows("inputs, positive", inEdges[s], src, 1));
      conn.appendChild(rows("inputs, negative", inEdges[s], src, -1));
      conn.appendChild(rows("outputs, positive", outEdges[s], tgt, 1));
      conn.appendChild(rows("outputs, negative", outEdges[s], tgt, -1));
    }
    var pins = document.getElementById("cl-pinned");
    pins.replaceChildren();
    state.pinned.forEach(function (i) {
      var row = el("div", nodes[i].name + "  (" + nodes[i].id + ")", "cl-row");
      row.addEventListener("click", function () { select(i); });
      pins.appendChild(row);
    });
    var groups = document.getElementById("cl-supernodes");
    groups.replaceChildren();
    Object.keys(data.supernodes).forEach(function (name) {
      groups.appendChild(el("div", name, "cl-title"));
      data.supernodes[name].forEach(function (id) {
        var row = el("div", id in index ? nodes[index[id]].name + "  (" + id + ")" : id + " (pruned away)", "cl-row");
        if (id in index) row.addEventListener("click", function () { select(index[id]); });
        groups.appendChild(row);
      });
    });
    document.getElementById("cl-drawn").textContent = drawn + " links drawn";
  }

  function select(i) { state.selected = i; draw(); }
  function togglePin(i) { if (state.pinned.has(i)) state.pinned.delete(i); else state.pinned.add(i); draw(); }

  Plotly.newPlot(plot, data.figure.data, data.figure.layout,
                 { responsive: true, displaylogo: false, scrollZoom: true }).then(function () {
    plot.on("plotly_click", function (ev) {
      var p = ev.points[0];
      if (!p || p.curveNumber < nBins) return;
      var i = p.customdata;
      if (ev.event && (ev.event.shiftKey || ev.event.ctrlKey || ev.event.metaKey)) togglePin(i);
      else select(state.selected === i ? null : i);
    });
    document.getElementById("cl-pin").addEventListener("click", function () {
      if (state.selected !== null) togglePin(state.selected);
    });
    document.getElementById("cl-linktype").addEventListener("change", function (ev) {
      state.linkType = ev.target.value; draw();
    });
    draw();
    plot.setAttribute("data-ready", "1");
  });
  window.circuitlab = { state: state, select: select, togglePin: togglePin,
                        drawn: function () { return drawn; }, data: data };
})();
