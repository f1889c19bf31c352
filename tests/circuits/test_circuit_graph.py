"""Attribution graphs without transcoders: exact direct effects with patterns and norm
scales frozen (float64). Checked: every node's value equals the sum of its incoming edges,
token + bias nodes sum to the target, edges into a logit equal TransformerLens' direct logit
attribution, an intervention under the freezes moves nodes exactly as the edges say, the
splits agree with the unsplit graph, and bad input is refused in one line."""

import pytest
import torch

from bilinear_lens.circuits.graph import GraphTarget, attribution_graph, direction_target, top_logit_targets
from bilinear_lens.circuits.linearized import linearized
from bilinear_lens.models.model import build_model
from conftest import tiny_config
from fixtures.linearized_models import CONFIGS, EXACT, prompt, random_model


def final_bias_constant(model, token):
    """What a LayerNorm's bias adds to a logit (not a direction in the residual stream)."""
    b = getattr(model.ln_final, "bias", None)
    return 0.0 if b is None else float(model.W_U[:, token].detach() @ b.detach())


@pytest.mark.parametrize("split", ["none", "neurons", "eigen"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_node_values_are_sums_of_incoming_edges(name, split):
    if split == "eigen" and CONFIGS[name].get("mlp_bias"):
        pytest.skip("eigen split needs MLPs without biases (tested as a refusal below)")
    model, tokens = random_model(**CONFIGS[name]), prompt()
    graph = attribution_graph(model, tokens, split=split, chunk_size=17)
    assert graph.exact
    values, A = graph.values, graph.adjacency
    for i, node in enumerate(graph.nodes):
        if node.is_source:
            assert not A[i].any(), node.node_id  # sources have no inputs
        else:
            assert abs(float(A[i].sum()) - node.value) < EXACT, node.node_id
    sources = [i for i, n in enumerate(graph.nodes) if n.kind in ("embedding", "bias")]
    assert abs(float(values[sources].sum()) - graph.target_value) < EXACT
    assert graph.completeness_error() < EXACT
    # the target is the weighted logits of the real (unfrozen) forward
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    expected = sum(t.weight * (float(logits[t.token_id]) - final_bias_constant(model, t.token_id)) for t in graph.targets)
    assert abs(graph.target_value - expected) < EXACT
    assert not torch.triu(A).any()  # topological order: edges only from earlier nodes


def test_top_logit_targets_cover_the_cumulative_probability():
    model, tokens = random_model(), prompt()
    probs = model(tokens)[0, -1].softmax(-1)
    targets = top_logit_targets(model, tokens, cumulative_prob=0.05, max_targets=50)
    weights = [t.weight for t in targets]
    assert weights == sorted(weights, reverse=True)
    assert sum(weights) >= 0.05 and sum(weights[:-1]) < 0.05
    assert [t.token_id for t in targets] == probs.argsort(descending=True)[: len(targets)].tolist()
    assert len(top_logit_targets(model, tokens, cumulative_prob=1.0, max_targets=3)) == 3


@pytest.mark.parametrize("norm", ["RMSPre", "LNPre", "none"])
def test_edges_into_logit_equal_direct_logit_attribution(norm):
    """TransformerLens' logit_attrs (cached final scale, i.e. frozen) per head and per
    component equal the graph's edges into the logit node."""
    model, tokens = random_model(normalization_type=norm), prompt()
    token, last = 5, tokens.shape[1] - 1
    graph = attribution_graph(model, tokens, target=token)
    logit = graph.index(f"logit{token}@{last}")
    _, cache = model.run_with_cache(tokens)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)
    dla_heads = cache.logit_attrs(heads, tokens=torch.tensor([token]), pos_slice=-1)[:, 0]
    edges = torch.stack([graph.adjacency[logit, graph.index(f"L{l}.H{h}@{last}")] for l in range(2) for h in range(4)])
    torch.testing.assert_close(edges, dla_heads.detach(), rtol=0, atol=EXACT)
    parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    dla = dict(zip(labels, cache.logit_attrs(parts, tokens=torch.tensor([token]), pos_slice=-1)[:, 0].tolist()))
    emb = graph.index(f"emb{int(tokens[0, last])}@{last}")
    assert abs(float(graph.adjacency[logit, emb]) - dla["embed"]) < EXACT
    for l in range(2):
        assert abs(float(graph.adjacency[logit, graph.index(f"L{l}.mlp@{last}")]) - dla[f"{l}_mlp_out"]) < EXACT


def test_learned_final_norm_weight_is_in_the_edge():
    """With a learned RMS weight w the logit edge is write / scale0 . (w * W_U[:, t])."""
    model, tokens = random_model(normalization_type="RMS"), prompt()
    graph = attribution_graph(model, tokens, target=5)
    _, cache = model.run_with_cache(tokens)
    last = tokens.shape[1] - 1
    write = cache["blocks.1.hook_mlp_out"][0, last]
    expected = float(write / cache["ln_final.hook_scale"][0, last] @ (model.ln_final.weight * model.W_U[:, 5]).detach())
    assert abs(float(graph.adjacency[graph.index(f"logit5@{last}"), graph.index(f"L1.mlp@{last}")]) - expected) < EXACT


def scaled_head_hook(head, position, alpha):
    def hook(z, hook):
        z = z.clone()
        z[:, position, head] *= alpha
        return z

    return hook


def test_intervention_changes_nodes_as_edges_predict():
    """Scale one head's write by alpha in the linearized model: the target moves by
    (alpha - 1) x the head's value; a later node, with the nodes between held at their clean
    writes, moves by (alpha - 1) x its edge from the head."""
    model, tokens = random_model(normalization_type="LN", attn_bias=True, mlp_bias=True), prompt()
    graph = attribution_graph(model, tokens, target=(5, 7))
    alpha, head, position = 1.7, 2, 3
    source = graph.index(f"L0.H{head}@{position}")
    target_vec = graph.targets[0].vector
    last = tokens.shape[1] - 1
    _, clean_cache = model.run_with_cache(tokens)
    with linearized(model, tokens) as frozen:
        scale = frozen.scales["ln_final.hook_scale"][0, last, 0]
        hooks = [("blocks.0.attn.hook_z", scaled_head_hook(head, position, alpha))]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(tokens)
        moved = float(cache["blocks.1.hook_resid_post"][0, last] @ target_vec / scale)
        assert abs((moved - graph.target_value) - (alpha - 1) * graph.nodes[source].value) < EXACT
        # direct effect on a layer-1 head at a later position: hold layer 0's MLP at its clean write
        hold = lambda act, hook: clean_cache["blocks.0.hook_mlp_out"]  # noqa: E731
        with torch.no_grad(), model.hooks(fwd_hooks=hooks + [("blocks.0.hook_mlp_out", hold)]):
            _, held = model.run_with_cache(tokens)
        # the same MLP-0 write at the head's own position carries the change, so freeze it too
        for reader_head, q in [(1, position + 2), (3, last)]:
            t = graph.index(f"L1.H{reader_head}@{q}")
            g = _total_gradient_at_attn_out(model, tokens, graph, layer=1)[q]
            write = lambda c: torch.einsum("k,kd->d", c["blocks.1.attn.hook_z"][0, q, reader_head], model.blocks[1].attn.W_O[reader_head].detach())  # noqa: E731
            change = float(g @ (write(held) - write(clean_cache)))
            assert abs(change - (alpha - 1) * float(graph.adjacency[t, source])) < EXACT
        # and on layer 0's MLP at the head's position (its only path is direct)
        m = graph.index(f"L0.mlp@{position}")
        g_mlp = _total_gradient_at(model, tokens, graph, "blocks.0.hook_mlp_out")[position]
        change = float(g_mlp @ (cache["blocks.0.hook_mlp_out"][0, position] - clean_cache["blocks.0.hook_mlp_out"][0, position]))
        assert abs(change - (alpha - 1) * float(graph.adjacency[m, source])) < EXACT


def _total_gradient_at(model, tokens, graph, name):
    """dT / d(activation at ``name``) in the linearized model (the weight of a node's value)."""
    store = {}

    def probe(act, hook):
        store["delta"] = torch.zeros_like(act, requires_grad=True)
        return act + store["delta"]

    with linearized(model, tokens) as frozen, torch.enable_grad(), model.hooks(fwd_hooks=[(name, probe)]):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)[0]
        T = sum(t.weight * resid[t.position] @ t.vector / frozen.scales["ln_final.hook_scale"][0, t.position, 0] for t in graph.targets)
        (grad,) = torch.autograd.grad(T, store["delta"])
    return grad[0]


