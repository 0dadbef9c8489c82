"""Data readers: values against the bytes the tests write (tiny IDX, CIFAR and PNG files with random content), the
bundled photos against scikit-image's own loader, split geometry, determinism, and every malformed-input error."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from lasers_ext.training.data import (
    CIFAR10,
    DATASETS,
    PHOTOS,
    DataError,
    IDXImages,
    ImageFolder,
    MissingDataError,
    PhotoCrops,
    build_dataset,
    fashion_mnist_dir,
    split_column,
)


def random_bytes(gen, *shape):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()


def as_float(array):
    return torch.from_numpy(np.ascontiguousarray(array)).float() / 255


def luma(rgb):
    """ITU-R 601-2 luma of float (3, H, W) -> (1, H, W): the oracle for gray=True (PIL rounds to uint8)."""
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]


def check_image(x, channels, height, width):
    assert x.shape == (channels, height, width) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


# ------------------------------------------------------------------------------------------------------ PhotoCrops


@pytest.fixture(scope="module")
def photos():
    """The bundled photos as scikit-image itself loads them: uint8 (H, W, 3) arrays."""
    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def test_split_column_holds_out_the_right_fifth():
    assert [split_column(w) for w in (10, 451, 512, 1000)] == [8, 361, 410, 800]


@pytest.mark.parametrize("split", ["train", "test"])
def test_photo_crops_match_the_photos_and_stay_in_their_region(photos, split):
    data = PhotoCrops(split, 24, length=200, seed=3)
    assert len(data) == 200 and data.channels == 3 and data.image_size == (24, 24)
    used, flips = set(), set()
    for i in range(len(data)):
        c = data.crop(i)
        height, width, _ = photos[c.photo].shape
        if split == "train":
            assert 0 <= c.left and c.left + 24 <= split_column(width)
        else:
            assert split_column(width) <= c.left and c.left + 24 <= width and not c.flip
        assert 0 <= c.top and c.top + 24 <= height
        expected = as_float(photos[c.photo][c.top:c.top + 24, c.left:c.left + 24].transpose(2, 0, 1))
        x = data[i]
        check_image(x, 3, 24, 24)
        assert torch.equal(x, expected.flip(-1) if c.flip else expected)
        used.add(c.photo)
        flips.add(c.flip)
    assert used == set(PHOTOS)
    assert flips == ({False, True} if split == "train" else {False})


def test_photo_crops_gray(photos):
    data = PhotoCrops("train", 16, gray=True, length=20)
    assert data.channels == 1
    for i in range(len(data)):
        c = data.crop(i)
        rgb = as_float(photos[c.photo][c.top:c.top + 16, c.left:c.left + 16].transpose(2, 0, 1))
        x = data[i]
        check_image(x, 1, 16, 16)
        torch.testing.assert_close(x, luma(rgb.flip(-1) if c.flip else rgb), atol=0.6 / 255, rtol=0)


def test_photo_crops_are_deterministic_per_seed_epoch_and_index():
    a, b = PhotoCrops(length=64, seed=5), PhotoCrops(length=64, seed=5)
    assert all(torch.equal(a[i], b[i]) for i in range(64))
    epoch0 = [a.crop(i) for i in range(64)]
    a.set_epoch(1)
    assert sum(a.crop(i) != epoch0[i] for i in range(64)) > 60
    a.set_epoch(0)
    assert [a.crop(i) for i in range(64)] == epoch0
    assert sum(PhotoCrops(length=64, seed=6).crop(i) != epoch0[i] for i in range(64)) > 60


def test_photo_test_crops_do_not_depend_on_seed_or_epoch():
    a, b = PhotoCrops("test"), PhotoCrops("test", seed=9)
    assert len(a) == 256
    b.set_epoch(4)
    assert [a.crop(i) for i in range(len(a))] == [b.crop(i) for i in range(len(b))]
    assert len({a.crop(i) for i in range(len(a))}) > 250


def test_photo_crop_size_limits():
    assert PhotoCrops(size=128, length=4).photos == ("rocket", "hubble_deep_field", "retina")
    with pytest.raises(ValueError, match="does not fit"):
        PhotoCrops(size=300)
    with pytest.raises(ValueError, match="positive"):
        PhotoCrops(size=0)
    with pytest.raises(IndexError):
        PhotoCrops(length=3)[3]
    with pytest.raises(ValueError, match="epoch"):
        PhotoCrops().set_epoch(-1)


def test_photo_crops_batch_in_a_dataloader():
    batch = next(iter(torch.utils.data.DataLoader(PhotoCrops(length=16), batch_size=8)))
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------------- IDX


def idx_bytes(images, magic=0x00000803):
    return struct.pack(">I", magic) + struct.pack(">3I", *images.shape) + images.tobytes()


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_images_match_the_bytes(gen, tmp_path, compress):
    images = random_bytes(gen, 5, 28, 28)
    raw = idx_bytes(images)
    path = tmp_path / ("images.gz" if compress else "images")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    data = IDXImages(path)
    assert len(data) == 5 and data.channels == 1 and data.image_size == (28, 28)
    for i in range(5):
        check_image(data[i], 1, 28, 28)
        assert torch.equal(data[i], as_float(images[i][None]))
    assert len(list(data)) == 5
    data.set_epoch(3)  # no random crops: a no-op


def test_idx_non_square(gen, tmp_path):
    images = random_bytes(gen, 2, 3, 7)
    (tmp_path / "x").write_bytes(idx_bytes(images))
    data = IDXImages(tmp_path / "x")
    assert data.image_size == (3, 7) and torch.equal(data[1], as_float(images[1][None]))


@pytest.mark.parametrize(("magic", "message"), [
    (0x01000803, "not an IDX file: magic 0x01000803"),
    (0x00000D03, "data type 0x0D"),
    (0x00000801, "1 dimension"),
    (0x00000804, "4 dimension"),
])
def test_idx_bad_header(gen, tmp_path, magic, message):
    path = tmp_path / "bad"
    path.write_bytes(idx_bytes(random_bytes(gen, 2, 4, 4), magic))
    with pytest.raises(DataError, match=message) as err:
        IDXImages(path)
    assert str(path) in str(err.value)


def test_idx_truncated_or_too_long(gen, tmp_path):
    raw = idx_bytes(random_bytes(gen, 3, 4, 4))
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"truncated IDX file: the header says 3 x 4 x 4 images = 48 data bytes, "
                                        r"the file has 43") as err:
        IDXImages(path)
    assert str(path) in str(err.value)
    path.write_bytes(raw + b"\0")
    with pytest.raises(DataError, match="longer than its header says.* 48 data bytes, the file has 49"):
        IDXImages(path)
    path.write_bytes(raw[:10])
    with pytest.raises(DataError, match="10 bytes, shorter than the 16-byte header"):
        IDXImages(path)
    path.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        IDXImages(path)
    path.write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    with pytest.raises(DataError, match="no pixels"):
        IDXImages(path)


def test_idx_missing_file(tmp_path):
    with pytest.raises(MissingDataError, match="no IDX image file at") as err:
        IDXImages(tmp_path / "nothing")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)


@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason=f"no Fashion-MNIST in {fashion_mnist_dir()} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_test_set():
    data = build_dataset("fashion-mnist", "test")
    assert len(data) == 10000 and data.image_size == (28, 28)
    check_image(data[0], 1, 28, 28)
    check_image(data[9999], 1, 28, 28)


# -------------------------------------------------------------------------------------------------------- CIFAR-10


def write_cifar(folder, gen, rows=3):
    """All six batches with ``rows`` random images each; returns {name: uint8 (rows, 3072)}."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = random_bytes(gen, rows, 3072)
        labels = torch.randint(0, 10, (rows,), generator=gen).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": batches[name]}, f, protocol=2)
    return batches


