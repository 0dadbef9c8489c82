"""Image data sets for training VQ-VAE / DL-VAE models; nothing is ever downloaded.

Every data set yields float32 tensors of shape (C, H, W) with values in [0, 1] (no labels) and has ``channels``,
``image_size`` (H, W) and ``set_epoch(epoch)`` (which changes the random crops of the data sets that draw them).

* :class:`PhotoCrops` -- the default, embedded data set: random crops of the colour photographs bundled with
  scikit-image, all public domain or CC0 (see their docstrings in ``skimage.data``):

  ==================== ============ =========================================================
  photo                size (HxW)   licence
  ==================== ============ =========================================================
  astronaut            512 x 512    public domain (NASA; Eileen Collins)
  chelsea              300 x 451    CC0 (Stefan van der Walt)
  coffee               400 x 600    CC0 (Rachel Michetti)
  rocket               427 x 640    public domain (SpaceX; DSCOVR launch)
  hubble_deep_field    872 x 1000   public domain (NASA; Hubble eXtreme Deep Field)
  retina               1411 x 1411  CC0 (Mikael Haggstrom)
  ==================== ============ =========================================================

  The right-most ``width // 5`` columns of each photo (:func:`split_column`) are the test region, the rest is train,
  so train and test crops never share a pixel.
* :class:`IDXImages` -- an MNIST / Fashion-MNIST IDX image file (raw or gzip).
* :class:`CIFAR10` -- the CIFAR-10 "python version" pickle batches.
* :class:`ImageFolder` -- a folder tree of PNG/JPEG/BMP/WebP images (Oxford Flowers, FFHQ, ...).

:func:`build_dataset` builds any of them by name (:data:`DATASETS`). Files that are missing, malformed or truncated
raise :class:`DataError` (:class:`MissingDataError` when missing) saying what was expected and where to put it.
"""

from __future__ import annotations

import gzip
import importlib.util
import operator
import os
import pickle
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CIFAR10", "DATASETS", "IMAGE_SUFFIXES", "PHOTOS", "Crop", "DataError", "IDXImages", "ImageDataset",
           "ImageFolder", "MissingDataError", "PhotoCrops", "build_dataset", "fashion_mnist_dir", "split_column"]

DATASETS = ("photos", "fashion-mnist", "mnist", "cifar10", "folder")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")

# Photo name in skimage.data -> its file in scikit-image's bundled data folder (shipped in the wheel, never fetched).
_PHOTO_FILES = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
                "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg"}
PHOTOS = tuple(_PHOTO_FILES)

_IDX_IMAGE_MAGIC = 0x00000803  # two zero bytes, data type 0x08 (unsigned byte), 3 dimensions
_CIFAR_ROW = 3 * 32 * 32
# Globals a CIFAR-10 batch may name: numpy array reconstruction (numpy 1.x and 2.x paths) and Python 3's bytes codec.
_CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                  ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class DataError(ValueError):
    """A data file or folder is malformed, truncated or unreadable; the message names it and says what was expected."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder is missing; the message says which files are expected and where to put them."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _non_negative(name: str, value: int) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value}")
    return value


def _to_float(image: Tensor) -> Tensor:
    """uint8 (C, H, W) -> float32 (C, H, W) in [0, 1]."""
    return image.to(torch.float32).div_(255)


class ImageDataset(Dataset[Tensor]):
    """Base class: items are float32 (channels, *image_size) tensors in [0, 1]; ``set_epoch`` does nothing here."""

    channels: int
    image_size: tuple[int, int]

    def set_epoch(self, epoch: int) -> None:
        """Choose the random crops of epoch ``epoch`` (a no-op for data sets without random crops)."""
        _non_negative("epoch", epoch)

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} images")
        return index

    def __len__(self) -> int:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- bundled photographs


def split_column(width: int) -> int:
    """First column of a photo's test region: the right-most ``width // 5`` columns are test, the others train."""
    return width - width // 5


