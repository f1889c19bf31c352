"""Image-classification data: handwritten digits offline, MNIST / Fashion-MNIST when available.

Datasets (:data:`IMAGE_DATASETS`), every pixel scaled to ``[0, 1]``:

==================  ===========  ===========================================================
name                image size   source
==================  ===========  ===========================================================
``digits``          8 x 8        scikit-learn's bundled copy of the UCI handwritten digits
                                 (1797 images, installs offline: the ``images`` extra);
                                 split into train / test by a seeded permutation
``mnist``           28 x 28      local IDX files (``train-images-idx3-ubyte[.gz]``, ...) or
                                 parquet files (``train*.parquet`` / ``test*.parquet`` with
                                 ``image`` and ``label`` columns, the hub's layout) in
                                 ``path``; without ``path`` the hub's ``ylecun/mnist``
``fashion_mnist``   28 x 28      likewise; hub ``zalando-datasets/fashion_mnist``
==================  ===========  ===========================================================

IDX (LeCun's format): a big-endian header ``0, 0, dtype code, ndim`` then ``ndim`` uint32
sizes, then the data; :func:`read_idx` parses it with numpy.

Bad input gets one line naming it: an unknown dataset name, a missing extra, a wrong image
size, non-finite pixels, labels out of range.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, Path]

HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
IMAGE_DATASETS: dict[str, tuple[int, int]] = {"digits": (8, 8), "mnist": (28, 28), "fashion_mnist": (28, 28)}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
# IDX dtype codes (LeCun et al.): code -> numpy big-endian dtype
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_EXTRA_HINT = "pip install 'bilinear-lens[images]' (or: pip install scikit-learn)"


@dataclass
class ImageData:
    """Train and test images ``[n, height * width]`` (float32 in ``[0, 1]``) with labels
    ``[n]`` (int64 in ``[0, n_classes)``)."""

    name: str
    image_shape: tuple[int, int]
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def d_input(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = check_images(getattr(self, f"{split}_x"), self.image_shape, f"{self.name} {split} images")
            setattr(self, f"{split}_x", x)
            y = check_labels(getattr(self, f"{split}_y"), len(self.class_names), len(x), f"{self.name} {split} labels")
            setattr(self, f"{split}_y", y)


def check_images(x: Any, image_shape: Sequence[int], name: str = "images") -> Tensor:
    """``x`` (``[n, h * w]`` or ``[n, h, w]``, tensor or array) as float32 ``[n, h * w]``;
    a wrong image size or a NaN / inf pixel is a one-line ``ValueError`` naming ``name``."""
    h, w = int(image_shape[0]), int(image_shape[1])
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim == 3 and tuple(t.shape[1:]) == (h, w):
        t = t.reshape(t.shape[0], h * w)
    if t.ndim != 2 or t.shape[1] != h * w:
        raise ValueError(f"{name} have shape {tuple(t.shape)}; expected [n, {h * w}] or [n, {h}, {w}] "
                         f"(image size {h}x{w})")
    t = t.to(torch.float32)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten()
        raise ValueError(f"{name} hold non-finite pixels ({int(bad.sum())} NaN/inf values in {len(rows)} image(s), "
                         f"first: image {int(rows[0])})")
    return t


def check_labels(y: Any, n_classes: int, n: int, name: str = "labels") -> Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} have shape {tuple(t.shape)}; expected [{n}] (one per image)")
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{name} must be integers")
    t = t.to(torch.int64)
    if n and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(f"{name} must lie in [0, {n_classes}), got values in [{int(t.min())}, {int(t.max())}]")
    return t


# ------------------------------------------------------------------------ IDX files


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: PathLike) -> np.ndarray:
    """The array in an IDX file (optionally gzipped); a malformed file is a ``ValueError``
    naming it and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}; expected "
                         "00 00 <dtype code> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated (needs {header} bytes, file has {len(raw)})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX shape {list(shape)} needs {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 / int8 / int16 / int32 / float32 / float64) as an IDX file
    (gzipped when ``path`` ends in ``.gz``): fixtures and conversions."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    if array.dtype not in codes:
        raise ValueError(f"array dtype {array.dtype} has no IDX code; allowed: {sorted(str(d) for d in codes)}")
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(IDX_DTYPES[code]).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _find(directory: Path, stems: Sequence[str]) -> Optional[Path]:
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _idx_split(directory: Path, split: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    prefix = "train" if split == "train" else "t10k"
    images = _find(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    labels = _find(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    if images is None or labels is None:
        return None
    return read_idx(images), read_idx(labels)


def _decode_image(value: Any) -> np.ndarray:
    """A parquet ``image`` cell (``{"bytes": png}``, raw bytes, or an array) as ``[h, w]``."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)):
        from PIL import Image  # a matplotlib dependency

        return np.asarray(Image.open(io.BytesIO(value)).convert("L"))
    return np.asarray(value)


def _parquet_split(directory: Path, split: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    files = sorted(directory.glob(f"{split}*.parquet")) or sorted(directory.glob(f"*/{split}*.parquet"))
    if not files:
        return None
    import pyarrow.parquet as pq  # a datasets dependency

    table = pq.read_table([str(f) for f in files] if len(files) > 1 else str(files[0]))
    missing = [c for c in ("image", "label") if c not in table.column_names]
    if missing:
        raise ValueError(f"parquet {files[0]} has no column(s) {missing}; columns: {table.column_names}")
    images = np.stack([_decode_image(v) for v in table.column("image").to_pylist()])
    return images, np.asarray(table.column("label").to_pylist())


def _local_splits(name: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not path.is_dir():
        raise FileNotFoundError(f"path={str(path)!r} for dataset {name!r} is not a directory")
    splits = []
    for split in ("train", "test"):
        found = _idx_split(path, split) or _parquet_split(path, split)
        if found is None:
            raise FileNotFoundError(f"no {split} split of {name!r} in {path}: expected IDX files "
                                    f"({'train' if split == 'train' else 't10k'}-images-idx3-ubyte[.gz] and -labels-idx1-ubyte[.gz]) "
                                    f"or {split}*.parquet with image and label columns")
        splits.append(found)
    (train_x, train_y), (test_x, test_y) = splits
    return train_x, train_y, test_x, test_y


def _hub_splits(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from datasets import load_dataset

    ds = load_dataset(HUB_DATASETS[name])
    out = []
    for split in ("train", "test"):
        out.append(np.stack([np.asarray(img.convert("L")) for img in ds[split]["image"]]))
        out.append(np.asarray(ds[split]["label"]))
    return out[0], out[1], out[2], out[3]


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(f"dataset 'digits' needs scikit-learn (the images extra): {IMAGES_EXTRA_HINT}") from None
    digits = load_digits()
    return digits.data / 16.0, digits.target


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_image_dataset(
    name: str, path: Optional[PathLike] = None, test_fraction: float = 0.2, seed: int = 0, max_train: int = 0,
) -> ImageData:
    """Load dataset ``name`` (:data:`IMAGE_DATASETS`). ``digits`` is split by a permutation of
    ``seed`` with ``test_fraction`` of the images held out; MNIST-style datasets keep their
    own test split, read from ``path`` (IDX or parquet files) or else from the hub.
    ``max_train`` (0: all) keeps the first ``max_train`` training images (a small training
    set: the overfitting experiment)."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; allowed: {sorted(IMAGE_DATASETS)}")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(max_train, bool) or not isinstance(max_train, int) or max_train < 0:
        raise ValueError(f"max_train must be a non-negative integer (0: all), got {max_train!r}")
    shape = IMAGE_DATASETS[name]
    if name == "digits":
        if path is not None:
            raise ValueError(f"path={str(path)!r}: dataset 'digits' ships with scikit-learn and reads no files")
        x, y = _digits_arrays()
        train_x, train_y, test_x, test_y = _split(x, y, test_fraction, seed)
        scale = 1.0
    else:
        train_x, train_y, test_x, test_y = _local_splits(name, Path(path)) if path is not None else _hub_splits(name)
        scale = 255.0 if np.asarray(train_x).dtype == np.uint8 else 1.0
    if max_train:
        train_x, train_y = train_x[:max_train], train_y[:max_train]
    classes = FASHION_CLASSES if name == "fashion_mnist" else tuple(str(i) for i in range(10))
    where = f"{name}" + (f" ({path})" if path is not None else "")
    return ImageData(
        name=name, image_shape=shape, class_names=classes,
        train_x=check_images(np.asarray(train_x, dtype=np.float64) / scale, shape, f"{where} train images"),
        train_y=torch.as_tensor(np.asarray(train_y)), test_x=check_images(np.asarray(test_x, dtype=np.float64) / scale,
                                                                            shape, f"{where} test images"),
        test_y=torch.as_tensor(np.asarray(test_y)),
    )


__all__ = ["IMAGE_DATASETS", "ImageData", "check_images", "load_image_dataset", "read_idx", "write_idx"]