def _total_gradient_at_attn_out(model, tokens, graph, layer):
    return _total_gradient_at(model, tokens, graph, f"blocks.{layer}.hook_attn_out")


def test_splits_refine_the_unsplit_graph():
    """Neuron and eigen nodes of an MLP (with their remainder nodes) sum to the MLP node,
    in value and in their edges into later nodes; the eigen residual node has value 0."""
    model, tokens = random_model(), prompt()
    whole = attribution_graph(model, tokens)
    for split in ("neurons", "eigen"):
        graph = attribution_graph(model, tokens, split=split, top_k=3)
        later = [n.node_id for n in whole.nodes if n.kind in ("head", "logit") and n.layer >= 1]
        for p in (2, tokens.shape[1] - 1):
            parts = [i for i, n in enumerate(graph.nodes) if n.layer == 0 and n.position == p and n.kind in ("neuron", "eigen", "mlp_rest", "mlp_residual")]
            assert len([i for i in parts if graph.nodes[i].kind in ("neuron", "eigen")]) == 3
            mlp = whole.index(f"L0.mlp@{p}")
            assert abs(sum(graph.nodes[i].value for i in parts) - whole.nodes[mlp].value) < EXACT
            for node_id in later:
                split_sum = float(graph.adjacency[graph.index(node_id), parts].sum())
                assert abs(split_sum - float(whole.adjacency[whole.index(node_id), mlp])) < EXACT
        residuals = [n for n in graph.nodes if n.kind == "mlp_residual"]
        assert (split == "eigen") == bool(residuals) and all(n.value == 0.0 for n in residuals)


