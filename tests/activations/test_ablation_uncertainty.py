"""Ablation effects carry a standard error over token rows, and the CLI marks effects not
distinguishable from zero (issue 25 item 5: rankings of the tiny model differed between
CLI, report and notebook with every effect <= 0.005 nats, and nothing said so)."""

import json
import math

import pytest
import torch
from scipy import stats

from bilinear_lens.activations.ablation import ablate_neurons, ablation_sweep
from bilinear_lens.commands import ablate as ablate_cmd
from bilinear_lens.models.model import build_model, next_token_loss

from conftest import tiny_config


def f64_model():
    return build_model(tiny_config(dtype="float64"))


def tokens_of(rows: int, pos: int = 9) -> torch.Tensor:
    return torch.randint(0, 97, (rows, pos), generator=torch.Generator().manual_seed(rows))


def reference_row_deltas(model, tokens, neuron, fn):
    with torch.no_grad():
        clean = fn(model(tokens))
        with ablate_neurons(model, 0, [neuron]):
            ablated = fn(model(tokens))
    return ablated - clean


def test_loss_se_is_the_spread_of_per_row_deltas():
    model, tokens = f64_model(), tokens_of(6)
    table = ablation_sweep(model, tokens, 0, [3, 7, 11], progress=False)
    for i, neuron in enumerate([3, 7, 11]):
        rows = reference_row_deltas(model, tokens, neuron,
                                    lambda logits: next_token_loss(logits, tokens, per_token=True).mean(-1))
        # float64 throughout: the only difference is summation order
        assert table["delta_loss"][i].item() == pytest.approx(rows.mean().item(), abs=1e-12)
        assert table["delta_loss_se"][i].item() == pytest.approx((rows.std() / math.sqrt(6)).item(), abs=1e-12)


@pytest.mark.parametrize("position", [-1, 0, None])
def test_logit_diff_se_per_position_rule(position):
    model, tokens = f64_model(), tokens_of(5)
    table = ablation_sweep(model, tokens, 0, [2], logit_diff=(4, 9), position=position, progress=False)

    def diff(logits):
        at = logits if position is None else logits[:, [position]]
        return (at[..., 4] - at[..., 9]).mean(-1)

    rows = reference_row_deltas(model, tokens, 2, diff)
    assert table["delta_logit_diff"][0].item() == pytest.approx(rows.mean().item(), abs=1e-12)
    assert table["delta_logit_diff_se"][0].item() == pytest.approx((rows.std() / math.sqrt(5)).item(), abs=1e-12)


def test_one_row_has_no_standard_error():
    table = ablation_sweep(f64_model(), tokens_of(1), 0, [0, 1], progress=False)
    assert torch.isnan(table["delta_loss_se"]).all() and not torch.isnan(table["delta_loss"]).any()


@pytest.fixture(scope="module")
def checkpoint(saved_checkpoint):
    return saved_checkpoint(n_ctx=32)


def test_cli_marks_effects_not_distinguishable_after_the_fdr_correction(checkpoint, capsys):
    argv = ["--checkpoint", str(checkpoint), "--n-texts", "6", "--seq-len", "16", "--top", "48"]
    assert ablate_cmd.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["se_column"] == "delta_loss_se" and report["q_column"] == "delta_loss_q" and report["fdr"] == 0.05
    assert report["clusters"] == "documents" and report["n_clusters"] == 6  # the six documents read
    flags = [row["distinguishable"] for row in report["neurons"]]
    assert flags == [r["delta_loss_q"] < 0.05 for r in report["neurons"]]
    assert report["n_distinguishable"] == sum(flags)  # --top 48 lists every neuron
    # the q-values are Benjamini-Hochberg of the layer's p-values
    p = torch.tensor([r["delta_loss_p"] for r in report["neurons"]], dtype=torch.float64)
    q = torch.tensor([r["delta_loss_q"] for r in report["neurons"]], dtype=torch.float64)
    assert torch.allclose(q, torch.from_numpy(stats.false_discovery_control(p.numpy())), rtol=1e-12, atol=0)
    assert ablate_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert (f"distinguishable from zero: {sum(flags)} of 48 neurons (Benjamini-Hochberg q < 0.05 over the layer's "
            "48 neurons; standard errors clustered by document (6 documents))") in out
    marked = [line for line in out.splitlines() if line.endswith("~0")]
    assert len(marked) == flags.count(False)
    assert ablate_cmd.main([*argv, "--json", "--fdr", "0.5"]) == 0  # a looser rate calls at least as many
    assert json.loads(capsys.readouterr().out)["n_distinguishable"] >= sum(flags)


@pytest.mark.parametrize("fdr", ["0", "1", "-0.1", "nan"])
def test_cli_refuses_an_fdr_outside_0_1(checkpoint, fdr, capsys):
    assert ablate_cmd.main(["--checkpoint", str(checkpoint), "--fdr", fdr]) == 2
    assert f"--fdr must be in (0, 1) (a false discovery rate), got {float(fdr)}" in capsys.readouterr().err


def test_cli_json_has_null_se_for_one_row(checkpoint, tmp_path, capsys):
    from bilinear_lens.data.packing import document_stream
    from bilinear_lens.models.model import BilinearTransformer

    text = tmp_path / "one.txt"
    text.write_text("Lily was happy. Tom was sad.", encoding="utf-8")
    n = len(document_stream(BilinearTransformer.from_pretrained(checkpoint).tokenizer, [text.read_text()]))
    assert 2 <= n <= 32
    argv = ["--checkpoint", str(checkpoint), "--text-file", str(text), "--seq-len", str(n), "--top", "2", "--json"]
    assert ablate_cmd.main(argv) == 0
    out = capsys.readouterr().out
    assert "NaN" not in out  # strict JSON
    report = json.loads(out)
    assert report["tokens"] == [1, n]
    assert all(row["delta_loss_se"] is None and row["distinguishable"] is None for row in report["neurons"])
