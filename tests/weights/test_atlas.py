"""Eigen atlas: batched top-k vs dense eigh, both routes, shards, resume, loader, CLI, errors,
and a 2-process torchrun run equal to one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.models.model import build_model
from bilinear_lens.weights import atlas as atlas_module
from bilinear_lens.weights.atlas import build_atlas, choose_route, model_atlas
from bilinear_lens.weights.atlas_store import SHARD_RECORD, SHARD_TENSORS, AtlasError, EigenAtlas
from bilinear_lens.weights import batched_eigen
from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs
from bilinear_lens.weights.eigen import eigendecompose
from bilinear_lens.weights.tensor import BilinearWeights, interaction_matrices
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def random_weights(d: int = 24, d_mlp: int = 40, seed: int = 0, dtype=torch.float64) -> BilinearWeights:
    g = torch.Generator().manual_seed(seed)
    return BilinearWeights(*(torch.randn(*shape, generator=g, dtype=dtype) / shape[0] ** 0.5
                             for shape in ((d, d_mlp), (d, d_mlp), (d_mlp, d))))


def spectrum_matrices(n: int, d: int, seed: int) -> torch.Tensor:
    """Symmetric ``E diag(s) E^T`` with trained-like spectra: a clustered, mixed-sign top
    (1, -0.999, 0.998, ...) over a decaying bulk, in random bases."""
    g = torch.Generator().manual_seed(seed)
    top = torch.tensor([1.0, -0.999, 0.998, -0.997, 0.99, 0.985, -0.98, 0.5, -0.45, 0.4], dtype=torch.float64)
    out = []
    for _ in range(n):
        bulk = 0.3 * torch.rand(d - top.numel(), dtype=torch.float64, generator=g) ** 2
        bulk = bulk * torch.where(torch.rand(bulk.shape, generator=g) < 0.5, -1.0, 1.0).double()
        E = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g)).Q
        out.append(E @ torch.diag(torch.cat([top, bulk])) @ E.T)
    return torch.stack(out)


def assert_top_k_matches(got, ref_Q: torch.Tensor, k: int, rtol: float) -> None:
    ref = eigendecompose(ref_Q).top(k)
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=rtol, atol=0)
    overlaps = (got.eigenvectors * ref.eigenvectors).sum(-2)  # signed: both follow the sign convention
    assert (overlaps > 1 - rtol).all(), overlaps.min()


@pytest.mark.parametrize("make", ["trained_like", "random"])
def test_batched_krylov_matches_dense_eigh(make: str) -> None:
    d, k = 96, 6
    Q = spectrum_matrices(5, d, seed=1) if make == "trained_like" else interaction_matrices(random_weights(d, 160), torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    # block 8, 3 steps: a 32-column basis in R^96, so the Krylov path (not the exact one) runs.
    got = batched_top_eigenpairs(Q, k, block_size=8, steps=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert got.eig.eigenvalues.shape == (5, k) and got.eig.eigenvectors.shape == (5, d, k)
    # residual 1e-10 of max|lambda| bounds eigenvalue errors far below 1e-6; vectors: gaps here are >= 1e-3
    assert_top_k_matches(got.eig, Q, k, rtol=1e-6)


def fast_and_slow_matrices(d: int = 96) -> torch.Tensor:
    """3 matrices with a well-separated top (eigenvalues 0.5^i), then 3 with a 1e-3-clustered,
    mixed-sign top (:func:`spectrum_matrices`)."""
    g = torch.Generator().manual_seed(4)
    E = torch.linalg.qr(torch.randn(3, d, d, dtype=torch.float64, generator=g)).Q
    separated = (E * (0.5 ** torch.arange(d, dtype=torch.float64))[None, None, :]) @ E.mT
    return torch.cat([separated, spectrum_matrices(3, d, seed=5)])


def count_krylov_batches(monkeypatch) -> list[int]:
    """The batch size of every Krylov round from now on (the list fills as the solver runs)."""
    batches: list[int] = []
    ritz = batched_eigen._krylov_ritz
    monkeypatch.setattr(batched_eigen, "_krylov_ritz", lambda Qa, *a: batches.append(Qa.shape[0]) or ritz(Qa, *a))
    return batches


def test_batched_krylov_restarts_and_drops_converged_matrices(monkeypatch) -> None:
    # A batch mixing fast (well-separated top) and slow (1e-3-clustered, mixed-sign top)
    # matrices: the fast ones leave the batch early, the rest restart from their Ritz block.
    k = 6
    Q = fast_and_slow_matrices()[torch.tensor([0, 3, 1, 4, 2, 5])]
    batches = count_krylov_batches(monkeypatch)
    got = batched_top_eigenpairs(Q, k, block_size=8, steps=3, tol=1e-10, generator=torch.Generator().manual_seed(0), adaptive_exact=False)
    assert got.exact_rows == 0 and batches[0] == 6 and len(batches) > 2 and min(batches) < 6
    # residual 1e-10 of max|lambda| bounds eigenvalue errors far below 1e-6; vectors: gaps here are >= 1e-3
    assert_top_k_matches(got.eig, Q, k, rtol=1e-6)


def test_slow_matrices_leave_krylov_for_eigh_once_it_is_predicted_cheaper(monkeypatch) -> None:
    # Same mix as above: the clustered tops converge slowly, so after two restarts their
    # predicted remaining restarts cost more than one eigh and they go to the exact eigh
    # long before max_restarts; the separated ones still converge by Krylov.
    k = 6
    Q = fast_and_slow_matrices()
    batches = count_krylov_batches(monkeypatch)
    got = batched_top_eigenpairs(Q, k, block_size=8, steps=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert got.exact_rows == 3 and len(batches) <= 4, (got.exact_rows, batches)
    assert_top_k_matches(got.eig, Q, k, rtol=1e-6)
    # the prediction: a residual shrinking 10x per restart from 1e-3 needs 7 restarts to 1e-10
    residual, previous = torch.tensor([1e-3, 1e-3]), torch.tensor([1e-2, 1e-2])
    assert batched_eigen._exact_is_cheaper(residual, previous, 1e-10, restart_cost=1 / 8).tolist() == [False, False]
    assert batched_eigen._exact_is_cheaper(residual, previous, 1e-10, restart_cost=1 / 6).tolist() == [True, True]
    assert not batched_eigen._exact_is_cheaper(residual, None, 1e-10, restart_cost=1.0).any()  # no rate yet


def test_batched_krylov_falls_back_to_exact_and_says_so() -> None:
    Q = spectrum_matrices(3, 96, seed=3)
    got = batched_top_eigenpairs(Q, 4, block_size=4, steps=1, tol=1e-12, max_restarts=1, generator=torch.Generator().manual_seed(0))
    assert got.exact_rows == 3  # one short restart cannot reach 1e-12 on a 1e-3-clustered top
    assert_top_k_matches(got.eig, Q, 4, rtol=1e-10)


def test_route_choice_by_flops_and_memory() -> None:
    w = random_weights(16, 64, dtype=torch.float32)
    # dense B wins above d_out d_mlp / (d_mlp - d_out) = 16 * 64 / 48 ~ 21 directions
    assert choose_route(w, 20) == "factored" and choose_route(w, 22) == "dense_b"
    assert choose_route(w, 10_000, memory_bytes=16**3 * 4 - 1) == "factored"  # B does not fit


@pytest.mark.parametrize("route", ["dense_b", "factored"])
def test_atlas_matches_dense_eigh_per_direction(tmp_path, route: str) -> None:
    w0, w1 = random_weights(seed=0), random_weights(seed=1)
    U = torch.randn(11, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    atlas = build_atlas({0: w0, 1: w1}, U, tmp_path / "a", k=5, shard_size=4, route=route,
                        dtype=torch.float64, tol=1e-10, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["index.json"] + [
        f"layer{l:02d}-{s:07d}" for l in (0, 1) for s in (0, 4, 8)]
    for layer, w in ((0, w0), (1, w1)):
        Q = interaction_matrices(w, U)
        full = eigendecompose(Q)
        for row in range(11):
            entry = atlas.entry(layer, row=row)
            ref = full.top(5)
            torch.testing.assert_close(entry.eig.eigenvalues, ref.eigenvalues[row])
            torch.testing.assert_close(entry.eig.eigenvectors, ref.eigenvectors[row])  # same signs too
            norm = torch.linalg.matrix_norm(Q[row])
            assert entry.frobenius_norm == pytest.approx(float(norm), rel=1e-12)
            assert entry.captured_energy == pytest.approx(float((ref.eigenvalues[row] ** 2).sum() / norm**2), rel=1e-10)
    assert len(atlas._cache) <= atlas.cache_shards


@pytest.mark.parametrize("route", ["dense_b", "factored"])
def test_atlas_with_biases_over_several_tiles(tmp_path, route: str) -> None:
    # d 100 + the bias row = 101 inputs: four packed tiles (32, 32, 32, 5) and a basis large
    # enough for the Krylov path (block 12, 8 * 12 < 101), against dense eigh of the
    # augmented Q(u) from the factors.
    d, d_mlp, k = 100, 150, 4
    g = torch.Generator().manual_seed(7)
    mats = [torch.randn(*s, generator=g, dtype=torch.float64) / s[0] ** 0.5 for s in ((d, d_mlp), (d, d_mlp), (d_mlp, d))]
    w = BilinearWeights(*mats, *(torch.randn(n, generator=g, dtype=torch.float64) for n in (d_mlp, d_mlp, d)))
    U = torch.randn(6, d, dtype=torch.float64, generator=g)
    atlas = build_atlas({0: w}, U, tmp_path / "a", k=k, route=route, include_bias=True, dtype=torch.float64, tol=1e-10, progress=False)
    Q = interaction_matrices(w, U, include_bias=True)
    got = atlas.layer_tensors(0, "eigenvalues"), atlas.layer_tensors(0, "eigenvectors")
    assert got[1].shape == (6, d + 1, k)
    # residual 1e-10 of max|lambda|: eigenvalues to ~1e-10, vectors to ~1e-10 / gap (gaps >> 1e-4 here)
    assert_top_k_matches(type(eigendecompose(Q[:1]))(*got), Q, k, rtol=1e-6)


def test_loader_reads_only_the_shard_it_needs(tmp_path) -> None:
    model = build_model(tiny_config())
    model_atlas(model, tmp_path / "a", tokens=[5, 7, 60, 96], layers=[1], k=3, shard_size=2, progress=False)
    atlas = EigenAtlas(tmp_path / "a")
    assert atlas.labels == [5, 7, 60, 96] and atlas.layers == [1]
    eig = atlas.top_eigenvectors(1, token=60)
    assert len(atlas._cache) == 1 and eig.eigenvectors.shape == (32, 3)
    with pytest.raises(KeyError, match="token 8 is not in atlas"):
        atlas.entry(1, token=8)
    with pytest.raises(KeyError, match=r"layer 0 is not in atlas .* \(layers \[1\]\)"):
        atlas.entry(0, token=5)


def test_resume_after_a_kill_keeps_finished_shards(tmp_path, monkeypatch) -> None:
    w = random_weights()
    U = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kwargs = dict(k=3, shard_size=3, dtype=torch.float64, progress=False)
    reference = build_atlas({0: w}, U, tmp_path / "ref", **kwargs)

    written = []
    real_write = atlas_module.write_shard

    def killed_after_two(root, spec, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        real_write(root, spec, *args)
        written.append(spec.name)

    monkeypatch.setattr(atlas_module, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_atlas({0: w}, U, tmp_path / "a", **kwargs)
    monkeypatch.setattr(atlas_module, "write_shard", real_write)
    finished = {name: (tmp_path / "a" / name / SHARD_TENSORS).stat().st_mtime_ns for name in written}
    with pytest.raises(AtlasError, match=r"exists; resume it with resume=True or use a new out directory$"):
        build_atlas({0: w}, U, tmp_path / "a", **kwargs)
    atlas = build_atlas({0: w}, U, tmp_path / "a", resume=True, **kwargs)
    assert {name: (tmp_path / "a" / name / SHARD_TENSORS).stat().st_mtime_ns for name in written} == finished
    for name in ("eigenvalues", "eigenvectors", "frobenius_norm", "captured_energy"):
        torch.testing.assert_close(atlas.layer_tensors(0, name), reference.layer_tensors(0, name), rtol=0, atol=0)


def test_foreign_and_damaged_atlas_dirs_are_refused(tmp_path) -> None:
    U = torch.randn(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kwargs = dict(k=2, shard_size=3, dtype=torch.float64, progress=False)
    build_atlas({0: random_weights(seed=0)}, U, tmp_path / "a", **kwargs)
    with pytest.raises(AtlasError, match=r"atlas dir .* was built from other weights or directions \(every recorded setting matches; fingerprint"):
        build_atlas({0: random_weights(seed=1)}, U, tmp_path / "a", resume=True, **kwargs)

    shard = tmp_path / "a" / "layer00-0000003" / SHARD_TENSORS
    shard.write_bytes(shard.read_bytes()[:100])  # truncated after the fact
    with pytest.raises(AtlasError, match="layer00-0000003 is half-written or corrupt"):
        build_atlas({0: random_weights(seed=0)}, U, tmp_path / "a", resume=True, **kwargs)
    with pytest.raises(AtlasError, match="half-written or corrupt"):
        EigenAtlas(tmp_path / "a").entry(0, row=4)
    (tmp_path / "a" / "layer00-0000000" / SHARD_RECORD).unlink()
    with pytest.raises(AtlasError, match="layer00-0000000 is half-written \\(missing"):
        EigenAtlas(tmp_path / "a").entry(0, row=0)


def test_resume_takes_the_shard_size_from_the_index(tmp_path) -> None:
    w = random_weights()
    U = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kwargs = dict(k=3, dtype=torch.float64, progress=False)
    assert EigenAtlas(build_atlas({0: w}, U, tmp_path / "new", **kwargs).path).shard_size == atlas_module.DEFAULT_SHARD_SIZE
    reference = build_atlas({0: w}, U, tmp_path / "a", shard_size=4, **kwargs)
    (tmp_path / "a" / "layer00-0000004" / SHARD_TENSORS).unlink()  # as if killed mid-shard...
    (tmp_path / "a" / "layer00-0000004" / SHARD_RECORD).unlink()
    (tmp_path / "a" / "layer00-0000004").rmdir()  # ...and the half-written shard deleted
    kept = (tmp_path / "a" / "layer00-0000000" / SHARD_TENSORS).stat().st_mtime_ns
    with pytest.raises(AtlasError, match=r"shard_size: 4 \(in .*index.json\) != 512 \(shard_size\)"):
        build_atlas({0: w}, U, tmp_path / "a", resume=True, shard_size=512, **kwargs)
    atlas = build_atlas({0: w}, U, tmp_path / "a", resume=True, **kwargs)  # shard_size=None: the index's 4
    assert atlas.shard_size == 4 and sorted(p.name for p in (tmp_path / "a").iterdir())[1:] == [
        "layer00-0000000", "layer00-0000004", "layer00-0000008"]
    assert (tmp_path / "a" / "layer00-0000000" / SHARD_TENSORS).stat().st_mtime_ns == kept  # finished shards kept
    # the same seed per shard and the same tolerance: bitwise the uninterrupted build
    torch.testing.assert_close(atlas.layer_tensors(0, "eigenvectors"), reference.layer_tensors(0, "eigenvectors"), rtol=0, atol=0)
    assert build_atlas({0: w}, U, tmp_path / "a", resume=True, shard_size=4, **kwargs).shard_size == 4  # the same value is fine
    with pytest.raises(ValueError, match=r"^shard_size must be >= 1, got 0$"):
        build_atlas({0: w}, U, tmp_path / "b", shard_size=0, **kwargs)


def test_resume_with_other_settings_names_each_differing_field(tmp_path) -> None:
    w = random_weights()
    U = torch.randn(10, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    build_atlas({0: w, 1: w}, U, tmp_path / "a", k=3, shard_size=4, dtype=torch.float64, labels=list(range(10, 20)), progress=False)
    index = f"in {tmp_path / 'a' / 'index.json'}"

    def refusal(*args, **kwargs) -> str:
        with pytest.raises(AtlasError) as err:
            build_atlas(*args, **{"progress": False, "resume": True, **kwargs})
        return str(err.value)

    message = refusal({0: w, 1: w}, U, tmp_path / "a", k=5, shard_size=4, dtype=torch.float32, tol=1e-6, labels=list(range(10, 20)))
    assert message.startswith(f"atlas dir {tmp_path / 'a'} was built with other settings: ")
    assert f"k: 3 ({index}) != 5 (k)" in message and f"dtype: float64 ({index}) != float32 (dtype)" in message
    assert f"tol: 0.0001 ({index}) != 1e-06 (tol)" in message
    assert "fingerprint" not in message and "\n" not in message
    for field in ("layers", "shard_size", "labels", "n_dirs", "include_bias"):  # the equal ones are not named
        assert f"{field}:" not in message
    message = refusal({0: w}, U[:6], tmp_path / "a", k=3, dtype=torch.float64, labels=list(range(10, 16)), include_bias=True)
    assert f"layers: [0, 1] ({index}) != [0] (layers)" in message and f"n_dirs: 10 ({index}) != 6 (the directions)" in message
    assert f"include_bias: False ({index}) != True (include_bias)" in message and "d: 24" in message
    message = refusal({0: w, 1: w}, U, tmp_path / "a", k=3, dtype=torch.float64, labels=list(range(10, 19)) + [42])
    assert message.endswith(f"labels: [10, 11, 12, 13, ... (10 in all)] ({index}) != [10, 11, 12, 13, ... (10 in all)] "
                            "(the directions), first difference at position 9; resume with the recorded ones or use a new out directory")
    # nothing recorded differs: then it is the weights or the directions
    message = refusal({0: w, 1: random_weights(seed=3)}, U, tmp_path / "a", k=3, dtype=torch.float64, labels=list(range(10, 20)))
    assert "was built from other weights or directions (every recorded setting matches; fingerprint" in message


def test_cli_resume_without_shard_size_and_with_another_top(checkpoint, tmp_path, capsys) -> None:
    """The audit's case: built with --shard-size 16, resumed without it; then --top 5 on a top-8 atlas."""
    args = ["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--layer", "0", "--out", str(tmp_path / "a"), "--quiet"]
    assert cli.main([*args, "--shard-size", "16"]) == 0
    shard = tmp_path / "a" / "layer00-0000016"
    for f in shard.iterdir():
        f.unlink()
    shard.rmdir()
    capsys.readouterr()
    assert cli.main([*args, "--resume"]) == 0 and shard.is_dir()
    assert EigenAtlas(tmp_path / "a").shard_size == 16
    capsys.readouterr()
    assert cli.main([*args, "--resume", "--top", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"k: 8 (in {tmp_path / 'a' / 'index.json'}) != 5 (--top)" in err, err
    assert cli.main([*args, "--resume", "--shard-size", "8"]) == 2
    assert f"shard_size: 16 (in {tmp_path / 'a' / 'index.json'}) != 8 (--shard-size)" in capsys.readouterr().err
    # --top is taken from the index on resume too: a top-3 atlas resumes without repeating it
    assert cli.main([*args, "--top", "3", "--out", str(tmp_path / "b")]) == 0
    shutil.rmtree(tmp_path / "b" / "layer00-0000000")
    assert cli.main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert EigenAtlas(tmp_path / "b").k == 3 and EigenAtlas(tmp_path / "b").layer_tensors(0, "eigenvalues").shape[1] == 3


def test_bad_arguments(tmp_path) -> None:
    U = torch.randn(4, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^k must be in \[1, 24\] \(d_model\), got 25$"):
        build_atlas({0: random_weights()}, U, tmp_path / "a", k=25, progress=False)
    with pytest.raises(ValueError, match=r"directions must be \[n_dirs, 24\], got shape \(4, 5\)"):
        build_atlas({0: random_weights()}, U[:, :5], tmp_path / "a", progress=False)
    relu = build_model(tiny_config(mlp_kind="relu"))
    with pytest.raises(ValueError, match="layer 0 has a 'relu' MLP"):
        model_atlas(relu, tmp_path / "b", progress=False)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = build_model(tiny_config(d_vocab=40))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_cli_atlas_all_tokens_and_token_list(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "atlas"
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--top", "4", "--out", str(out),
                     "--shard-size", "16", "--quiet", "--device", "cpu"]) == 0
    assert "atlas:" in capsys.readouterr().out
    atlas = EigenAtlas(out)
    assert atlas.layers == [0, 1] and atlas.n_dirs == 40 and atlas.k == 4
    model = build_model(tiny_config(d_vocab=40))
    ref = eigendecompose(interaction_matrices(model.blocks[1].mlp, model.W_U.detach().T[[17]]))
    # float32 compute: top eigenvalues of a d-32 Q to float32 rounding (~1e-6 relative)
    torch.testing.assert_close(atlas.top_eigenvectors(1, token=17).eigenvalues, ref.eigenvalues[0, :4], rtol=1e-5, atol=1e-7)

    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--token-id", "3", "--token-id", "17", "--layer", "1", "--top", "2",
                     "--out", str(tmp_path / "few"), "--quiet"]) == 0
    assert EigenAtlas(tmp_path / "few").labels == [3, 17]