def _largest_crop(photo: Tensor) -> int:
    """The largest square crop that fits a (C, H, W) photo's test region (its train region is wider)."""
    _, height, width = photo.shape
    return min(height, width - split_column(width))


@cache
def _load_photos(gray: bool) -> dict[str, Tensor]:
    """The bundled photos as uint8 (C, H, W) tensors, C = 1 if ``gray`` else 3; loaded once per process."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise MissingDataError("PhotoCrops uses the photos bundled with scikit-image: pip install scikit-image")
    folder = Path(spec.origin).parent / "data"
    photos = {}
    for name, file in _PHOTO_FILES.items():
        path = folder / file
        if not path.is_file():
            raise MissingDataError(f"scikit-image's bundled photo {path} is missing: reinstall scikit-image")
        try:
            with Image.open(path) as image:
                array = np.array(image.convert("L" if gray else "RGB"))
        except OSError as err:
            raise DataError(f"cannot read scikit-image's bundled photo {path} ({err}): reinstall scikit-image") from err
        photo = torch.from_numpy(array)
        photos[name] = photo[None] if gray else photo.permute(2, 0, 1).contiguous()
    return photos


@dataclass(frozen=True)
class Crop:
    """Where a :class:`PhotoCrops` item comes from: ``photo[:, top:top+size, left:left+size]``, then mirrored
    left-right if ``flip``."""

    photo: str
    top: int
    left: int
    flip: bool


class PhotoCrops(ImageDataset):
    """Random square crops of scikit-image's bundled public-domain / CC0 photos (see the module docstring).

    split="train": item ``i`` is a ``size`` x ``size`` crop from the train region (columns before
    :func:`split_column`) of a photo chosen uniformly, mirrored left-right with probability 1/2, drawn by a generator
    seeded with (seed, epoch, i): the data set is deterministic and resumable, and :meth:`set_epoch` draws new crops.
    With ``persistent_workers=True`` DataLoader workers keep the epoch they started with.
    split="test": the same kind of crops from the test regions, never mirrored, drawn from a fixed generator per item:
    the same images whatever ``seed`` and epoch, so every run is evaluated on the same set.

    Photos whose test region is narrower than ``size`` are left out (``photos`` lists those used). Items are float32
    (3, size, size), or (1, size, size) with ``gray=True`` (ITU-R 601-2 luma, as PIL's "L" mode).
    ``length`` (items per epoch) defaults to 4096 for train and 256 for test.
    """

    def __init__(self, split: str = "train", size: int = 32, *, gray: bool = False, length: int | None = None,
                 seed: int = 0) -> None:
        _check_split(split)
        size = operator.index(size)
        length = (4096 if split == "train" else 256) if length is None else operator.index(length)
        if size < 1 or length < 1:
            raise ValueError(f"size and length must be positive, got size={size}, length={length}")
        self.split, self.size, self.length, self.gray = split, size, length, gray
        self.seed, self.epoch = _non_negative("seed", seed), 0
        self.channels, self.image_size = (1 if gray else 3), (size, size)
        self._images = _load_photos(gray)
        self.photos = tuple(name for name, photo in self._images.items() if _largest_crop(photo) >= size)
        if not self.photos:
            largest = max(_largest_crop(photo) for photo in self._images.values())
            raise ValueError(f"size {size} does not fit any photo's test region (the largest crop is {largest})")

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw the train crops of epoch ``epoch`` (test crops do not depend on it)."""
        self.epoch = _non_negative("epoch", epoch)

    def crop(self, index: int) -> Crop:
        """Where item ``index`` comes from in the current epoch."""
        index = self._check_index(index)
        train = self.split == "train"
        rng = np.random.default_rng([self.seed, self.epoch, index] if train else [index])
        name = self.photos[rng.integers(len(self.photos))]
        _, height, width = self._images[name].shape
        split = split_column(width)
        top = int(rng.integers(height - self.size + 1))
        if train:
            return Crop(name, top, int(rng.integers(split - self.size + 1)), bool(rng.integers(2)))
        return Crop(name, top, int(rng.integers(split, width - self.size + 1)), False)

    def __getitem__(self, index: int) -> Tensor:
        """float32 (channels, size, size) in [0, 1]."""
        c = self.crop(index)
        image = self._images[c.photo][:, c.top:c.top + self.size, c.left:c.left + self.size]
        return _to_float(image.flip(-1) if c.flip else image)


# ------------------------------------------------------------------------------------------------ MNIST-style IDX


class IDXImages(ImageDataset):
    """An IDX image file (MNIST, Fashion-MNIST): magic 0x00000803 (unsigned bytes, 3 dimensions N x H x W), raw or
    gzip-compressed (detected by its magic bytes). Items are float32 (1, H, W) in [0, 1], (1, 28, 28) for MNIST."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingDataError(f"no IDX image file at {self.path}")
        raw = self.path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(f"{self.path}: corrupt or truncated gzip file ({err})") from err
        if len(raw) < 16:
            raise DataError(f"{self.path}: truncated IDX file: {len(raw)} bytes, shorter than the 16-byte header of "
                            f"an image file (magic 0x{_IDX_IMAGE_MAGIC:08X}, then 3 big-endian uint32 sizes)")
        magic = int.from_bytes(raw[:4], "big")
        if raw[:2] != b"\0\0":
            raise DataError(f"{self.path}: not an IDX file: magic 0x{magic:08X}, expected 0x{_IDX_IMAGE_MAGIC:08X}")
        if raw[2] != 0x08:
            raise DataError(f"{self.path}: IDX data type 0x{raw[2]:02X}, expected 0x08 (unsigned byte) for images")
        if raw[3] != 3:
            raise DataError(f"{self.path}: IDX file with {raw[3]} dimension(s) (magic 0x{magic:08X}); an image file "
                            f"has 3 (magic 0x{_IDX_IMAGE_MAGIC:08X}) -- a label file has 1")
        n, height, width = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
        expected, actual = n * height * width, len(raw) - 16
        if expected != actual:
            kind = "truncated IDX file" if actual < expected else "IDX file longer than its header says"
            raise DataError(f"{self.path}: {kind}: the header says {n} x {height} x {width} images = {expected} "
                            f"data bytes, the file has {actual}")
        if expected == 0:
            raise DataError(f"{self.path}: IDX file holds no pixels ({n} x {height} x {width} images)")
        data = np.frombuffer(raw, np.uint8, offset=16).reshape(n, 1, height, width)
        self.images = torch.from_numpy(data.copy())
        self.channels, self.image_size = 1, (height, width)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        """float32 (1, H, W) in [0, 1]."""
        return _to_float(self.images[self._check_index(index)])


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST's IDX files are looked for: ``$LASERS_FASHION_MNIST``, else
    /usr/share/datasets/fashion-mnist (where ``apt-get install dataset-fashion-mnist`` puts them)."""
    return Path(os.environ.get("LASERS_FASHION_MNIST") or FASHION_MNIST_DEFAULT)


def _idx_file(folder: Path, split: str, what: str) -> Path:
    """``{train,t10k}-images-idx3-ubyte[.gz]`` in ``folder``, or MissingDataError explaining where to put it."""
    stem = f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    hint = (" (apt-get install dataset-fashion-mnist installs them in /usr/share/datasets/fashion-mnist; "
            "or set LASERS_FASHION_MNIST or pass --data-root)") if what == "Fashion-MNIST" else ""
    raise MissingDataError(f"no {what} {split} images in {folder}: expected {stem}.gz or {stem}. "
                           f"Put the {what} IDX files (train-images-idx3-ubyte.gz, t10k-images-idx3-ubyte.gz) "
                           f"in {folder}{hint}")


# ------------------------------------------------------------------------------------------------------- CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts and strings only: any other global is refused, so no code can run."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 batch -> uint8 (N, 3, 32, 32)."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a malformed pickle can raise nearly anything; all mean "not a CIFAR batch"
        raise DataError(f"{path}: not a readable CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a pickled dict with keys b'data' and b'labels' (CIFAR-10 python version)")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _CIFAR_ROW):
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is {described}; expected uint8 (N, {_CIFAR_ROW}) (N = 10000 in CIFAR-10)")
    if len(labels) != data.shape[0]:
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32)