def test_chunk_size_does_not_change_the_graph():
    model, tokens = random_model(), prompt()
    a = attribution_graph(model, tokens, chunk_size=5).adjacency
    b = attribution_graph(model, tokens, chunk_size=64).adjacency
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_vector_and_logit_difference_targets():
    model, tokens = random_model(), prompt()
    diff = attribution_graph(model, tokens, target=(5, 7))
    assert len(diff.targets) == 1 and diff.targets[0].weight == 1.0
    with torch.no_grad():
        logits = model(tokens)[0, -1]
    assert abs(diff.target_value - float(logits[5] - logits[7])) < EXACT
    vector = attribution_graph(model, tokens, target=diff.targets[0].vector.clone())
    torch.testing.assert_close(vector.adjacency, diff.adjacency, rtol=0, atol=EXACT)
    at_pos = attribution_graph(model, tokens, target=GraphTarget("t", diff.targets[0].vector, position=4))
    assert max(n.position for n in at_pos.nodes) == 4 and at_pos.completeness_error() < EXACT


def test_swiglu_and_gelu_are_refused_or_flagged():
    for kind in ("swiglu", "gelu"):
        model, tokens = random_model(mlp_kind=kind), prompt()
        with pytest.raises(ValueError, match=rf"^layer 0 has mlp_kind='{kind}', not 'bilinear': an exact attribution graph is exact only"):
            attribution_graph(model, tokens)
        graph = attribution_graph(model, tokens, exact=False)
        assert not graph.exact and graph.completeness_error() > 1e-7


@pytest.fixture(scope="module")
def text_model(small_tokenizer):
    tok = small_tokenizer
    return build_model(tiny_config(d_vocab=len(tok), dtype="float64"), tokenizer=tok).eval()