@pytest.mark.parametrize("nested", [True, False], ids=["cifar-10-batches-py", "flat"])
def test_cifar10_matches_the_bytes(gen, tmp_path, nested):
    batches = write_cifar(tmp_path / "cifar-10-batches-py" if nested else tmp_path, gen)
    train, test = CIFAR10(tmp_path), CIFAR10(tmp_path, "test")
    assert (len(train), len(test)) == (15, 3)
    assert train.channels == 3 and train.image_size == (32, 32)
    rows = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    for i in range(15):
        check_image(train[i], 3, 32, 32)
        assert torch.equal(train[i], as_float(rows[i].reshape(3, 32, 32)))
    for i in range(3):
        assert torch.equal(test[i], as_float(batches["test_batch"][i].reshape(3, 32, 32)))
        # pixel (r, c) of channel k is byte 1024 k + 32 r + c
        assert test[i][2, 1, 5] == batches["test_batch"][i][2048 + 32 + 5] / 255
    gray = CIFAR10(tmp_path, "test", gray=True)
    assert gray.channels == 1
    for i in range(3):
        check_image(gray[i], 1, 32, 32)
        torch.testing.assert_close(gray[i], luma(test[i]), atol=0.6 / 255, rtol=0)


def test_cifar10_reads_numpy1_python2_style_pickles(gen, tmp_path):
    data = random_bytes(gen, 2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [0, 1]}, protocol=2)
    (tmp_path / "test_batch").write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    assert torch.equal(CIFAR10(tmp_path, "test")[1], as_float(data[1].reshape(3, 32, 32)))


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_cifar10_bad_batches(gen, tmp_path):
    write_cifar(tmp_path, gen)
    path = tmp_path / "test_batch"

    def expect(content, message):
        path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
        with pytest.raises(DataError, match=message) as err:
            CIFAR10(tmp_path, "test")
        assert str(path) in str(err.value)

    expect(b"not a pickle at all", "not a readable CIFAR-10 python batch")
    expect(pickle.dumps({b"data": random_bytes(gen, 2, 3072), b"labels": [0, 1]})[:-30], "not a readable")
    expect({b"data": Evil(tmp_path / "pwned"), b"labels": [0]}, "is not allowed")
    assert not (tmp_path / "pwned").exists()
    expect([1, 2, 3], "expected a pickled dict with keys b'data' and b'labels'")
    expect({b"data": random_bytes(gen, 2, 3072)}, "expected a pickled dict")
    expect({b"data": random_bytes(gen, 2, 1000), b"labels": [0, 1]}, r"uint8 \(2, 1000\); expected uint8 \(N, 3072\)")
    expect({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "float32")
    expect({b"data": random_bytes(gen, 3072), b"labels": [0]}, r"\(3072,\)")
    expect({b"data": [1, 2], b"labels": [0, 1]}, "b'data' is list")
    expect({b"data": random_bytes(gen, 2, 3072), b"labels": [0]}, "1 labels for 2 images")


def test_cifar10_missing_batches(gen, tmp_path):
    with pytest.raises(MissingDataError, match="data_batch_1, .*data_batch_5 not found.*cifar-10-python.tar.gz"):
        CIFAR10(tmp_path)
    write_cifar(tmp_path, gen)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(MissingDataError, match=r"batch\(es\) data_batch_3 not found"):
        CIFAR10(tmp_path)
    assert len(CIFAR10(tmp_path, "test")) == 3


# ---------------------------------------------------------------------------------------------------- ImageFolder


def write_folder(root, gen, n=10, height=8, width=12):
    """``n`` random RGB PNGs (height x width) spread over subfolders; returns {relative path: uint8 (H, W, 3)}."""
    images = {}
    for i in range(n):
        relative = f"{'ab'[i % 2]}/img{i:02d}.{'PNG' if i % 3 == 0 else 'png'}"
        images[relative] = random_bytes(gen, height, width, 3)
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[relative]).save(root / relative)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(images[relative]).save(root / ".hidden" / "skipped.png")
    return images