class CIFAR10(ImageDataset):
    """CIFAR-10's "python version": ``data_batch_1`` .. ``data_batch_5`` (train, 50000 images) or ``test_batch``
    (test, 10000 images) in ``root`` or ``root/cifar-10-batches-py``. Items are float32 (3, 32, 32) in [0, 1], or
    (1, 32, 32) with ``gray=True`` (ITU-R 601-2 luma, as PIL's "L" mode).

    The batches are Python pickles, as the CIFAR format requires; they are read with an unpickler that accepts only
    numpy arrays and plain containers, so a tampered file fails with DataError instead of running code.
    """

    def __init__(self, root: str | os.PathLike[str], split: str = "train", *, gray: bool = False) -> None:
        _check_split(split)
        root = Path(root)
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise MissingDataError(f"CIFAR-10 {split} batch(es) {', '.join(missing)} not found in {folder}: unpack "
                                   f"cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) in {root}")
        data = np.concatenate([_read_cifar_batch(folder / name) for name in names])
        if gray:
            from PIL import Image

            n = data.shape[0]
            rows = np.ascontiguousarray(data.transpose(0, 2, 3, 1)).reshape(n * 32, 32, 3)
            data = np.array(Image.fromarray(rows).convert("L")).reshape(n, 1, 32, 32)
        self.images = torch.from_numpy(np.ascontiguousarray(data))
        self.channels, self.image_size = self.images.shape[1], (32, 32)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        """float32 (channels, 32, 32) in [0, 1]."""
        return _to_float(self.images[self._check_index(index)])


