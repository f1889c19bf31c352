"""Image data: scikit-learn's digits offline, IDX files parsed with numpy (a fixture written
here), parquet in the hub's layout, and one-line errors for bad input."""

from __future__ import annotations

import builtins
import io
import struct

import numpy as np
import pytest
import torch

from bilinear_lens.data.images import check_images, load_image_dataset, read_idx, write_idx


def test_digits_load_offline_scaled_and_split_by_seed():
    pytest.importorskip("sklearn")
    data = load_image_dataset("digits", test_fraction=0.25, seed=3)
    assert data.image_shape == (8, 8) and data.n_classes == 10
    assert len(data.train_x) + len(data.test_x) == 1797 and len(data.test_x) == round(0.25 * 1797)
    assert float(data.train_x.min()) == 0.0 and float(data.train_x.max()) == 1.0
    again = load_image_dataset("digits", test_fraction=0.25, seed=3)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.test_y, again.test_y)
    other = load_image_dataset("digits", test_fraction=0.25, seed=4)
    assert not torch.equal(data.test_y, other.test_y)
    # the two splits partition the dataset: together they hold every image exactly once
    both = torch.cat([data.train_x, data.test_x]).double()
    from sklearn.datasets import load_digits
    full = torch.tensor(load_digits().data / 16.0)
    assert torch.equal(both[both.sum(1).argsort()].sum(0), full[full.sum(1).argsort()].sum(0))
    assert len(load_image_dataset("digits", max_train=100).train_x) == 100


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    # the format by hand (LeCun): 0, 0, dtype code, ndim; big-endian uint32 sizes; data
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_idx_parser_reads_a_hand_written_file(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(images, 0x08))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), images)
    floats = np.array([[1.5, -2.0]], dtype=">f4")
    (tmp_path / "b.idx").write_bytes(_idx_bytes(floats, 0x0D))
    assert np.array_equal(read_idx(tmp_path / "b.idx"), floats.astype(np.float32))


def test_idx_round_trip_gzipped(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    path = write_idx(tmp_path / "l.idx1-ubyte.gz", labels)
    assert path.read_bytes()[:2] == b"\x1f\x8b" and np.array_equal(read_idx(path), labels)


def test_malformed_idx_files_are_named(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match=r"bad is not an IDX file \(magic bytes 01020304"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match=r"short: IDX shape \[2, 2\] needs 16 bytes, file has 15"):
        read_idx(tmp_path / "short")


def _write_mnist_idx(directory, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


def test_mnist_from_local_idx_files(tmp_path):
    _write_mnist_idx(tmp_path)
    data = load_image_dataset("mnist", path=tmp_path)
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert data.image_shape == (28, 28) and data.train_x.shape == (6, 784) and data.test_x.shape == (4, 784)
    torch.testing.assert_close(data.train_x, torch.tensor(raw.reshape(6, 784) / 255.0, dtype=torch.float32))
    assert torch.equal(data.train_y, torch.tensor(read_idx(tmp_path / "train-labels-idx1-ubyte"), dtype=torch.int64))
    fashion = load_image_dataset("fashion_mnist", path=tmp_path)
    assert fashion.class_names[9] == "Ankle boot"


def test_mnist_from_parquet_in_the_hub_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        pngs = []
        for img in imgs:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append({"bytes": buf.getvalue(), "path": None})
        labels = rng.integers(0, 10, n)
        pq.write_table(pa.table({"image": pngs, "label": labels}), tmp_path / f"{split}-00000-of-00001.parquet")
        expected[split] = (imgs, labels)
    data = load_image_dataset("mnist", path=tmp_path)
    torch.testing.assert_close(data.test_x, torch.tensor(expected["test"][0].reshape(2, 784) / 255.0, dtype=torch.float32))
    assert data.train_y.tolist() == expected["train"][1].tolist()


def test_unknown_dataset_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError) as err:
        load_image_dataset("cifar10")
    assert str(err.value) == "unknown image dataset 'cifar10'; allowed: ['digits', 'fashion_mnist', 'mnist']"
    with pytest.raises(FileNotFoundError, match="no train split of 'mnist' in"):
        load_image_dataset("mnist", path=tmp_path)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(ImportError) as err:
        load_image_dataset("digits")
    assert str(err.value) == ("dataset 'digits' needs scikit-learn (the images extra): pip install "
                              "'bilinear-lens[images]' (or: pip install scikit-learn)")


def test_wrong_image_size_and_non_finite_pixels_are_named():
    with pytest.raises(ValueError) as err:
        check_images(torch.zeros(2, 63), (8, 8), "my images")
    assert str(err.value) == "my images have shape (2, 63); expected [n, 64] or [n, 8, 8] (image size 8x8)"
    x = torch.zeros(3, 8, 8)
    x[2, 1, 1] = float("nan")
    x[2, 0, 0] = float("inf")
    with pytest.raises(ValueError) as err:
        check_images(x, (8, 8), "my images")
    assert str(err.value) == "my images hold non-finite pixels (2 NaN/inf values in 1 image(s), first: image 2)"
    assert check_images(torch.ones(2, 8, 8, dtype=torch.float64), (8, 8)).shape == (2, 64)


def test_labels_out_of_range_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (2, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.array([0, 12], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mnist train labels must lie in \[0, 10\), got values in \[0, 12\]"):
        load_image_dataset("mnist", path=tmp_path)