def test_image_folder_split_is_fixed_disjoint_and_spread(gen, tmp_path):
    images = write_folder(tmp_path, gen, n=20)
    names = sorted(images)
    train = ImageFolder(tmp_path, 8, test_fraction=0.1)
    test = ImageFolder(tmp_path, 8, split="test", test_fraction=0.1)
    relative = [[p.relative_to(tmp_path).as_posix() for p in d.files] for d in (train, test)]
    assert relative[1] == [names[5], names[15]]  # the middle of each of the two halves
    assert sorted(relative[0] + relative[1]) == names
    assert len(ImageFolder(tmp_path, 8, split="test", test_fraction=0.25).files) == 5
    assert len(ImageFolder(tmp_path, 8, test_fraction=0).files) == 20
    assert len(ImageFolder(tmp_path, 8, split="test", test_fraction=0.01).files) == 1


def test_image_folder_items(gen, tmp_path):
    images = write_folder(tmp_path, gen)
    train, test = ImageFolder(tmp_path, 8, seed=1), ImageFolder(tmp_path, 8, split="test")
    assert train.channels == 3 and train.image_size == (8, 8) and len(train) == 9 and len(test) == 1
    flips = set()
    for i, path in enumerate(train.files):
        original = as_float(images[path.relative_to(tmp_path).as_posix()].transpose(2, 0, 1))
        windows = {(left, flip): original[:, :, left:left + 8].flip(-1) if flip else original[:, :, left:left + 8]
                   for left in range(5) for flip in (False, True)}
        x = train[i]
        check_image(x, 3, 8, 8)
        matches = [key for key, window in windows.items() if torch.equal(x, window)]
        assert len(matches) == 1
        flips.add(matches[0][1])
    assert flips == {False, True}
    original = as_float(images[test.files[0].relative_to(tmp_path).as_posix()].transpose(2, 0, 1))
    assert torch.equal(test[0], original[:, :, 2:10])
    gray = ImageFolder(tmp_path, 8, split="test", gray=True)
    check_image(gray[0], 1, 8, 8)
    torch.testing.assert_close(gray[0], luma(original[:, :, 2:10]), atol=0.6 / 255, rtol=0)


def test_image_folder_resizes_the_shorter_side(gen, tmp_path):
    write_folder(tmp_path, gen, n=4, height=20, width=13)
    for split in ("train", "test"):
        data = ImageFolder(tmp_path, 6, split=split, test_fraction=0.5)
        for i in range(len(data)):
            check_image(data[i], 3, 6, 6)
    Image.fromarray(random_bytes(gen, 30, 40, 3)).save(tmp_path / "photo.jpg")
    upscaled = ImageFolder(tmp_path, 64, test_fraction=0, gray=True)
    assert len(upscaled) == 5
    for i in range(len(upscaled)):
        check_image(upscaled[i], 1, 64, 64)


