"""`bilinear-lens circuit graph`: writes the pruned graph as HTML or graph JSON, prints a
summary (--json), shows a progress bar, and refuses bad input with one line (exit 2)."""

import json

import pytest
import torch

from bilinear_lens.circuits.graph import attribution_graph
from bilinear_lens.circuits.graph_prune import prune_graph
from bilinear_lens.cli import main
from bilinear_lens.models.model import BilinearTransformer, build_model
from conftest import tiny_config

TEXT = "Tom was not happy. He was"


@pytest.fixture(scope="module")
def root(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("graph-cli")
    tok = small_tokenizer
    for kind in ("bilinear", "swiglu"):
        build_model(tiny_config(d_vocab=len(tok), n_ctx=32, mlp_kind=kind), tokenizer=tok).save_pretrained(root / kind)
    return root


def run(capsys, *args):
    rc = main(["circuit", "graph", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_token(tokenizer):
    return next(w for w in (" was", " the", " Tom", ".") if len(tokenizer.encode(w, add_special_tokens=False)) == 1)


def test_json_out_matches_the_library(root, tmp_path, capsys):
    out = tmp_path / "graph.json"
    rc, stdout, err = run(capsys, "--checkpoint", root / "bilinear", "--text", TEXT, "--out", out, "--json", "--dtype", "float64")
    assert rc == 0, err
    info = json.loads(stdout)
    model = BilinearTransformer.from_pretrained(root / "bilinear").to(torch.float64)
    graph = attribution_graph(model, model.to_tokens(TEXT))
    pruned = prune_graph(graph, 0.8, 0.98)
    assert info["nodes"] == len(graph.nodes) and info["pruned_nodes"] == len(pruned.nodes) and info["exact"]
    assert info["completeness_error"] < 1e-10 and info["targets"][0]["token_id"] == graph.targets[0].token_id
    data = json.loads(out.read_text())
    assert len(data["nodes"]) == len(pruned.nodes) and len(data["links"]) == pruned.n_edges
    assert data["metadata"]["slug"] == "graph" and "graph edges" in err  # the progress bar


def test_html_out_with_direction_and_split(root, tmp_path, capsys):
    model = BilinearTransformer.from_pretrained(root / "bilinear")
    word = one_token(model.tokenizer)
    out = tmp_path / "graph.html"
    rc, stdout, err = run(capsys, "--checkpoint", root / "bilinear", "--text", TEXT, "--token", word, "--split", "neurons",
                          "--top-k", "2", "--out", out, "--quiet")  # fmt: skip
    assert rc == 0, err
    assert f"target logit {word!r} (w 1)" in stdout and f"wrote {out}" in stdout and err == ""
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "http" not in page
    ids = model.to_tokens(TEXT)[0].tolist()
    rc, stdout, _ = run(capsys, "--checkpoint", root / "bilinear", "--ids", *ids, "--logit-diff-id", 3, 4, "--json", "--quiet")
    decoded = [model.tokenizer.decode([i]) for i in (3, 4)]
    assert rc == 0 and json.loads(stdout)["targets"][0]["label"] == f"logit[{decoded[0]!r}] - logit[{decoded[1]!r}]"


def test_bad_input_is_one_line_exit_2(root, tmp_path, capsys):
    ckpt = root / "bilinear"
    cases = [
        (("--text", TEXT, "--token", " happiness"), r"--token ' happiness': ' happiness' is \d+ tokens"),
        (("--text", TEXT, "--position", 40), r"--position 40 is out of range for a prompt of \d+ tokens"),
        (("--text", TEXT, "--out", tmp_path / "g.png"), r"--out '.*g.png' must end in .html or .json, got '.png'"),
        (("--text", TEXT, "--node-threshold", 1.5), r"--node-threshold must lie in \[0, 1\], got 1.5"),
        (("--text", TEXT, "--top-k", 0), r"--top-k must be >= 1, got 0"),
        (("--ids", 1, 2, 5000), r"token ids must lie in \[0, \d+\), got range \[1, 5000\]"),
    ]
    for args, message in cases:
        rc, _, err = run(capsys, "--checkpoint", ckpt, *args, "--quiet")
        assert rc == 2 and err.count("\n") == 1, err
        assert __import__("re").match(rf"bilinear-lens circuit graph: error: {message}", err), err
    rc, _, err = run(capsys, "--checkpoint", root / "swiglu", "--text", TEXT, "--quiet")
    assert rc == 2 and "error: layer 0 has mlp_kind='swiglu', not 'bilinear'" in err and err.count("\n") == 1
    rc, stdout, _ = run(capsys, "--checkpoint", root / "swiglu", "--text", TEXT, "--quiet", "--allow-inexact", "--json")
    assert rc == 0 and json.loads(stdout)["exact"] is False
    assert not list(tmp_path.iterdir())


def test_benchmark_runs_at_a_small_size(capsys):
    """benchmarks.graph prints nodes, edges, seconds, nodes/s per split and dtype."""
    from benchmarks import graph as bench

    assert bench.main(["--positions", "4", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nodes/s" in lines[1] and len(lines) == 8
    for line in lines[2:]:
        dtype, split, nodes, edges, seconds, rate, err, _ = line.split()
        assert int(nodes) > 0 and int(edges) > 0 and float(seconds) > 0 and float(rate) > 0
        assert float(err) < (1e-12 if dtype == "float64" else 1e-5)


def test_sae_split_from_the_command_line(root, tmp_path, capsys):
    from bilinear_lens.sae.config import SAEConfig
    from bilinear_lens.sae.model import SAE, save_sae

    for name, hook in (("l0", "blocks.0.hook_mlp_out"), ("resid", "blocks.0.hook_resid_post")):
        sae = SAE(SAEConfig(d_in=32, d_sae=40, hook_name=hook, architecture="topk", k=4))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        save_sae(sae, tmp_path / name)
    ckpt = root / "bilinear"
    rc, stdout, err = run(capsys, "--checkpoint", ckpt, "--text", TEXT, "--split", "sae", "--mlp-sae", tmp_path / "l0",
                          "--json", "--quiet", "--dtype", "float64")  # fmt: skip
    assert rc == 0, err
    info = json.loads(stdout)
    assert info["completeness_error"] < 1e-10 and info["split"] == "sae"
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--text", TEXT, "--split", "sae", "--mlp-sae", tmp_path / "resid", "--quiet")
    assert rc == 2 and "reads 'blocks.0.hook_resid_post', not a blocks.L.hook_mlp_out" in err
    rc, _, err = run(capsys, "--checkpoint", ckpt, "--text", TEXT, "--split", "sae", "--quiet")
    assert rc == 2 and "--split sae and --mlp-sae go together" in err