def test_cli_atlas_refuses_a_dtype_it_cannot_eigendecompose_before_writing(checkpoint, tmp_path, capsys) -> None:
    # argparse's choices: exit 2 naming the flag and value, before any file is written
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--out", str(tmp_path / "x"), "--dtype", "float16"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'float16'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top", "33"], r"k \(--top\) must be in \[1, 32\]"),
        (["--device", "tpu"], "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ],
)
def test_cli_atlas_errors_are_one_line(checkpoint, tmp_path, capsys, extra, message) -> None:
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--out", str(tmp_path / "x"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bilinear-lens eigen: error:")
    assert __import__("re").search(message, err), err


def test_cli_atlas_needs_out_and_refuses_another_models_dir(checkpoint, tmp_path, capsys) -> None:
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--all-tokens"]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    other = build_model(tiny_config(d_vocab=40, seed=1))
    model_atlas(other, tmp_path / "a", k=8, progress=False)
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--out", str(tmp_path / "a"), "--resume", "--quiet"]) == 2
    assert "was built from other weights or directions" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has none)")
@pytest.mark.parametrize("d", [24, 160])  # 24: the exact eigh path; 160 >= 8 x block 16: block Krylov
def test_atlas_on_cuda_matches_cpu(tmp_path, d) -> None:
    w = random_weights(d=d, d_mlp=2 * d, dtype=torch.float32)
    U = torch.randn(40, d, generator=torch.Generator().manual_seed(3))
    cpu = build_atlas({0: w}, U, tmp_path / "cpu", k=3, route="dense_b", progress=False)
    gpu = build_atlas({0: w}, U, tmp_path / "gpu", k=3, route="dense_b", device="cuda", progress=False)
    # float32 on both; the atlas' tol 1e-4 bounds each eigenvalue's error by ~1e-4 max|lambda|
    scale = cpu.layer_tensors(0, "eigenvalues").abs().amax(-1, keepdim=True)
    assert ((gpu.layer_tensors(0, "eigenvalues") - cpu.layer_tensors(0, "eigenvalues")).abs() <= 2e-4 * scale).all()


