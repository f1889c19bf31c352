"""A layered view of an attribution graph, as self-contained HTML (offline: inline script and
style only, no external script, link or font).

x = token position, y = layer (embeddings at the bottom, then each layer's heads and its MLP
row, logits on top); a node's radius grows with ``sqrt(|value|)``, an edge's width with
``|weight|``, its colour is its sign (blue positive, red negative). A slider hides edges
below a fraction of the largest ``|weight|``; hovering or clicking a node shows its label,
value, activation and strongest incoming and outgoing edges. The SVG is built by the inline
script as one markup string (fast for thousands of nodes); the time it took is written into
the page (``<span class="render-ms">``).
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import Any, Union

_COUNTER = itertools.count()

_STYLE = """
.bl-graph { font: 13px sans-serif; color: #222; }
.bl-graph .controls { margin: 4px 0; }
.bl-graph .details { white-space: pre; font-family: monospace; font-size: 12px; min-height: 6em;
  border: 1px solid #ddd; padding: 4px; margin-top: 4px; }
.bl-graph svg { border: 1px solid #eee; background: #fff; }
.bl-graph .node { stroke: #333; stroke-width: 0.5; cursor: pointer; }
.bl-graph .node.sel { stroke: #000; stroke-width: 2; }
.bl-graph .edge { fill: none; opacity: 0.55; }
.bl-graph .edge.dim { opacity: 0.08; }
.bl-graph text { font-size: 10px; fill: #555; }
"""

# The script reads the JSON block next to it; everything is scoped to the view's root div.
_SCRIPT = r"""
(function () {
  const root = document.getElementById(ROOT_ID);
  const D = JSON.parse(root.querySelector("script.graph-data").textContent);
  const t0 = performance.now();
  const N = D.nodes, E = D.edges, nL = D.n_layers;
  const KIND_ROW = {embedding: 0, bias: 0, logit: 2 * nL + 1};
  const COLOR = {embedding: "#9ca3af", bias: "#111827", head: "#f59e0b", mlp: "#10b981", neuron: "#10b981",
                 eigen: "#8b5cf6", sae_feature: "#ec4899", mlp_rest: "#e5e7eb", mlp_residual: "#e5e7eb", logit: "#3b82f6"};
  function esc(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
  function row(n) { return n.kind in KIND_ROW ? KIND_ROW[n.kind] : (n.kind === "head" ? 1 + 2 * n.layer : 2 + 2 * n.layer); }
  const nCols = D.n_pos + 1, nRows = 2 * nL + 2;
  const colW = Math.max(24, Math.min(90, 1100 / nCols)), rowH = 70, padL = 60, padT = 20;
  const W = padL + nCols * colW + 20, H = padT + nRows * rowH + 40;
  const cells = {};
  N.forEach((n, i) => { const key = row(n) + ":" + (n.pos + 1); (cells[key] = cells[key] || []).push(i); });
  const X = new Float64Array(N.length), Y = new Float64Array(N.length);
  for (const key in cells) {
    const [r, c] = key.split(":").map(Number), members = cells[key];
    const step = Math.min(10, (colW - 8) / Math.max(1, members.length));
    members.forEach((i, k) => {
      X[i] = padL + (c + 0.5) * colW + (k - (members.length - 1) / 2) * step;
      Y[i] = padT + (nRows - 1 - r + 0.5) * rowH;
    });
  }
  let vmax = 0, wmax = 0;
  N.forEach(n => { vmax = Math.max(vmax, Math.abs(n.value)); });
  E.forEach(e => { wmax = Math.max(wmax, Math.abs(e[2])); });
  const parts = ['<svg width="' + W + '" height="' + H + '" viewBox="0 0 ' + W + " " + H + '">'];
  for (let r = 0; r < nRows; r++) {
    const label = r === 0 ? "emb" : r === nRows - 1 ? "logits" : ("L" + Math.floor((r - 1) / 2) + (r % 2 ? " attn" : " mlp"));
    parts.push('<text x="4" y="' + (padT + (nRows - 1 - r + 0.5) * rowH + 3) + '">' + label + "</text>");
  }
  for (let c = 0; c < nCols; c++) {
    parts.push('<text x="' + (padL + (c + 0.2) * colW) + '" y="' + (H - 8) + '">' + (c === 0 ? "bias" : esc((c - 1) + " " + (D.tokens[c - 1] || "").slice(0, 8))) + "</text>");
  }
  parts.push("<g>");
  E.forEach((e, j) => {
    const s = e[0], t = e[1], w = e[2];
    const width = (0.3 + 4 * Math.abs(w) / (wmax || 1)).toFixed(2);
    const my = (Y[s] + Y[t]) / 2;
    parts.push('<path class="edge" data-j="' + j + '" stroke="' + (w >= 0 ? "#2563eb" : "#dc2626") + '" stroke-width="' + width +
      '" d="M' + X[s].toFixed(1) + " " + Y[s].toFixed(1) + " C" + X[s].toFixed(1) + " " + my.toFixed(1) + " " +
      X[t].toFixed(1) + " " + my.toFixed(1) + " " + X[t].toFixed(1) + " " + Y[t].toFixed(1) + '"></path>');
  });
  parts.push("</g><g>");
  N.forEach((n, i) => {
    const rad = (2 + 7 * Math.sqrt(Math.abs(n.value) / (vmax || 1))).toFixed(2);
    parts.push('<circle class="node" data-i="' + i + '" cx="' + X[i].toFixed(1) + '" cy="' + Y[i].toFixed(1) + '" r="' + rad +
      '" fill="' + (COLOR[n.kind] || "#999") + '"></circle>');
  });
  parts.push("</g></svg>");
  const holder = root.querySelector(".canvas");
  holder.innerHTML = parts.join("");
  const edgeEls = holder.querySelectorAll(".edge");
  const incoming = N.map(() => []), outgoing = N.map(() => []);
  E.forEach((e, j) => { incoming[e[1]].push(j); outgoing[e[0]].push(j); });
  const slider = root.querySelector("input.threshold"), shown = root.querySelector(".shown");
  function applyThreshold() {
    const cut = (slider.value / 100) * wmax;
    let visible = 0;
    E.forEach((e, j) => { const on = Math.abs(e[2]) >= cut; edgeEls[j].style.display = on ? "" : "none"; visible += on; });
    shown.textContent = visible + " of " + E.length + " edges (|weight| >= " + cut.toPrecision(3) + ")";
  }
  slider.addEventListener("input", applyThreshold);
  applyThreshold();
  const details = root.querySelector(".details");
  let pinned = -1;
  function fmt(x) { return x === null || x === undefined ? "-" : Number(x).toPrecision(4); }
  function show(i) {
    const n = N[i];
    const top = (list, end) => list.slice().sort((a, b) => Math.abs(E[b][2]) - Math.abs(E[a][2])).slice(0, 5)
      .map(j => "  " + (E[j][2] >= 0 ? "+" : "") + fmt(E[j][2]) + "  " + N[E[j][end]].id).join("\n");
    details.textContent = n.label + "   [" + n.id + "]\nvalue " + fmt(n.value) + "   activation " + fmt(n.act) +
      "\nstrongest inputs:\n" + (top(incoming[i], 0) || "  (none)") + "\nstrongest outputs:\n" + (top(outgoing[i], 1) || "  (none)");
    const mine = new Set(incoming[i].concat(outgoing[i]));
    edgeEls.forEach((el, j) => el.classList.toggle("dim", !mine.has(j)));
  }
  holder.addEventListener("mouseover", ev => { const i = ev.target.dataset && ev.target.dataset.i; if (i !== undefined && pinned < 0) show(+i); });
  holder.addEventListener("click", ev => {
    const i = ev.target.dataset && ev.target.dataset.i;
    holder.querySelectorAll(".node.sel").forEach(el => el.classList.remove("sel"));
    if (i === undefined) { pinned = -1; edgeEls.forEach(el => el.classList.remove("dim")); return; }
    pinned = +i; ev.target.classList.add("sel"); show(pinned);
  });
  root.querySelector(".render-ms").textContent = (performance.now() - t0).toFixed(1);
  root.setAttribute("data-rendered-nodes", holder.querySelectorAll(".node").length);
})();
"""


def graph_payload(graph: Any) -> dict[str, Any]:
    """The JSON the page's script draws: nodes, nonzero edges ``[source, target, weight]``."""
    nodes = [{"id": n.node_id, "kind": n.kind, "layer": n.layer, "pos": n.position, "value": float(n.value),
              "act": None if n.activation is None else float(n.activation), "label": n.label} for n in graph.nodes]  # fmt: skip
    A = graph.adjacency
    edges = [[s, t, float(A[t, s])] for t, s in (A != 0).nonzero().tolist()]
    n_pos = 1 + max((n.position for n in graph.nodes), default=0)
    return {"nodes": nodes, "edges": edges, "n_layers": graph.n_layers, "n_pos": n_pos,
            "tokens": list(graph.token_strings), "target_value": graph.target_value}  # fmt: skip


def graph_html(graph: Any, standalone: bool = True, title: str = "Attribution graph") -> str:
    """The view as HTML: a whole page (``standalone``) or a fragment for Jupyter."""
    view_id = f"bl-graph-{next(_COUNTER)}"
    data = json.dumps(graph_payload(graph)).replace("</", "<\\/")
    targets = ", ".join(f"{t.label} (w {t.weight:.3g})" for t in graph.targets)
    caption = (f"{len(graph.nodes)} nodes, {graph.n_edges} edges; target {html.escape(targets)} = {graph.target_value:.4g}; "
               f"split {graph.split}; {'exact' if graph.exact else 'APPROXIMATE (non-bilinear MLPs)'}")  # fmt: skip
    body = f"""<div class="bl-graph" id="{view_id}">
<div class="caption">{caption}</div>
<div class="controls">edge threshold <input class="threshold" type="range" min="0" max="100" value="0">
<span class="shown"></span> &middot; rendered in <span class="render-ms"></span> ms</div>
<div class="canvas"></div>
<div class="details">hover or click a node</div>
<script type="application/json" class="graph-data">{data}</script>
<script>{_SCRIPT.replace("ROOT_ID", json.dumps(view_id))}</script>
</div>"""
    style = f"<style>{_STYLE}</style>"
    if not standalone:
        return style + body
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>{style}</head>
<body><h3>{html.escape(title)}: {html.escape("".join(graph.token_strings))}</h3>
{body}</body></html>
"""


class GraphView:
    """A graph's view for Jupyter (``_repr_html_``) and for files (:meth:`save`)."""

    def __init__(self, graph: Any, title: str = "Attribution graph"):
        self.graph, self.title = graph, title

    def _repr_html_(self) -> str:
        return graph_html(self.graph, standalone=False, title=self.title)

    def save(self, path: Union[str, Path]) -> Path:
        """The standalone page written atomically."""
        from bilinear_lens.files.atomic import atomic_write_text

        return atomic_write_text(path, graph_html(self.graph, standalone=True, title=self.title))