def test_image_folder_is_deterministic_per_seed_epoch_and_index(gen, tmp_path):
    write_folder(tmp_path, gen, n=12, height=8, width=40)
    a, b = ImageFolder(tmp_path, 8, seed=2), ImageFolder(tmp_path, 8, seed=2)
    epoch0 = [a[i] for i in range(len(a))]
    assert all(torch.equal(epoch0[i], b[i]) for i in range(len(b)))
    a.set_epoch(1)
    assert sum(not torch.equal(a[i], epoch0[i]) for i in range(len(a))) >= len(a) - 2
    a.set_epoch(0)
    assert all(torch.equal(a[i], epoch0[i]) for i in range(len(a)))


def test_image_folder_errors(gen, tmp_path):
    with pytest.raises(MissingDataError, match="no image folder at"):
        ImageFolder(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty")
    Image.fromarray(random_bytes(gen, 8, 8, 3)).save(tmp_path / "empty" / "one.png")
    with pytest.raises(DataError, match="train split .* is empty: 1 image"):
        ImageFolder(tmp_path / "empty", 8)
    with pytest.raises(ValueError, match="test_fraction"):
        ImageFolder(tmp_path / "empty", 8, test_fraction=1.0)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "garbage.png").write_bytes(b"\x89PNG not really")
    png = tmp_path / "ok.png"
    Image.fromarray(random_bytes(gen, 16, 16, 3)).save(png)
    (bad / "truncated.png").write_bytes(png.read_bytes()[:200])
    data = ImageFolder(bad, 8, test_fraction=0)
    for i, path in enumerate(data.files):
        with pytest.raises(DataError, match="cannot read image") as err:
            data[i]
        assert str(path) in str(err.value)


# -------------------------------------------------------------------------------------------------- build_dataset


def test_build_dataset_by_name(gen, tmp_path):
    photos = build_dataset("photos", "test", gray=True, length=8)
    assert isinstance(photos, PhotoCrops) and len(photos) == 8 and photos.image_size == (32, 32)
    assert build_dataset("photos", "train", size=16).image_size == (16, 16)

    images = {s: random_bytes(gen, n, 28, 28) for s, n in (("train", 3), ("t10k", 2))}
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images["train"])))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images["t10k"]))
    for name in ("mnist", "fashion-mnist"):
        train, test = (build_dataset(name, s, root=str(tmp_path), size=28) for s in ("train", "test"))
        assert isinstance(train, IDXImages) and (len(train), len(test)) == (3, 2)
        assert torch.equal(test[1], as_float(images["t10k"][1][None]))

    write_cifar(tmp_path / "c", gen)
    assert isinstance(build_dataset("cifar10", "test", root=tmp_path / "c"), CIFAR10)
    write_folder(tmp_path / "f", gen)
    folder = build_dataset("folder", "train", root=str(tmp_path / "f"), size=8, seed=1)
    assert isinstance(folder, ImageFolder) and len(folder) == 9


def test_fashion_mnist_dir(monkeypatch, gen, tmp_path):
    monkeypatch.delenv("LASERS_FASHION_MNIST", raising=False)
    assert str(fashion_mnist_dir()) == "/usr/share/datasets/fashion-mnist"
    monkeypatch.setenv("LASERS_FASHION_MNIST", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path
    with pytest.raises(MissingDataError, match="t10k-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(random_bytes(gen, 4, 28, 28))))
    assert len(build_dataset("fashion-mnist", "test")) == 4


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'; choose one of " + ", ".join(DATASETS)):
        build_dataset("imagenet", "train")
    for name in DATASETS:
        with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
            build_dataset(name, "val", root=tmp_path)
    with pytest.raises(MissingDataError, match="--data-root .*train-images-idx3-ubyte.*t10k-images-idx3-ubyte"):
        build_dataset("mnist", "train")
    with pytest.raises(MissingDataError, match="no MNIST test images in .*t10k-images-idx3-ubyte.gz"):
        build_dataset("mnist", "test", root=tmp_path)
    for name in ("cifar10", "folder"):
        with pytest.raises(MissingDataError, match="--data-root"):
            build_dataset(name, "train")
    with pytest.raises(ValueError, match="28 x 28 and are not resized"):
        build_dataset("mnist", "train", root=tmp_path, size=32)
    with pytest.raises(ValueError, match="length applies only"):
        build_dataset("cifar10", "train", root=tmp_path, length=10)
    with pytest.raises(ValueError, match="takes no data folder"):
        build_dataset("photos", "train", root=tmp_path)
