"""Attribution graphs without transcoders: exact direct effects in the linearized model.

The model is linearized at the prompt (:mod:`bilinear_lens.circuits.linearized`: attention
patterns and norm scales frozen, each bilinear MLP split symmetrically), so it is affine in
its residual writers. The graph's **nodes** are those writers, per position:

- ``embedding``: the token (plus learned position) embedding at a position;
- ``head``: one attention head's write ``hook_z[p, h] @ W_O[h]`` (no ``b_O``);
- ``mlp``: an MLP's write (no ``b_out``), or with ``split="neurons"`` its top-``k`` neurons
  ``post_h W_out[h]`` plus a ``mlp_rest`` node (the other neurons), or with ``split="eigen"``
  its top-``k`` eigen-components of ``Q(g)`` (below) plus ``mlp_rest`` and an
  ``mlp_residual`` node (the part of the write that does not reach the target), or with
  ``split="sae"`` its top-``k`` active features of an SAE on ``hook_mlp_out`` (active set
  frozen) plus ``mlp_rest`` and an explicit ``mlp_residual`` error node;
- ``bias``: every constant (attention/MLP biases, LayerNorm biases, the constant part of a
  split MLP with biases), one node;
- ``logit``: the targets, each reading ``u_k . resid[P_k] / scale0[P_k]`` (``u_k`` a residual
  direction through the final norm, :func:`~bilinear_lens.weights.directions.resolve_direction`;
  ``scale0`` the frozen final norm scale), so for a token it is the logit (minus the final
  LayerNorm bias's constant).

Scalar values. Write ``T = sum_k w_k target_k`` (``w_k``: the targets' weights, their
probabilities for top logits). A writer node ``s`` with write vector ``W_s`` has value
``g_s . W_s``, with ``g_s = dT / dW_s`` in the linearized model: its exact share of ``T``
(embedding values plus the bias node's value sum to ``T``). A logit node's value is its target.

Edges: ``A[t, s]`` is the direct effect of ``s`` on ``t``'s value: ``s``'s write passed
through the frozen linear path (residual stream, frozen norms, frozen patterns, a head's
``V``/``O``, an MLP's split) to ``t``, *not* through other nodes. Because ``t``'s value is
linear in its inputs, ``value_t = sum_s A[t, s]`` exactly (the bias node taking the
constant). Computed by batched backward injection: a chunk of target nodes is one forward of
that many copies of the prompt (batch axis), with every node's write replaced by a leaf
tensor (so gradients stop at nodes), one backward injecting each target's read-out
coefficients into its own copy, and ``A[t, s] = grad_{leaf_s} . W_s``.

Eigen split (bilinear MLPs without biases): ``g . MLP(x) = x^T Q(g) x = sum_i l_i (v_i . x)^2``
for the node's own total gradient ``g``; component ``i`` writes ``l_i (v_i . x)^2 g / |g|^2``
and the ``mlp_residual`` node the rest of the write, whose value is zero by construction.

Exact for the observed forward with patterns and scales frozen (not for counterfactuals
through the softmax or the norms); the symmetric split is a convention. Non-bilinear MLPs
are refused for ``exact=True``; with ``exact=False`` the graph is built from plain
gradients and :attr:`AttributionGraph.exact` is False (values no longer sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.progress import progress_bar
from bilinear_lens.circuits.linearized import (
    FrozenValues,
    check_exact_mlps,
    linearization_hooks,
    record_frozen_values,
)
from bilinear_lens.circuits.prompts import TokensLike, one_prompt_tokens
from bilinear_lens.models.mlp_kinds import mlp_kind_spec, model_mlp_kind

SPLITS = ("none", "neurons", "eigen", "sae")
SOURCE_KINDS = ("embedding", "bias", "mlp_residual")  # nodes without incoming edges
NODE_KINDS = ("embedding", "bias", "head", "mlp", "neuron", "eigen", "sae_feature", "mlp_rest", "mlp_residual", "logit")


@dataclass
class GraphTarget:
    """A target read at ``position``: ``vector . resid[position] / frozen final scale``.

    ``vector``: a residual-space direction through the final norm (centred for LayerNorm),
    ``weight``: its weight in ``T`` (a probability for top logits), ``token_id``,
    ``token`` (decoded) and ``probability`` (at ``position``, on the clean run) for a logit target."""

    label: str
    vector: Float[Tensor, "d_model"]
    position: int
    weight: float = 1.0
    token_id: Optional[int] = None
    probability: Optional[float] = None
    token: Optional[str] = None


@dataclass(frozen=True)
class GraphNode:
    """One node. ``layer``: -1 for embeddings and bias, ``n_layers`` for logits; ``position``:
    -1 for the bias; ``index``: head, neuron or eigen-component index, token id for
    embeddings and logits, -1 otherwise. ``value``: its share of ``T`` (logits: the target).
    ``token``: the decoded token of a logit node (``None`` for a direction target)."""

    kind: str
    layer: int
    position: int
    index: int
    value: float
    label: str
    activation: Optional[float] = None
    token: Optional[str] = None

    @property
    def node_id(self) -> str:
        if self.kind == "embedding":
            return f"emb{self.index}@{self.position}"
        if self.kind == "bias":
            return "bias"
        if self.kind == "logit":
            return f"logit{self.index}@{self.position}"
        if self.kind == "head":
            return f"L{self.layer}.H{self.index}@{self.position}"
        if self.kind in ("neuron", "eigen", "sae_feature"):
            short = {"neuron": "n", "eigen": "eig", "sae_feature": "f"}[self.kind]
            return f"L{self.layer}.{short}{self.index}@{self.position}"
        return f"L{self.layer}.{self.kind}@{self.position}"

    @property
    def is_source(self) -> bool:
        return self.kind in SOURCE_KINDS


@dataclass
class AttributionGraph:
    """Nodes in topological order (embeddings, bias, then per layer heads and MLP nodes, then
    logits) and ``adjacency[t, s]``: the edge from ``s`` into ``t`` (float64, on the CPU)."""

    nodes: list[GraphNode]
    adjacency: Float[Tensor, "n_nodes n_nodes"]
    targets: list[GraphTarget]
    target_value: float
    tokens: list[int]
    token_strings: list[str]
    n_layers: int
    split: str
    exact: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> Float[Tensor, "n_nodes"]:
        return torch.tensor([n.value for n in self.nodes], dtype=torch.float64)

    @property
    def target_weights(self) -> Float[Tensor, "n_nodes"]:
        """``w_k`` on the logit nodes, 0 elsewhere (where pruning's influence starts)."""
        weights = torch.zeros(len(self.nodes), dtype=torch.float64)
        logits = [i for i, n in enumerate(self.nodes) if n.kind == "logit"]
        weights[logits] = torch.tensor([t.weight for t in self.targets], dtype=torch.float64)
        return weights

    def index(self, node_id: str) -> int:
        """The position of a node given by either id: ours (:attr:`GraphNode.node_id`,
        ``"L0.H1@3"``) or the circuit-tracer id the JSON export writes
        (:func:`~bilinear_lens.circuits.graph_export.export_node_id`, ``"0_1_3"``)."""
        for i, node in enumerate(self.nodes):
            if node.node_id == node_id:
                return i
        from bilinear_lens.circuits.graph_export import export_node_id, graph_n_heads

        n_heads = graph_n_heads(self)
        for i, node in enumerate(self.nodes):
            if export_node_id(node, self.n_layers, n_heads) == node_id:
                return i
        examples = [n for n in self.nodes if n.kind == "head"][:1] or self.nodes[:1]
        shown = "; ".join(f"{n.node_id!r} = {export_node_id(n, self.n_layers, n_heads)!r}" for n in examples)
        raise KeyError(f"no node {node_id!r} in the graph (ids are GraphNode.node_id or the exported "
                       f"circuit-tracer id, e.g. {shown})")

    def completeness_error(self) -> float:
        """``max |value_t - sum_s A[t, s]|`` over nodes with inputs, and ``|T - sum of the
        source nodes' values|``: 0 up to rounding for an exact graph."""
        values = self.values
        has_inputs = torch.tensor([not n.is_source for n in self.nodes])
        node_err = (values - self.adjacency.sum(1))[has_inputs].abs().max() if has_inputs.any() else torch.tensor(0.0)
        src = [i for i, n in enumerate(self.nodes) if n.kind in ("embedding", "bias")]
        return max(float(node_err), abs(self.target_value - float(values[src].sum())))

    @property
    def n_edges(self) -> int:
        return int((self.adjacency != 0).sum())

    def _repr_html_(self) -> str:
        from bilinear_lens.views.graph_view import graph_html

        return graph_html(self, standalone=False)


# ---- targets ----


def _final_scale(frozen: FrozenValues, position: int) -> Tensor:
    scale = frozen.scales.get("ln_final.hook_scale")
    return torch.ones((), dtype=torch.float64) if scale is None else scale[0, position, 0]


def _check_position(position: int, n_pos: int) -> int:
    if isinstance(position, bool) or not isinstance(position, int) or not -n_pos <= position < n_pos:
        raise ValueError(f"position={position!r} is out of range for a prompt of {n_pos} tokens")
    return position % n_pos


def _token_label(model: Any, token: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return tok.decode([token]) if tok is not None else str(token)


def _pair_label(model: Any, token: Any) -> str:
    return _token_label(model, token) if isinstance(token, int) and not isinstance(token, bool) else str(token)


def _centred(model: Any, u: Tensor) -> Tensor:
    u = u.detach()
    return u - u.mean() if model.cfg.normalization_type in ("LN", "LNPre") else u


def top_logit_targets(
    model: Any, tokens: Any, cumulative_prob: float = 0.95, max_targets: int = 10, position: int = -1
) -> list[GraphTarget]:
    """The most likely next tokens at ``position`` until their probabilities sum to at least
    ``cumulative_prob`` (at most ``max_targets``), each weighted by its probability."""
    from bilinear_lens.weights.directions import token_direction

    if not 0 < cumulative_prob <= 1:
        raise ValueError(f"cumulative_prob={cumulative_prob!r} must lie in (0, 1]")
    if max_targets < 1:
        raise ValueError(f"max_targets={max_targets!r} must be >= 1")
    tokens = one_prompt_tokens(model, tokens)
    position = _check_position(position, tokens.shape[1])
    with torch.no_grad():
        probs = model(tokens)[0, position].double().softmax(-1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n = min(int((cum < cumulative_prob).sum()) + 1, max_targets, len(order))
    return [
        GraphTarget(f"logit {_token_label(model, int(t))!r}", _centred(model, token_direction(model, int(t))), position,
                    weight=float(probs[t]), token_id=int(t), probability=float(probs[t]), token=_token_label(model, int(t)))
        for t in order[:n]
    ]  # fmt: skip


def direction_target(model: Any, spec: Any, position: int = -1, label: Optional[str] = None) -> GraphTarget:
    """A target from any direction spec :func:`~bilinear_lens.weights.directions.resolve_direction`
    takes (a token id or one-token string, a pair ``(a, b)`` for a logit difference, a
    ``FeatureDirection``, a ``[d_model]`` tensor), weight 1. ``position`` is checked when the
    graph is built."""
    from bilinear_lens.weights.directions import resolve_direction, token_id

    u = _centred(model, resolve_direction(model, spec))
    tid = token_id(model, spec) if isinstance(spec, (int, str)) and not isinstance(spec, bool) else None
    if label is None:
        label = (f"logit {_token_label(model, tid)!r}" if tid is not None else
                 f"logit[{_pair_label(model, spec[0])!r}] - logit[{_pair_label(model, spec[1])!r}]" if isinstance(spec, tuple) else
                 getattr(spec, "label", "direction"))  # fmt: skip
    return GraphTarget(label, u, position, token_id=tid, token=None if tid is None else _token_label(model, tid))


def _as_targets(model: Any, tokens: Tensor, target: Any, cumulative_prob: float, max_targets: int, position: int) -> list[GraphTarget]:
    if target is None:
        return top_logit_targets(model, tokens, cumulative_prob, max_targets, position)
    targets = list(target) if isinstance(target, list) else [target]
    out = [t if isinstance(t, GraphTarget) else direction_target(model, t, position) for t in targets]
    for t in out:
        t.position = _check_position(t.position, tokens.shape[1])
    if any(t.token_id is not None and t.probability is None for t in out):  # shown beside logit nodes
        with torch.no_grad():
            probs = model(tokens)[0].double().softmax(-1)
        for t in out:
            if t.token_id is not None and t.probability is None:
                t.probability = float(probs[t.position, t.token_id])
    return out


# ---- the clean pass: writes, total gradients, node values ----


@dataclass
class _Clean:
    embed: Tensor  # [pos, d] (plus pos_embed)
    pos_embed: Optional[Tensor]
    heads: dict[int, Tensor]  # [pos, H, d]
    mlp_out: dict[int, Tensor]  # [pos, d] without b_out
    post: dict[int, Tensor]  # [pos, d_mlp]
    mlp_in: dict[int, Tensor]  # [pos, d]
    g_embed: Tensor
    g_pos: Optional[Tensor]
    g_attn: dict[int, Tensor]  # [pos, d]
    g_mlp: dict[int, Tensor]
    targets: list[float]
    T: float
    sae: dict[int, tuple[Any, Tensor, Tensor]] = field(default_factory=dict)  # layer -> (SAE, acts [pos, d_sae], error [pos, d])


def _bias(module: Any, name: str) -> Optional[Tensor]:
    b = getattr(module, name, None)
    return None if b is None else b.detach()


def _clean_pass(model: Any, frozen: FrozenValues, targets: list[GraphTarget], n_layers: int) -> _Clean:
    rec: dict[str, Tensor] = {}
    probes: dict[str, Tensor] = {}

    def record(key: str):
        def hook(act: Tensor, hook: Any) -> None:
            rec[key] = act.detach()[0]

        return hook

    def probe(key: str):
        def hook(act: Tensor, hook: Any) -> Tensor:
            rec[key] = act.detach()[0]
            probes[key] = torch.zeros_like(act, requires_grad=True)
            return act + probes[key]

        return hook

    hooks = [("hook_embed", probe("embed"))]
    if "hook_pos_embed" in model.hook_dict:
        hooks.append(("hook_pos_embed", probe("pos_embed")))
    for l in range(n_layers):
        hooks += [(f"blocks.{l}.attn.hook_z", record(f"z{l}")), (f"blocks.{l}.hook_attn_out", probe(f"attn{l}"))]
        if hasattr(model.blocks[l], "mlp"):
            hooks += [(f"blocks.{l}.mlp.hook_in", record(f"x{l}")), (f"blocks.{l}.mlp.hook_post", record(f"post{l}")),
                      (f"blocks.{l}.hook_mlp_out", probe(f"mlp{l}"))]  # fmt: skip
    with torch.enable_grad():
        resid = _final_resid(model, frozen.tokens, linearization_hooks(model, frozen) + hooks)[0]
        values = [_read_target(model, frozen, t, resid) for t in targets]
        T = sum(t.weight * v for t, v in zip(targets, values))
        keys = list(probes)
        grads = dict(zip(keys, torch.autograd.grad(T, [probes[k] for k in keys], allow_unused=True)))
    g = {k: (torch.zeros_like(probes[k]) if v is None else v)[0].detach() for k, v in grads.items()}
    heads, mlp_out, post, mlp_in, g_attn, g_mlp = {}, {}, {}, {}, {}, {}
    for l in range(n_layers):
        block = model.blocks[l]
        heads[l] = torch.einsum("phk,hkd->phd", rec[f"z{l}"], block.attn.W_O.detach())
        g_attn[l] = g[f"attn{l}"]
        if hasattr(block, "mlp"):
            b_out = _bias(block.mlp, "b_out")
            mlp_out[l] = rec[f"mlp{l}"] - (0 if b_out is None else b_out)
            post[l], mlp_in[l], g_mlp[l] = rec[f"post{l}"], rec[f"x{l}"], g[f"mlp{l}"]
    return _Clean(rec["embed"], rec.get("pos_embed"), heads, mlp_out, post, mlp_in, g["embed"], g.get("pos_embed"),
                  g_attn, g_mlp, [float(v.detach()) for v in values], float(T.detach()))  # fmt: skip


def _final_resid(model: Any, tokens: Tensor, hooks: list) -> Tensor:
    """``blocks.{L-1}.hook_resid_post`` of a forward with ``hooks`` (grad kept): the residual
    stream the final norm reads, on our model and on a ``TransformerBridge`` alike."""
    seen: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        seen["resid"] = act

    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=hooks + [(name, keep)]):
        model(tokens)
    return seen["resid"]


def _read_target(model: Any, frozen: FrozenValues, target: GraphTarget, resid: Tensor) -> Tensor:
    """``u . resid[P] / scale0[P]`` for ``resid`` ``[..., pos, d]``."""
    u = target.vector.to(resid.dtype)
    return (resid[..., target.position, :] @ u) / _final_scale(frozen, target.position).to(resid.dtype)


def _zero_input_target(model: Any, frozen: FrozenValues, targets: list[GraphTarget], n_layers: int) -> float:
    """``T`` of the linearized model with every embedding zeroed: its constant part."""
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    hooks = [(n, zero) for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]
    with torch.no_grad():
        resid = _final_resid(model, frozen.tokens, linearization_hooks(model, frozen) + hooks)[0]
        return float(sum(t.weight * _read_target(model, frozen, t, resid) for t in targets))


# ---- node list ----


@dataclass
class _Reader:
    """How a node reads from a leaf map (``key``) as a source: ``edge = sum M[:, items] * weights``;
    and as a target, its read-out coefficients ``(coef_key, index, coefficient tensor)``."""

    sources: list[tuple[str, list[int], list[float]]] = field(default_factory=list)
    reads: list[tuple[str, tuple, Tensor]] = field(default_factory=list)


def _topk_groups(contrib: Tensor, k: int) -> tuple[list[int], list[int]]:
    order = contrib.abs().argsort(descending=True).tolist()
    return order[:k], order[k:]


def _build_nodes(model: Any, clean: _Clean, targets: list[GraphTarget], tokens: list[int], n_layers: int,
                 split: str, top_k: int, last: int) -> tuple[list[GraphNode], list[_Reader], dict[str, Any]]:  # fmt: skip
    n_heads = model.cfg.n_heads
    nodes: list[GraphNode] = []
    readers: list[_Reader] = []
    extra: dict[str, Any] = {"eigen": {}}

    def add(node: GraphNode, reader: _Reader) -> None:
        nodes.append(node)
        readers.append(reader)

    for p in range(last + 1):
        value = clean.g_embed[p] @ clean.embed[p] + (0 if clean.pos_embed is None else clean.g_pos[p] @ clean.pos_embed[p])
        add(GraphNode("embedding", -1, p, tokens[p], float(value), f"token {_token_label(model, tokens[p])!r}"),
            _Reader(sources=[("emb", [p], [1.0])]))  # fmt: skip
    add(GraphNode("bias", -1, -1, -1, 0.0, "biases and constants"), _Reader())  # value set by the caller
    for l in range(n_layers):
        for p in range(last + 1):
            for h in range(n_heads):
                g = clean.g_attn[l][p]
                add(GraphNode("head", l, p, h, float(g @ clean.heads[l][p, h]), f"L{l} head {h}",
                              activation=float(clean.heads[l][p, h].norm())),
                    _Reader(sources=[(f"head{l}", [p * n_heads + h], [1.0])], reads=[(f"head{l}", (p, h), g)]))  # fmt: skip
        if l not in clean.mlp_out:
            continue
        for p in range(last + 1):
            g, w = clean.g_mlp[l][p], clean.mlp_out[l][p]
            if split == "sae" and l in clean.sae:
                _add_sae_nodes(add, l, p, g, clean.sae[l], top_k)
            elif split in ("none", "sae"):
                add(GraphNode("mlp", l, p, -1, float(g @ w), f"L{l} MLP", activation=float(w.norm())),
                    _Reader(sources=[(f"mlp{l}", [p], [1.0])], reads=[(f"mlp{l}", (p,), g)]))  # fmt: skip
            elif split == "neurons":
                coef = model.blocks[l].mlp.W_out.detach() @ g  # [d_mlp]: g . W_out[h]
                contrib = coef * clean.post[l][p]
                top, rest = _topk_groups(contrib, top_k)
                d_mlp = coef.shape[0]
                for h in top:
                    c = torch.zeros_like(coef)
                    c[h] = coef[h]
                    add(GraphNode("neuron", l, p, h, float(contrib[h]), f"L{l} neuron {h}", activation=float(clean.post[l][p, h])),
                        _Reader(sources=[(f"post{l}", [p * d_mlp + h], [float(clean.post[l][p, h])])], reads=[(f"post{l}", (p,), c)]))  # fmt: skip
                if rest:
                    c = coef.clone()
                    c[top] = 0
                    add(GraphNode("mlp_rest", l, p, -1, float(contrib[rest].sum()), f"L{l} other {len(rest)} neurons"),
                        _Reader(sources=[(f"post{l}", [p * d_mlp + h for h in rest], clean.post[l][p, rest].tolist())],
                                reads=[(f"post{l}", (p,), c)]))  # fmt: skip
            else:  # eigen
                from bilinear_lens.weights.tensor import interaction_matrix

                x = clean.mlp_in[l][p]
                gg = float(g @ g)
                lam, vecs = torch.linalg.eigh(interaction_matrix(model.blocks[l].mlp, g.to(model.W_E.dtype)).double())
                proj = vecs.T @ x.double()
                contrib = lam * proj**2
                top, rest = _topk_groups(contrib, top_k)
                unit = 1.0 / gg if gg > 0 else 0.0
                for i in top:
                    add(GraphNode("eigen", l, p, i, float(contrib[i]), f"L{l} eigen {i} (lambda {float(lam[i]):+.3g})",
                                  activation=float(proj[i])),
                        _Reader(sources=[(f"gdir{l}", [p], [float(contrib[i]) * unit])],
                                reads=[(f"x{l}", (p,), (lam[i] * proj[i] * vecs[:, i]).to(x.dtype))]))  # fmt: skip
                if rest:
                    coefvec = (vecs[:, rest] * (lam[rest] * proj[rest])).sum(1).to(x.dtype)
                    add(GraphNode("mlp_rest", l, p, -1, float(contrib[rest].sum()), f"L{l} other {len(rest)} eigen-components"),
                        _Reader(sources=[(f"gdir{l}", [p], [float(contrib[rest].sum()) * unit])], reads=[(f"x{l}", (p,), coefvec)]))  # fmt: skip
                add(GraphNode("mlp_residual", l, p, -1, 0.0, f"L{l} MLP write off the target"),
                    _Reader(sources=[(f"mlp{l}", [p], [1.0]), (f"gdir{l}", [p], [-float(g @ w) * unit])]))  # fmt: skip
                extra["eigen"][(l, p)] = (lam, vecs)
    for t, v in zip(targets, clean.targets):
        idx = t.token_id if t.token_id is not None else -1
        add(GraphNode("logit", n_layers, t.position, idx, v, t.label, activation=t.probability, token=t.token),
            _Reader(reads=[("resid", (t.position,), t.vector)]))
    return nodes, readers, extra


def _add_sae_nodes(add: Any, l: int, p: int, g: Tensor, sae_info: tuple[Any, Tensor, Tensor], top_k: int) -> None:
    """SAE features of the MLP's output at (l, p): the top ``top_k`` active features, an
    ``mlp_rest`` node for the other active ones and an ``mlp_residual`` error node (a source).
    A feature's value is ``(g . d_f) a_f``, read with its active set frozen:
    ``a_f = W_enc[:, f] . (out - b_dec) + b_enc[f]``, linear in the MLP output."""
    sae, acts, err = sae_info
    W_dec, W_enc = sae.W_dec.detach().to(g.dtype), sae.W_enc.detach().to(g.dtype)
    shift = sae.b_enc.detach().to(g.dtype) - (sae.b_dec.detach().to(g.dtype) @ W_enc) * float(sae.cfg.apply_b_dec_to_input)
    coef = W_dec @ g  # g . d_f
    active = (acts[p] != 0).nonzero().flatten().tolist()
    contrib = coef[active] * acts[p, active]
    order = contrib.abs().argsort(descending=True).tolist()
    groups = [([active[i]], f"feature {active[i]}") for i in order[:top_k]]
    if len(order) > top_k:
        groups.append(([active[i] for i in order[top_k:]], f"other {len(order) - top_k} active features"))
    d_sae = acts.shape[1]
    for features, label in groups:
        read = (W_enc[:, features] * coef[features]).sum(1)  # on the live MLP output (with b_out)
        const = (coef[features] * shift[features]).sum()
        value = float((coef[features] * acts[p, features]).sum())
        kind, index = ("sae_feature", features[0]) if len(features) == 1 else ("mlp_rest", -1)
        add(GraphNode(kind, l, p, index, value, f"L{l} SAE {label}", activation=float(acts[p, features[0]]) if len(features) == 1 else None),
            _Reader(sources=[(f"sae{l}", [p * d_sae + f for f in features], acts[p, features].tolist())],
                    reads=[(f"out{l}", (p,), read), ("const", (), const)]))  # fmt: skip
    add(GraphNode("mlp_residual", l, p, -1, float(g @ err[p]), f"L{l} SAE error"), _Reader(sources=[(f"saeerr{l}", [p], [1.0])]))


# ---- the edge pass: batched backward injection ----


def _leaf_forward(model: Any, frozen: FrozenValues, clean: _Clean, split: str, batch: int, n_layers: int,
                  zero: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
    """One linearized forward of ``batch`` copies with every node write a leaf (clean, or
    zeros with ``zero``). Returns (leaves, live values read by target nodes)."""
    pos = frozen.tokens.shape[1]
    leaves: dict[str, Tensor] = {}
    live: dict[str, Tensor] = {}

    def leaf(key: str, value: Tensor) -> Tensor:
        v = torch.zeros_like(value) if zero else value
        leaves[key] = v.expand(batch, *v.shape).clone().requires_grad_(not zero)
        return leaves[key]

    def replace(key: str, value: Tensor, post=None):
        def hook(act: Tensor, hook: Any) -> Tensor:
            x = leaf(key, value)
            return x if post is None else post(x)

        return hook

    def record(key: str, fn=None):
        def hook(act: Tensor, hook: Any) -> None:
            live[key] = act if fn is None else fn(act)

        return hook

    hooks = [("hook_embed", replace("emb", clean.embed))]
    if clean.pos_embed is not None:
        hooks.append(("hook_pos_embed", replace("pos", clean.pos_embed)))
    for l in range(n_layers):
        block = model.blocks[l]
        W_O, b_O = block.attn.W_O.detach(), _bias(block.attn, "b_O")
        hooks.append((f"blocks.{l}.attn.hook_z", record(f"head{l}", lambda z, W_O=W_O: torch.einsum("bphk,hkd->bphd", z, W_O))))
        hooks.append((f"blocks.{l}.hook_attn_out",
                      replace(f"head{l}", clean.heads[l], lambda x, b=b_O: x.sum(2) + (0 if b is None else b))))  # fmt: skip
        if l not in clean.mlp_out:
            continue
        mlp = block.mlp
        b_out = _bias(mlp, "b_out")
        hooks.append((f"blocks.{l}.mlp.hook_in", record(f"x{l}")))
        hooks.append((f"blocks.{l}.mlp.hook_post", record(f"post{l}")))
        hooks.append((f"blocks.{l}.hook_mlp_out", record(f"mlp{l}", lambda o, b=b_out: o - (0 if b is None else b))))
        hooks.append((f"blocks.{l}.hook_mlp_out", record(f"out{l}")))
        if split == "sae" and l in clean.sae:
            sae, acts, err = clean.sae[l]
            W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
            err_leaf = leaf(f"saeerr{l}", err)  # the error node's write: a leaf of its own
            fn = lambda x, W=W_dec, b=b_dec, e=err_leaf: x @ W.to(x.dtype) + b.to(x.dtype) + e  # noqa: E731
            hooks.append((f"blocks.{l}.hook_mlp_out", replace(f"sae{l}", acts, fn)))
        elif split == "neurons":
            W_out = mlp.W_out.detach()
            fn = lambda x, W=W_out, b=b_out: x @ W + (0 if b is None else b)  # noqa: E731
            hooks.append((f"blocks.{l}.hook_mlp_out", replace(f"post{l}", clean.post[l], fn)))
        else:
            fn = lambda x, b=b_out: x + (0 if b is None else b)  # noqa: E731
            hooks.append((f"blocks.{l}.hook_mlp_out", replace(f"mlp{l}", clean.mlp_out[l], fn)))
    tokens = frozen.tokens.expand(batch, pos)
    live["resid"] = _final_resid(model, tokens, linearization_hooks(model, frozen) + hooks)
    return leaves, live


def _read_out(live: dict[str, Tensor], rows: list[_Reader], frozen: FrozenValues, targets_pos_scale: dict[int, Tensor]) -> Tensor:
    """``q[b]``: the value of row ``b``'s target node, read from the live values of copy ``b``."""
    out = []
    for b, reader in enumerate(rows):
        total = torch.zeros((), dtype=live["resid"].dtype, device=live["resid"].device)
        for key, index, coef in reader.reads:
            if key == "const":
                total = total + coef.to(total.dtype)
            elif key == "resid":
                total = total + live["resid"][b, index[0]] @ coef.to(total.dtype) / targets_pos_scale[index[0]].to(total.dtype)
            else:
                total = total + (live[key][b][index] * coef.to(total.dtype)).sum()
        out.append(total)
    return torch.stack(out)


def _source_maps(leaves: dict[str, Tensor], clean: _Clean, n_layers: int, split: str) -> dict[str, Tensor]:
    """Per leaf key, ``[batch, items]``: gradient times clean write per item (``gdir``: gradient
    along ``g / |g|^2`` is left to the readers' weights: here ``grad . g``)."""
    maps: dict[str, Tensor] = {}
    grad = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()}
    emb = (grad["emb"] * clean.embed).sum(-1)
    if "pos" in grad:
        emb = emb + (grad["pos"] * clean.pos_embed).sum(-1)
    maps["emb"] = emb
    for l in range(n_layers):
        maps[f"head{l}"] = (grad[f"head{l}"] * clean.heads[l]).sum(-1).flatten(1)
        if f"post{l}" in grad:
            maps[f"post{l}"] = grad[f"post{l}"].flatten(1)  # weights hold the clean post
        if f"sae{l}" in grad:
            maps[f"sae{l}"] = grad[f"sae{l}"].flatten(1)  # weights hold the clean activations
            maps[f"saeerr{l}"] = (grad[f"saeerr{l}"] * clean.sae[l][2]).sum(-1)
        if f"mlp{l}" in grad:
            maps[f"mlp{l}"] = (grad[f"mlp{l}"] * clean.mlp_out[l]).sum(-1)
            if split == "eigen":
                maps[f"gdir{l}"] = (grad[f"mlp{l}"] * clean.g_mlp[l]).sum(-1)
    return maps


def _gather_plan(readers: list[_Reader]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per leaf key, ``(items, nodes, weights)``: source node ``nodes[j]`` takes
    ``weights[j] x M[:, items[j]]`` (one ``index_add`` per key instead of a loop over nodes)."""
    plan: dict[str, tuple[list[int], list[int], list[float]]] = {}
    for s, reader in enumerate(readers):
        for key, items, weights in reader.sources:
            entry = plan.setdefault(key, ([], [], []))
            entry[0].extend(items)
            entry[1].extend([s] * len(items))
            entry[2].extend(weights)
    return {k: (torch.tensor(i), torch.tensor(n), torch.tensor(w, dtype=torch.float64)) for k, (i, n, w) in plan.items()}


def _edges(maps: dict[str, Tensor], plan: dict[str, tuple[Tensor, Tensor, Tensor]], n_nodes: int) -> Tensor:
    batch = next(iter(maps.values())).shape[0]
    edges = torch.zeros(batch, n_nodes, dtype=torch.float64)
    for key, (items, nodes, weights) in plan.items():
        edges.index_add_(1, nodes, maps[key].double().cpu()[:, items] * weights)
    return edges


def _check_saes(model: Any, split: str, saes: Optional[dict[int, Any]]) -> None:
    """SAEs only with ``split="sae"``, each on its layer's ``hook_mlp_out``, as wide as the
    residual stream, without input normalisation (so features are linear with frozen gates)."""
    if (split == "sae") != bool(saes):
        raise ValueError("split='sae' and saes={layer: SAE} go together")
    for layer, sae in (saes or {}).items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"saes: layer {layer!r} is out of range [0, {model.cfg.n_layers})")
        hook = f"blocks.{layer}.hook_mlp_out"
        if sae.cfg.hook_name != hook:
            raise ValueError(f"saes[{layer}] reads {sae.cfg.hook_name!r}, not {hook!r}")
        if sae.cfg.d_in != model.cfg.d_model:
            raise ValueError(f"saes[{layer}] has d_in={sae.cfg.d_in}, but {hook} is {model.cfg.d_model} wide")
        if sae.cfg.normalize_activations != "none":
            raise ValueError(f"saes[{layer}] has normalize_activations={sae.cfg.normalize_activations!r}: only 'none' is linear with frozen gates")


def attribution_graph(
    model: Any,
    tokens: TokensLike,
    target: Any = None,
    *,
    cumulative_prob: float = 0.95,
    max_targets: int = 10,
    position: int = -1,
    split: str = "none",
    top_k: int = 4,
    exact: bool = True,
    chunk_size: int = 64,
    progress: bool = False,
    saes: Optional[dict[int, Any]] = None,
) -> AttributionGraph:
    """The attribution graph of ``model`` on one prompt (see module docstring).

    ``target``: ``None`` for the top logits at ``position`` up to ``cumulative_prob`` (at
    most ``max_targets``), or a direction spec / :class:`GraphTarget` / list of them.
    ``split``: ``"none"`` (one node per MLP and position), ``"neurons"`` or ``"eigen"`` (the
    top ``top_k`` per MLP and position plus remainder nodes). ``chunk_size``: target nodes per
    backward (memory ~ chunk_size copies of the prompt's activations). ``split="sae"``:
    ``saes`` maps layers to SAEs on ``blocks.{l}.hook_mlp_out``; each such MLP becomes its top
    ``top_k`` active features, a remainder node and an explicit error node (layers without an
    SAE keep one MLP node)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    for name, value in (("top_k", top_k), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    if exact:
        check_exact_mlps(model, "an exact attribution graph")
    if split == "eigen" and model_mlp_kind(model) != "none":
        if not mlp_kind_spec(model_mlp_kind(model)).is_bilinear:
            raise ValueError(f"split='eigen' needs bilinear MLPs, got mlp_kind={model_mlp_kind(model)!r}")
        if any(getattr(model.blocks[l].mlp, "b_out", None) is not None or getattr(model.blocks[l].mlp, "b_in", None) is not None
               for l in range(model.cfg.n_layers)):
            raise ValueError("split='eigen' needs MLPs without biases (mlp_bias=True): Q(u) is then not the whole layer")
    _check_saes(model, split, saes)
    tokens = one_prompt_tokens(model, tokens)
    n_pos = tokens.shape[1]
    _check_position(position, n_pos)
    targets = _as_targets(model, tokens, target, cumulative_prob, max_targets, position)
    n_layers = model.cfg.n_layers
    last = max(t.position for t in targets)
    frozen = record_frozen_values(model, tokens)
    clean = _clean_pass(model, frozen, targets, n_layers)
    for l, sae in (saes or {}).items():
        out = clean.mlp_out[l] + (0 if _bias(model.blocks[l].mlp, "b_out") is None else _bias(model.blocks[l].mlp, "b_out"))
        with torch.no_grad():
            # encoded in the model's dtype, so the frozen-gate read-out reproduces it exactly
            W_enc, b_enc, b_dec = (t.detach().to(out.dtype) for t in (sae.W_enc, sae.b_enc, sae.b_dec))
            acts = sae.activation((out - b_dec * float(sae.cfg.apply_b_dec_to_input)) @ W_enc + b_enc)
            clean.sae[l] = (sae, acts, out - (acts @ sae.W_dec.detach().to(out.dtype) + sae.b_dec.detach().to(out.dtype)))
    token_list = tokens[0].tolist()
    nodes, readers, extra = _build_nodes(model, clean, targets, token_list, n_layers, split, top_k, last)
    bias_index = next(i for i, n in enumerate(nodes) if n.kind == "bias")
    bias_value = _zero_input_target(model, frozen, targets, n_layers)
    nodes[bias_index] = GraphNode("bias", -1, -1, -1, bias_value, nodes[bias_index].label)
    n = len(nodes)
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    rows = [i for i, r in enumerate(readers) if r.reads]
    plan = _gather_plan(readers)
    scales = {t.position: _final_scale(frozen, t.position) for t in targets}
    chunks = [rows[i : i + chunk_size] for i in range(0, len(rows), chunk_size)]
    for chunk in progress_bar(chunks, desc="graph edges", unit="chunk", enabled=progress):
        chunk_readers = [readers[i] for i in chunk]
        with torch.enable_grad():
            leaves, live = _leaf_forward(model, frozen, clean, split, len(chunk), n_layers, zero=False)
            q = _read_out(live, chunk_readers, frozen, scales)
            q.sum().backward()
        edges = _edges(_source_maps(leaves, clean, n_layers, split), plan, n)
        with torch.no_grad():
            _, live0 = _leaf_forward(model, frozen, clean, split, len(chunk), n_layers, zero=True)
            edges[:, bias_index] += _read_out(live0, chunk_readers, frozen, scales).double().cpu()
        adjacency[chunk] = edges
    strings = [_token_label(model, t) for t in token_list]
    return AttributionGraph(nodes, adjacency, targets, clean.T, token_list, strings, n_layers, split,
                            exact=exact and frozen.exact, meta={"top_k": top_k, "eigen": extra["eigen"], "n_heads": model.cfg.n_heads})  # fmt: skip
