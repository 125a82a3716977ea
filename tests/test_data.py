"""Tests for ldm.data: formats, checksums, downloads, batches. All offline."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import DATASETS, ChecksumError, DatasetUnavailableError, ImageDataset, load_dataset
from ldm.data import cifar, mnist
from ldm.data.dataset import convert_channels, resize_images
from ldm.data.download import Resource, cache_root, fetch

MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode uint8 data as idx, spelled out from the format description."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def bundled() -> ImageDataset:
    return load_dataset("mnist-bundled")


# ---------------------------------------------------------------- bundled MNIST and batches


def test_bundled_mnist_is_the_real_test_set(bundled):
    assert bundled.images.shape == (10_000, 1, 28, 28)
    assert bundled.images.dtype == torch.uint8 and bundled.images.is_contiguous()
    assert bundled.labels.dtype == torch.int64
    assert bundled.labels.bincount().tolist() == MNIST_TEST_CLASS_COUNTS
    assert (bundled.num_classes, bundled.hflip, bundled.image_size, bundled.channels) == (10, False, 28, 1)
    # Digits are white strokes on black: corners empty, full range used.
    assert bundled.images[:, :, 0, 0].max() == 0 and bundled.images.max() == 255


def test_bundled_mnist_is_checked_against_sha256sums(tmp_path, monkeypatch):
    shutil.copytree(mnist.BUNDLED_MNIST_DIR, tmp_path, dirs_exist_ok=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    monkeypatch.setattr(mnist, "BUNDLED_MNIST_DIR", tmp_path)
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist-bundled")


def test_bundled_mnist_resize_and_gray_to_rgb(bundled):
    data = load_dataset("mnist-bundled", image_size=32, channels=3)
    assert data.images.shape == (10_000, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert torch.equal(data.labels, bundled.labels)
    # Bilinear upsampling keeps the average brightness of each digit.
    mean_before = bundled.images[:100].float().mean((1, 2, 3))
    mean_after = data.images[:100, :1].float().mean((1, 2, 3))
    assert torch.allclose(mean_before, mean_after, atol=1.5)


def test_batch_scales_uint8_to_unit_interval():
    images = torch.tensor([0, 255, 51, 204], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    data = ImageDataset(images, torch.arange(4), 4)
    x, y = data.batch(torch.tensor([0, 1, 2, 3, 1]))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 2, 2)
    assert x[:, 0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6, 0.6, 1.0])
    assert y.tolist() == [0, 1, 2, 3, 1]


def test_batch_range_on_mnist(bundled):
    x, _ = bundled.batch(torch.arange(1000))
    assert x.min() == -1.0 and x.max() == 1.0


def test_hflip_mirrors_whole_samples_independently_and_reproducibly():
    n = 400
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    data = ImageDataset(images, None, None, hflip=True)
    plain = images.float() / 127.5 - 1
    x, labels = data.batch(torch.arange(n), torch.Generator().manual_seed(0))
    assert labels is None
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == plain.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all(), "every sample is either untouched or mirrored left-right as a whole"
    assert 140 < mirrored.sum() < 260, "about half are mirrored"
    x_again, _ = data.batch(torch.arange(n), torch.Generator().manual_seed(0))
    assert torch.equal(x, x_again)
    x_other, _ = data.batch(torch.arange(n), torch.Generator().manual_seed(1))
    assert not torch.equal(x, x_other)


def test_no_hflip_means_no_mirroring():
    images = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    x, _ = ImageDataset(images, None, None).batch(torch.arange(50))
    assert torch.equal(x, images.float() / 127.5 - 1)


def test_image_dataset_rejects_bad_tensors():
    with pytest.raises(ValueError, match="square"):
        ImageDataset(torch.zeros(2, 1, 4, 5, dtype=torch.uint8), None, None)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), None, None)
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), 10)


def test_rgb_to_gray_matches_pil_and_resize_keeps_constants():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    ours = convert_channels(torch.from_numpy(rgb).permute(2, 0, 1)[None], 1)[0, 0].numpy().astype(int)
    assert np.abs(ours - pil_gray).max() <= 1
    flat = torch.full((3, 2, 28, 28), 200, dtype=torch.uint8)
    assert (resize_images(flat, 32, chunk=2) == 200).all() and (resize_images(flat, 7) == 200).all()


# ---------------------------------------------------------------- idx files


@pytest.fixture
def idx_split(tmp_path, monkeypatch):
    """Write a 7-image idx split for a dataset name; make its checksum table match."""

    def write(name: str, split: str, compressed: bool) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 7, dtype=np.uint8)
        folder = tmp_path / name
        folder.mkdir()
        prefix = "train" if split == "train" else "t10k"
        table = dict(mnist.IDX_RESOURCES[name])
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            if compressed:
                path = folder / f"{stem}.gz"
                path.write_bytes(gzip.compress(idx_bytes(array)))
                table[path.name] = Resource(path.name, md5(path))
            else:
                (folder / stem).write_bytes(idx_bytes(array))
        monkeypatch.setitem(mnist.IDX_RESOURCES, name, table)
        return images, labels

    return write


@pytest.mark.parametrize("compressed", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(idx_split, tmp_path, name, split, compressed):
    images, labels = idx_split(name, split, compressed)
    data = load_dataset(name, tmp_path, split=split, download=False)
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64
    assert (data.num_classes, data.hflip, data.name) == (10, False, name)


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(ValueError, match=r"truncated.*2352 bytes.*found 2347"):
        mnist.read_idx(path, 3)
    gz = tmp_path / "cut.gz"
    gz.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)))[:-20])
    with pytest.raises(ValueError, match="cut.gz"):
        mnist.read_idx(gz, 3)


def test_wrong_magic_is_a_clear_error(tmp_path):
    labels = tmp_path / "labels"
    labels.write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match=r"labels.*magic number 0x00000801, expected 0x00000803"):
        mnist.read_idx(labels, 3)


def test_unpacked_idx_files_go_through_the_format_checks(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-1])
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: truncated"):
        load_dataset("mnist", tmp_path, split="test", download=False)


def test_present_file_with_wrong_published_md5_names_file_and_hashes(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    bad = folder / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not mnist")
    with pytest.raises(ChecksumError) as error:
        load_dataset("mnist", tmp_path, download=False)
    message = str(error.value)
    assert str(bad) in message and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in message and md5(bad) in message


def test_offline_failure_names_directory_and_every_file(tmp_path):
    with pytest.raises(DatasetUnavailableError) as error:
        load_dataset("fashion-mnist", tmp_path, split="test", download=False)
    message = str(error.value)
    assert str((tmp_path / "fashion-mnist").resolve()) in message
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message


# ---------------------------------------------------------------- downloads


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    assert cache_root() == tmp_path / "env" / "datasets"
    monkeypatch.delenv("LDM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "ldm" / "datasets"


def test_download_tries_mirrors_in_order_and_caches(tmp_path):
    source = tmp_path / "server" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(b"payload" * 1000)
    dead = (tmp_path / "server" / "missing.bin").as_uri()
    resource = Resource("weights.bin", md5(source), (dead, source.as_uri()))
    cache = tmp_path / "cache"

    (path,) = fetch([resource], cache)
    assert path == cache / "weights.bin" and path.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["weights.bin"]

    source.unlink()  # a second call must use the cached copy, not the (now gone) source
    assert fetch([resource], cache) == [path]


def test_failed_checksum_leaves_no_file_and_reports_hashes(tmp_path):
    source = tmp_path / "data.bin"
    source.write_bytes(b"truncated download")
    resource = Resource("data.bin", "0" * 32, (source.as_uri(),))
    cache = tmp_path / "cache"
    with pytest.raises(DatasetUnavailableError) as error:
        fetch([resource], cache)
    message = str(error.value)
    assert "data.bin" in message and "0" * 32 in message and md5(source) in message
    assert list(cache.iterdir()) == [], "no partial or temporary file may remain"


def test_unreachable_mirrors_are_all_reported(tmp_path):
    urls = tuple((tmp_path / f"mirror{i}" / "f.gz").as_uri() for i in range(2))
    with pytest.raises(DatasetUnavailableError) as error:
        fetch([Resource("f.gz", "0" * 32, urls)], tmp_path / "cache")
    message = str(error.value)
    assert all(url in message for url in urls)
    assert str((tmp_path / "cache").resolve()) in message


# ---------------------------------------------------------------- CIFAR-10


def write_cifar_archive(path: Path, counts: dict[str, int], extra: dict[str, bytes] | None = None):
    """A tiny archive with the real member layout; returns the images and labels per member."""
    rng = np.random.default_rng(1)
    written = {}
    with tarfile.open(path, "w:gz") as tar:
        for member, count in counts.items():
            images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, count, dtype=np.uint8)
            # Record: label, then the red plane, green plane, blue plane, each row by row.
            data = b"".join(bytes([lab]) + img[0].tobytes() + img[1].tobytes() + img[2].tobytes()
                            for lab, img in zip(labels, images))
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            written[member] = (images, labels)
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return written


def test_cifar10_binary_layout_and_splits(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    archive = folder / "cifar-10-binary.tar.gz"
    counts = {f"data_batch_{i}.bin": i for i in range(1, 6)} | {"test_batch.bin": 3}
    written = write_cifar_archive(archive, counts, extra={"../escape.txt": b"x"})
    monkeypatch.setattr(cifar, "CIFAR10_RESOURCE", Resource(archive.name, md5(archive)))

    train = load_dataset("cifar10", tmp_path)
    expected = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    assert train.images.shape == (15, 3, 32, 32) and np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)]).tolist()
    assert (train.num_classes, train.hflip, train.channels) == (10, True, 3)

    test = load_dataset("cifar10", tmp_path, split="test")
    assert np.array_equal(test.images.numpy(), written["test_batch.bin"][0])
    # Pixel (c, h, w) of a record sits at byte 1 + c·1024 + h·32 + w.
    record = archive_member_bytes(archive, "cifar-10-batches-bin/test_batch.bin")[: 1 + 3072]
    assert test.labels[0] == record[0]
    assert test.images[0, 2, 5, 7] == record[1 + 2 * 1024 + 5 * 32 + 7]
    assert sorted(p.name for p in folder.iterdir()) == [archive.name], "nothing is extracted to disk"
    assert not (tmp_path / "escape.txt").exists()


def archive_member_bytes(archive: Path, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        return tar.extractfile(name).read()


def test_cifar10_wrong_archive_and_truncated_batch(tmp_path):
    python_version = tmp_path / "python.tar.gz"
    with tarfile.open(python_version, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="binary"):
        cifar.read_cifar10(python_version, "test")

    truncated = tmp_path / "truncated.tar.gz"
    with tarfile.open(truncated, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 3073 + 100
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(ValueError, match="whole number"):
        cifar.read_cifar10(truncated, "test")


# ---------------------------------------------------------------- image folders


def test_image_folder_sorted_cropped_resized(tmp_path):
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    # A wide image: red side bands around a blue center square, which the center crop keeps.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = wide[:, 30:] = (255, 0, 0)
    wide[:, 10:30] = (0, 0, 255)
    Image.fromarray(wide).save(root / "a.png")
    Image.new("RGB", (30, 50), (0, 255, 0)).save(root / "b.JPG", quality=95)
    Image.new("L", (17, 17), 128).save(root / "sub" / "c.webp")
    Image.new("RGB", (8, 8), (255, 255, 255)).save(root / "0.bmp")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / "._hidden.png")

    data = load_dataset(str(root), image_size=16)
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == torch.uint8
    assert (data.labels, data.num_classes, data.hflip) == (None, None, True)
    colors = data.images.float().mean((2, 3)).round().int().tolist()
    assert colors[0] == [255, 255, 255]  # 0.bmp, then a.png, b.JPG, sub/c.webp
    assert colors[1] == [0, 0, 255], "the center crop drops the red side bands"
    assert abs(colors[2][1] - 255) <= 2 and colors[2][0] <= 2
    assert colors[3] == [128, 128, 128]

    gray = load_dataset("folder", root, image_size=8, channels=1)
    assert gray.images.shape == (4, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset(str(tmp_path / "empty"), image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("folder", image_size=8)


def test_unknown_name_lists_known_datasets():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet-9000")
    assert "imagenet-9000" in str(error.value)
    assert all(name in str(error.value) for name in DATASETS)