def test_bad_input_is_refused_in_one_line(text_model):
    model, tokens = random_model(), prompt()
    with pytest.raises(ValueError, match=r"^position=9 is out of range for a prompt of 9 tokens$"):
        attribution_graph(model, tokens, position=9)
    with pytest.raises(ValueError, match=r"^position=-10 is out of range for a prompt of 9 tokens$"):
        attribution_graph(model, tokens, target=GraphTarget("t", torch.ones(32, dtype=torch.float64), position=-10))
    with pytest.raises(ValueError, match=r"^split='heads'; allowed: none, neurons, eigen, sae$"):
        attribution_graph(model, tokens, split="heads")
    with pytest.raises(ValueError, match=r"^top_k=0 must be an integer >= 1$"):
        attribution_graph(model, tokens, split="neurons", top_k=0)
    with pytest.raises(ValueError, match=r"^split='eigen' needs MLPs without biases"):
        attribution_graph(random_model(mlp_bias=True), tokens, split="eigen")
    with pytest.raises(ValueError, match=r"^cumulative_prob=1.5 must lie in \(0, 1\]$"):
        attribution_graph(model, tokens, cumulative_prob=1.5)
    with pytest.raises(ValueError, match=r"^' happiness' is \d+ tokens .*, not one"):
        attribution_graph(text_model, "Tom was happy.", target=" happiness")
    with pytest.raises(ValueError, match=r"^direction must have shape \(32,\)"):
        direction_target(model, torch.ones(5))
    word = next(w for w in (" was", " the", " Tom", ".") if len(text_model.tokenizer.encode(w, add_special_tokens=False)) == 1)
    graph = attribution_graph(text_model, "Tom was happy.", target=word)
    assert graph.targets[0].label == f"logit {word!r}" and graph.token_strings[0] == text_model.tokenizer.decode([graph.tokens[0]])


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")  # the freezing does, on purpose
@pytest.mark.parametrize("split", ["none", "neurons", "eigen"])
def test_bridge_builds_the_same_graph(split):
    from bilinear_lens.models.bridge import to_bridge

    model, tokens = random_model(normalization_type="RMS"), prompt()
    ours = attribution_graph(model, tokens, split=split, top_k=2)
    bridge = attribution_graph(to_bridge(model), tokens, split=split, top_k=2)
    assert [n.node_id for n in bridge.nodes] == [n.node_id for n in ours.nodes]
    torch.testing.assert_close(bridge.adjacency, ours.adjacency, rtol=0, atol=EXACT)
    assert bridge.completeness_error() < EXACT


def random_sae(d_in: int, hook: str, seed: int, **overrides):
    from bilinear_lens.sae.config import SAEConfig
    from bilinear_lens.sae.model import SAE

    sae = SAE(SAEConfig(d_in=d_in, d_sae=40, hook_name=hook, dtype="float64", **({"architecture": "topk", "k": 5} | overrides)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return sae


@pytest.mark.parametrize("architecture", [dict(architecture="standard", k=None), dict(architecture="topk", k=5)])
def test_sae_split_is_exact_with_an_error_node(architecture):
    """SAE features on hook_mlp_out (active set frozen) plus an explicit error node: values
    are sums of incoming edges, and features + remainder + error + the decoder bias's share
    equal the unsplit MLP node's value."""
    model, tokens = random_model(normalization_type="LN", attn_bias=True, mlp_bias=True), prompt()
    saes = {l: random_sae(32, f"blocks.{l}.hook_mlp_out", l, **architecture) for l in (0, 1)}
    graph = attribution_graph(model, tokens, split="sae", saes=saes, top_k=3)
    assert graph.completeness_error() < EXACT
    for i, node in enumerate(graph.nodes):
        if not node.is_source:
            assert abs(float(graph.adjacency[i].sum()) - node.value) < EXACT, node.node_id
    whole = attribution_graph(model, tokens)
    g = _total_gradient_at(model, tokens, whole, "blocks.0.hook_mlp_out")
    for p in (0, tokens.shape[1] - 1):
        parts = [n for n in graph.nodes if n.layer == 0 and n.position == p and n.kind in ("sae_feature", "mlp_rest", "mlp_residual")]
        assert 1 <= sum(n.kind == "sae_feature" for n in parts) <= 3 and parts[-1].kind == "mlp_residual"
        b_shift = float(g[p] @ (saes[0].b_dec - model.blocks[0].mlp.b_out).detach())
        assert abs(sum(n.value for n in parts) + b_shift - whole.nodes[whole.index(f"L0.mlp@{p}")].value) < EXACT


def test_sae_split_refuses_bad_saes():
    model, tokens = random_model(), prompt()
    with pytest.raises(ValueError, match=r"^saes\[0\] has d_in=16, but blocks.0.hook_mlp_out is 32 wide$"):
        attribution_graph(model, tokens, split="sae", saes={0: random_sae(16, "blocks.0.hook_mlp_out", 0)})
    with pytest.raises(ValueError, match=r"^saes\[1\] reads 'blocks.1.hook_resid_post', not 'blocks.1.hook_mlp_out'$"):
        attribution_graph(model, tokens, split="sae", saes={1: random_sae(32, "blocks.1.hook_resid_post", 0)})
    with pytest.raises(ValueError, match=r"^split='sae' and saes=\{layer: SAE\} go together$"):
        attribution_graph(model, tokens, split="sae")
