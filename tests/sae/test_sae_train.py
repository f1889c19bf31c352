"""The top-k SAE trainer: streams activations from the token cache, keeps decoder rows unit
norm, accounts dead features, resumes bitwise, and refuses to mix two runs."""

import json
import os

import pytest
import torch

from bilinear_lens.cli import main
from bilinear_lens.data.tokenizer import save_tokenizer
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.model import load_sae
from bilinear_lens.sae.recipe import load_sae_recipe
from bilinear_lens.locking import LockHeldError
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE
from bilinear_lens.sae.recipe import SAESpec
from bilinear_lens.sae.train import hook_activations, init_sae, tangent_decoder_gradients, train_sae
from bilinear_lens.training.run_dir import LOCK_FILE, claim_run_dir
from bilinear_lens.training.state import read_train_state
from conftest import tiny_config
from fixtures.sae_recipe import recipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("sae_train")
    torch.manual_seed(0)
    model = build_model(tiny_config(d_vocab=len(small_tokenizer), n_layers=1), tokenizer=small_tokenizer)
    model.save_pretrained(root / "m")
    return root / "m"


def test_trains_streams_and_writes_an_saelens_dir(checkpoint, tmp_path):
    result = train_sae(checkpoint, tmp_path / "run", recipe(tmp_path), progress=False)
    sae = load_sae(tmp_path / "run")  # a run directory means its final SAE
    assert result.final == tmp_path / "run" / "final" and sae.cfg.d_sae == 64 and sae.cfg.k == 4
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64), rtol=0, atol=1e-6)  # float32 rounding
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    for key in ("mse", "explained_variance", "l0", "dead_fraction", "lr", "tokens", "elapsed_s"):
        assert all(key in r for r in records), key
    assert all(r["l0"] <= 4 for r in records) and records[-1]["tokens"] == 12 * 8 * 16
    assert "val_explained_variance" in records[1] and "val_explained_variance" in records[3]
    assert records[3]["val_explained_variance"] > records[1]["val_explained_variance"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000008", "step_000012"]


def test_dead_fraction_counts_features_silent_for_the_window(checkpoint, tmp_path):
    """With dead_after_steps=1 a feature is dead at step s iff it did not fire on step s's
    batch, measured with the SAE as it was before that update (the step s-1 checkpoint)."""
    result = train_sae(checkpoint, tmp_path / "run", recipe(tmp_path, dead_after_steps=1, checkpoint_every=1,
                                                             keep_last=3, steps=6, log_every=1), progress=False)
    from bilinear_lens.data.corpus import prepare_data
    from bilinear_lens.models.model import BilinearTransformer

    model = BilinearTransformer.from_pretrained(checkpoint)
    _, train_blocks, _ = prepare_data("synthetic", tokenizer=checkpoint / "tokenizer.json", n_ctx=16,
                                      cache_dir=tmp_path / "cache", val_fraction=0.1, max_docs=300)
    before = load_sae(tmp_path / "run" / "checkpoints" / "step_000005")
    x = hook_activations(model, train_blocks.batch(5, 8, seed=0), "blocks.0.hook_resid_mid")
    with torch.no_grad():
        silent = (before.encode(x) > 0).sum(0) == 0
    assert result.metrics[-1]["dead_fraction"] == pytest.approx(float(silent.float().mean()), abs=0)


def test_resume_is_bitwise(checkpoint, tmp_path):
    straight = train_sae(checkpoint, tmp_path / "a", recipe(tmp_path), progress=False)
    stopped = train_sae(checkpoint, tmp_path / "b", recipe(tmp_path), progress=False, stop_at=5)
    assert stopped.steps == 5 and stopped.final.name == "step_000005"
    resumed = train_sae(checkpoint, tmp_path / "b", recipe(tmp_path), progress=False, resume=True)
    for name, tensor in load_sae(straight.final).state_dict().items():
        assert torch.equal(load_sae(resumed.final).state_dict()[name], tensor), name
    timing = ("elapsed_s", "tokens_per_s")  # wall-clock measurements, the only fields that may differ
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    # The shared Trainer's log: the resumed run's records are the straight run's, every one
    # (no extra record where the run stopped), dead_fraction included (the counters resume).
    assert [r["step"] for r in resumed.metrics] == [3, 6, 9, 12]
    assert strip(resumed.metrics) == strip(straight.metrics)
    assert read_train_state(resumed.final).data == read_train_state(straight.final).data


def test_refuses_to_mix_runs_and_bad_input(checkpoint, tmp_path, capsys):
    train_sae(checkpoint, tmp_path / "run", recipe(tmp_path, steps=2), progress=False)
    with pytest.raises(FileExistsError, match="already holds an SAE run"):
        train_sae(checkpoint, tmp_path / "run", recipe(tmp_path, steps=2), progress=False)
    rc = main(["sae", "train", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"),
               "--hook", "blocks.3.hook_resid_mid", "--set", "data.max_docs=300",
               "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown hook name 'blocks.3.hook_resid_mid'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"data.tokenizer='x.json' in test recipe: the SAE trainer always uses"):
        bad = recipe(tmp_path, steps=2)
        bad.data.tokenizer = "x.json"
        train_sae(checkpoint, tmp_path / "y", bad, progress=False)
    with pytest.raises(ValueError, match=r"SAESpec.k=0 is invalid: must be a positive integer"):
        load_sae_recipe(None, ["sae.k=0"])
    with pytest.raises(ValueError, match=r"override 'sae.kk=3' must be sae.key=value with key one of"):
        load_sae_recipe(None, ["sae.kk=3"])
    with pytest.raises(ValueError, match=r"unsupported key\(s\) \['grad_accum'\] in section \[train\]"):
        load_sae_recipe(None, ["train.grad_accum=2"])
    defaults = load_sae_recipe(None)  # the paper's settings
    assert (defaults.sae.k, defaults.sae.expansion, defaults.train.lr, defaults.train.weight_decay) == (30, 4, 1e-4, 0.0)


def test_cli_trains_and_eigen_reads_the_feature(checkpoint, tmp_path, capsys):
    cfg = tmp_path / "r.toml"
    cfg.write_text('[sae]\nexpansion = 2\nk = 4\n[train]\nsteps = 6\nbatch_size = 8\nlr = 3e-3\neval_every = 3\n'
                   f'[data]\nmax_docs = 300\nval_fraction = 0.1\ncache_dir = {json.dumps(str(tmp_path / "c"))}\n')
    rc = main(["sae", "train", "--checkpoint", str(checkpoint), "--hook", "blocks.0.hook_resid_post",
               "--config", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "final SAE" in out and "held-out explained variance" in out
    assert main(["eigen", "--checkpoint", str(checkpoint), "--sae", str(tmp_path / "out"), "--feature", "3",
                 "--top", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["direction"].startswith("feature 3 of")


def test_a_run_directory_in_use_is_refused_by_the_shared_lock(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    with claim_run_dir(out, writer=True):  # another writer (flock: per open file, so this process counts)
        with pytest.raises(LockHeldError, match=rf"run directory {out} is in use by pid {os.getpid()}"):
            train_sae(checkpoint, out, recipe(tmp_path, steps=2), progress=False)
        rc = main(["sae", "train", "--checkpoint", str(checkpoint), "--out", str(out), "--set", "data.max_docs=300",
                   "--set", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by pid {os.getpid()}" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()
    train_sae(checkpoint, out, recipe(tmp_path, steps=2), progress=False)  # free again
    assert not (out / LOCK_FILE).exists()


def test_decoder_gradients_are_tangent_to_the_unit_sphere():
    """Inside the context the gradient of W_dec[i] is g - (g.u)u (u the unit row), outside it is g."""
    torch.manual_seed(0)
    sae = init_sae(SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_mid", k=3, dtype="float64"),
                   torch.randn(32, 8, dtype=torch.float64), SAESpec(k=3), seed=0)
    x = torch.randn(32, 8, dtype=torch.float64)
    (sae(x) - x).pow(2).sum().backward()
    g = sae.W_dec.grad.clone()
    sae.zero_grad()
    with tangent_decoder_gradients(sae):
        (sae(x) - x).pow(2).sum().backward()
    u = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.grad, g - (g * u).sum(-1, keepdim=True) * u, rtol=0, atol=1e-12)  # float64
    assert (sae.W_dec.grad * u).sum(-1).abs().max() < 1e-12
    sae.zero_grad()
    (sae(x) - x).pow(2).sum().backward()  # the hook is gone
    assert torch.equal(sae.W_dec.grad, g)


def test_init_starts_b_dec_at_the_first_batch_mean():
    cfg = SAEConfig(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_mid", k=3, dtype="float64")
    first = torch.randn(32, 8, dtype=torch.float64) + 5.0
    sae = init_sae(cfg, first, SAESpec(k=3), seed=0)
    assert torch.equal(sae.b_dec.detach(), first.mean(0)) and torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(init_sae(cfg, first, SAESpec(k=3, init_b_dec_to_mean=False), seed=0).b_dec.detach(),
                       torch.zeros(8, dtype=torch.float64))