def test_krylov_batch_is_small_on_cpu_and_the_chunk_elsewhere() -> None:
    assert atlas_module.krylov_batch(torch.device("cpu"), 96) == atlas_module.KRYLOV_BATCH == 16
    assert atlas_module.krylov_batch(torch.device("cuda"), 96) == 96  # a device type; no GPU needed


def test_two_process_atlas_matches_one_process(checkpoint, tmp_path) -> None:
    """torchrun, 2 gloo ranks: shards split round-robin, the same atlas as one process."""
    args = ["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--top", "3", "--shard-size", "8", "--quiet", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "bilinear_lens.cli", *args, "--out", str(tmp_path / "two")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("atlas:") == 1  # only rank 0 reports
    one, two = EigenAtlas(tmp_path / "one"), EigenAtlas(tmp_path / "two")
    assert one.index == two.index
    for layer in (0, 1):
        for name in ("eigenvalues", "eigenvectors", "frobenius_norm", "captured_energy"):
            # same seeds per shard; only thread counts differ (float32 rounding)
            torch.testing.assert_close(two.layer_tensors(layer, name), one.layer_tensors(layer, name), rtol=1e-5, atol=1e-6)


def test_model_atlas_takes_any_direction_set(tmp_path):
    """Issue #22 item 3: model_atlas builds an atlas of given directions (e.g. SAE features)
    as build_atlas does, so the CLI no longer assembles feature atlases itself."""
    from bilinear_lens.weights.layer_eigen import bilinear_layer

    model = build_model(tiny_config(n_layers=1))
    directions = torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    ours = model_atlas(model, tmp_path / "a", directions=directions, labels=[7, 1, 4, 2, 9], label_name="feature",
                       k=3, progress=False)
    theirs = build_atlas({0: bilinear_layer(model, 0)}, directions, tmp_path / "b", labels=[7, 1, 4, 2, 9],
                         label_name="feature", k=3, progress=False)
    assert ours.n_dirs == theirs.n_dirs == 5
    for label in (7, 9):
        assert torch.equal(ours.entry(0, token=label).eig.eigenvalues, theirs.entry(0, token=label).eig.eigenvalues)
    with pytest.raises(ValueError, match="give tokens or directions, not both"):
        model_atlas(model, tmp_path / "c", tokens=[1], directions=directions)