# --------------------------------------------------------------------------------------------------- image folders


class ImageFolder(ImageDataset):
    """Every image (:data:`IMAGE_SUFFIXES`, any case) under ``root``, recursively, hidden files and folders skipped.

    Split: in the file list sorted by relative path, ``max(1, round(n * test_fraction))`` evenly spaced files are
    test (the middle file of each of that many equal runs), the others train; ``test_fraction=0`` puts all in train.
    Each image is resized (bicubic, antialiased) so its shorter side is ``size``; train items are then a random
    ``size`` x ``size`` crop, mirrored left-right with probability 1/2, from a generator seeded with
    (seed, epoch, index) (see :meth:`set_epoch`); test items are the center crop. Items are float32
    (3, size, size), or (1, size, size) with ``gray=True`` (PIL's "L" mode). Images are read when indexed: an
    unreadable one raises DataError naming the file then.
    """

    def __init__(self, root: str | os.PathLike[str], size: int = 256, *, split: str = "train",
                 test_fraction: float = 0.1, gray: bool = False, seed: int = 0) -> None:
        _check_split(split)
        size = operator.index(size)
        if size < 1 or not 0 <= test_fraction < 1:
            raise ValueError(f"need size >= 1 and 0 <= test_fraction < 1, got size={size}, "
                             f"test_fraction={test_fraction}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingDataError(f"no image folder at {self.root}: put the images ({', '.join(IMAGE_SUFFIXES)}) "
                                   f"in it, in any subfolders")
        relative = sorted(path.relative_to(self.root).as_posix() for path in self.root.rglob("*")
                          if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        relative = [r for r in relative if not any(part.startswith(".") for part in r.split("/"))]
        if not relative:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root} or its subfolders")
        n = len(relative)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        test = {(2 * j + 1) * n // (2 * n_test) for j in range(n_test)}
        self.files = [self.root / r for i, r in enumerate(relative) if (i in test) == (split == "test")]
        if not self.files:
            raise DataError(f"the {split} split of {self.root} is empty: {n} image(s), test_fraction={test_fraction}")
        self.split, self.size, self.gray = split, size, gray
        self.seed, self.epoch = _non_negative("seed", seed), 0
        self.channels, self.image_size = (1 if gray else 3), (size, size)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Draw the train crops of epoch ``epoch`` (test crops do not depend on it)."""
        self.epoch = _non_negative("epoch", epoch)

    def _load(self, path: Path) -> np.ndarray:
        """The image resized so that its shorter side is ``size``: uint8 (H, W, 3), or (H, W) if gray."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.gray else "RGB")
                scale = self.size / min(image.size)
                if scale != 1:
                    new = tuple(max(self.size, round(side * scale)) for side in image.size)
                    image = image.resize(new, Image.Resampling.BICUBIC)
                return np.asarray(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot read image {path}: {err}") from err

    def __getitem__(self, index: int) -> Tensor:
        """float32 (channels, size, size) in [0, 1]."""
        index = self._check_index(index)
        array = self._load(self.files[index])
        height, width = array.shape[:2]
        flip = False
        if self.split == "train":
            rng = np.random.default_rng([self.seed, self.epoch, index])
            top, left = int(rng.integers(height - self.size + 1)), int(rng.integers(width - self.size + 1))
            flip = bool(rng.integers(2))
        else:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        image = torch.from_numpy(array[top:top + self.size, left:left + self.size].copy())
        image = image[None] if self.gray else image.permute(2, 0, 1)
        return _to_float(image.flip(-1) if flip else image)


# --------------------------------------------------------------------------------------------------------- by name


def _need_root(root: str | os.PathLike[str] | None, name: str, expected: str) -> Path:
    if root is None:
        raise MissingDataError(f"the {name!r} data set needs a data folder: pass --data-root (root=) with {expected}")
    return Path(root).expanduser()


def build_dataset(name: str, split: str, *, root: str | os.PathLike[str] | None = None, size: int | None = None,
                  gray: bool = False, length: int | None = None, seed: int = 0) -> ImageDataset:
    """The data set ``name`` (one of :data:`DATASETS`), split "train" or "test".

    * "photos": :class:`PhotoCrops` (``size`` defaults to 32; ``length`` items per epoch); ``root`` is not used.
    * "fashion-mnist": :class:`IDXImages` of ``{train,t10k}-images-idx3-ubyte[.gz]`` in ``root`` or
      :func:`fashion_mnist_dir`; "mnist": the same files in ``root`` (required).
    * "cifar10": :class:`CIFAR10` in ``root`` (required).
    * "folder": :class:`ImageFolder` of ``root`` (required; ``size`` defaults to 256).
    A leading ``~`` in ``root`` is the user's home directory.

    ``gray`` converts colour data sets to 1 channel (MNIST-style ones already have 1); ``seed`` seeds the random
    crops of "photos" and "folder". MNIST-style (28 x 28) and CIFAR-10 (32 x 32) images are not resized: ``size``
    must be None or their size. ``length`` applies to "photos" only.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    _check_split(split)
    if length is not None and name != "photos":
        raise ValueError(f"length applies only to the 'photos' data set, not {name!r}")
    if name == "photos":
        if root is not None:
            raise ValueError("the 'photos' data set is bundled with scikit-image; it takes no data folder (root)")
        return PhotoCrops(split, 32 if size is None else size, gray=gray, length=length, seed=seed)
    if name == "folder":
        folder = _need_root(root, name, "images in it or its subfolders")
        return ImageFolder(folder, 256 if size is None else size, split=split, gray=gray, seed=seed)
    native = 32 if name == "cifar10" else 28
    if size not in (None, native):
        raise ValueError(f"{name!r} images are {native} x {native} and are not resized; got size={size}")
    if name == "cifar10":
        return CIFAR10(_need_root(root, name, "cifar-10-batches-py (data_batch_1..5, test_batch)"), split, gray=gray)
    if name == "fashion-mnist":
        return IDXImages(_idx_file(fashion_mnist_dir() if root is None else Path(root).expanduser(), split,
                                   "Fashion-MNIST"))
    expected = "train-images-idx3-ubyte(.gz) and t10k-images-idx3-ubyte(.gz)"
    return IDXImages(_idx_file(_need_root(root, name, expected), split, "MNIST"))
