"""batchnorm.data: IDX parsing, checksums, finding/downloading files, the MNIST, CIFAR-10 and
image-folder loaders; and the experiments' view of them (:mod:`batchnorm.repro.image_data`:
data set by name, subsets, standardization, batch order).

Real data: BATCHNORM_TEST_FASHION_DIR (default /usr/share/datasets/fashion-mnist, from Debian's
``dataset-fashion-mnist``) and BATCHNORM_TEST_MNIST_DIR (default <repo>/../shared/data/mnist:
MNIST's test set and training labels); tests needing them skip when they are absent.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.data import (
    IdxFormatError,
    MissingDataError,
    RemoteFile,
    data_root,
    fetch,
    load_fashion_mnist,
    load_mnist,
    parse_idx,
    read_idx,
    verify,
)
from batchnorm.data.download import ENV_VAR
from batchnorm.repro.image_data import IndexBatches, load_data

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path(os.environ.get("BATCHNORM_TEST_FASHION_DIR",
                                  "/usr/share/datasets/fashion-mnist"))
MNIST_DIR = Path(os.environ.get("BATCHNORM_TEST_MNIST_DIR", REPO.parent / "shared/data/mnist"))
IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Encode ``array`` as IDX (independently of the parser: header by hand, big-endian)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("dtype, code, shape", [
    ("u1", 0x08, (7, 5, 3)), ("i1", 0x09, (11,)), ("i2", 0x0B, (4, 6)),
    ("i4", 0x0C, (3, 2, 2, 2)), ("f4", 0x0D, (9, 2)), ("f8", 0x0E, (1, 13)),
])
def test_parse_idx_round_trip(dtype, code, shape):
    rng = np.random.default_rng(code)
    if dtype.startswith("f"):
        array = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    parsed = parse_idx(idx_bytes(array, code))
    assert parsed.shape == shape and parsed.dtype == np.dtype(dtype)
    assert parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)
    parsed[...] = 0  # a writable copy, not a view of the bytes


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28)).astype(np.uint8)
    data = idx_bytes(array, 0x08)
    (tmp_path / "plain").write_bytes(data)
    (tmp_path / "packed.gz").write_bytes(gzip.compress(data))
    (tmp_path / "packed_without_suffix").write_bytes(gzip.compress(data))
    for name in ("plain", "packed.gz", "packed_without_suffix"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "two zero bytes"),
    (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "unknown IDX element type 0x07"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"), "truncated header"),
], ids=["short", "magic", "type", "no-dims", "header"])
def test_parse_idx_malformed_header(data, message):
    with pytest.raises(IdxFormatError, match=message):
        parse_idx(data, source="bad.idx")


def test_parse_idx_truncated_and_trailing():
    data = idx_bytes(np.arange(24, dtype=np.int32).reshape(2, 3, 4), 0x0C)
    with pytest.raises(IdxFormatError, match=r"bad.idx: truncated: shape \(2, 3, 4\) of int32 "
                                             r"needs 96 payload bytes, the file has 95"):
        parse_idx(data[:-1], source="bad.idx")
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        parse_idx(data + b"\x00", source="bad.idx")


def test_read_idx_truncated_gzip(tmp_path):
    packed = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8) + 3, 0x08))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(IdxFormatError, match="broken or truncated gzip"):
        read_idx(path)


# ------------------------------------------------------------------------- checksums, fetch


@pytest.fixture
def published(tmp_path):
    """A small "published" gzip file, its spec (with both checksums) and a web folder."""
    content = idx_bytes(np.random.default_rng(1).integers(0, 256, (20, 4, 4)).astype(np.uint8),
                        0x08)
    packed = gzip.compress(content, mtime=0)
    web = tmp_path / "web"
    web.mkdir()
    (web / "data-idx3-ubyte.gz").write_bytes(packed)
    spec = RemoteFile("data-idx3-ubyte.gz", (f"file://{web}/data-idx3-ubyte.gz",),
                      md5=(md5(packed),), content_md5=(md5(content),), description="test data")
    return spec, content, packed, web


def test_verify_accepts_published_recompressed_and_decompressed(published, tmp_path):
    spec, content, packed, _ = published
    cases = {"published.gz": packed,
             "recompressed.gz": gzip.compress(content, compresslevel=1, mtime=12345),
             "decompressed": content}
    for name, data in cases.items():
        assert gzip.compress(content, compresslevel=1, mtime=12345) != packed
        path = tmp_path / name
        path.write_bytes(data)
        ok, account = verify(path, spec)
        assert ok, (name, account)


def test_verify_rejects_corrupt_and_truncated(published, tmp_path):
    spec, content, packed, _ = published
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    cases = {"flipped.gz": bytes(flipped), "truncated.gz": packed[:-10],
             "other.gz": gzip.compress(content[:-1] + b"\x01")}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        ok, account = verify(path, spec)
        assert not ok, name
        assert md5(data) in account


def test_fetch_finds_files_in_subdir_or_root(published, tmp_path):
    spec, _, packed, _ = published
    root = tmp_path / "root"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / spec.name).write_bytes(packed)
    assert fetch([spec], "toy", root, download=False) == {spec.name: root / "toy" / spec.name}
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / spec.name).write_bytes(packed)
    assert fetch([spec], "toy", flat, download=False) == {spec.name: flat / spec.name}


def test_checksum_failure_is_never_used(published, tmp_path):
    spec, _, packed, _ = published
    root = tmp_path / "root"
    root.mkdir()
    (root / spec.name).write_bytes(packed[:-5])  # a truncated download
    with pytest.raises(MissingDataError) as info:
        fetch([spec], "toy", root, dataset="Toy", download=False)
    message = str(info.value)
    assert "Toy: 1 required file(s) missing or failed the checksum" in message
    assert f"found but NOT used: {root / spec.name}: md5 {md5(packed[:-5])}" in message
    assert "download: not attempted" in message


def test_missing_data_message_says_what_and_where(published, tmp_path):
    spec, _, _, _ = published
    other = RemoteFile("labels-idx1-ubyte.gz", ("https://example.invalid/labels.gz",),
                       md5=("0" * 32,), description="the labels")
    root = tmp_path / "empty"
    with pytest.raises(MissingDataError) as info:
        fetch([spec, other], "toy", root, dataset="Toy", download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "2 required file(s)" in message
    assert f"- {spec.name} (test data)" in message
    assert "- labels-idx1-ubyte.gz (the labels)" in message
    assert f"Looked in: {root / 'toy'}, {root}." in message
    assert "Put the files" in message and str(root / "toy") in message
    assert "--data-dir" in message and ENV_VAR in message
    assert not root.exists()  # nothing created when nothing was downloaded


def test_download_tries_mirrors_and_verifies(published, tmp_path):
    spec, _, packed, web = published
    (web / "corrupt.gz").write_bytes(packed[:-3])
    mirrors = RemoteFile(spec.name, (f"file://{web}/absent.gz", f"file://{web}/corrupt.gz",
                                     f"file://{web}/{spec.name}"), md5=spec.md5,
                         content_md5=spec.content_md5)
    root = tmp_path / "cache"
    paths = fetch([mirrors], "toy", root, progress=False)
    assert paths == {spec.name: root / "toy" / spec.name}
    assert (root / "toy" / spec.name).read_bytes() == packed
    assert sorted(p.name for p in (root / "toy").iterdir()) == [spec.name]  # no .part left

    only_bad = RemoteFile(spec.name, mirrors.urls[:2], md5=spec.md5)
    with pytest.raises(MissingDataError) as info:
        fetch([only_bad], "toy", tmp_path / "cache2", progress=False)
    message = str(info.value)
    assert f"download failed: file://{web}/absent.gz" in message
    assert f"download failed: file://{web}/corrupt.gz: downloaded, but md5" in message
    assert not any((tmp_path / "cache2").rglob("*.part*"))


def test_corrupt_cached_file_is_replaced_by_download(published, tmp_path):
    spec, _, packed, _ = published
    root = tmp_path / "cache"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / spec.name).write_bytes(b"garbage")
    paths = fetch([spec], "toy", root, progress=False)
    assert paths[spec.name].read_bytes() == packed


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert data_root() == tmp_path / "home" / ".cache" / "batchnorm"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_system_dirs_are_searched_only_with_the_default_root(published, monkeypatch, tmp_path):
    spec, _, packed, _ = published
    system = tmp_path / "usr-share-datasets-toy"
    system.mkdir()
    (system / spec.name).write_bytes(packed)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    found = fetch([spec], "toy", system_dirs=[system], download=False)
    assert found == {spec.name: system / spec.name}
    assert not (tmp_path / "home").exists()  # read in place, nothing copied into the cache
    # a chosen root (option or environment variable) means "use this folder", nothing else
    with pytest.raises(MissingDataError, match="Looked in"):
        fetch([spec], "toy", tmp_path / "chosen", system_dirs=[system], download=False)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(MissingDataError):
        fetch([spec], "toy", system_dirs=[system], download=False)


def test_remote_file_needs_a_checksum():
    with pytest.raises(ValueError, match="at least one md5"):
        RemoteFile("x.gz", ("https://example.invalid/x.gz",), md5=())


# ------------------------------------------------------------------------- real data sets


def require_files(directory: Path, what: str, variable: str, files: list[str]) -> Path:
    """``directory``, or skip the test naming the missing ``files`` and ``variable``."""
    absent = [f for f in files if not (directory / f).is_file()]
    if absent:
        pytest.skip(f"{what} not found in {directory} (missing {absent}); set {variable} "
                    "to the folder holding them")
    return directory


def test_mnist_test_set_and_missing_training_images():
    require_files(MNIST_DIR, "MNIST test files", "BATCHNORM_TEST_MNIST_DIR",
             ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    images, labels = load_mnist("test", MNIST_DIR, download=False)
    assert images.shape == (10_000, 28, 28) and str(images.dtype) == "torch.uint8"
    assert labels.shape == (10_000,) and str(labels.dtype) == "torch.int64"
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's first test digits
    assert int(images.max()) == 255 and int(images.min()) == 0
    if (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST's training images are present: no missing-file error to check")
    with pytest.raises(MissingDataError) as info:
        load_mnist("train", MNIST_DIR, download=False)
    message = str(info.value)
    assert "MNIST: 1 required file(s)" in message
    assert "train-images-idx3-ubyte.gz (60,000 train images)" in message
    assert str(MNIST_DIR) in message


def test_fashion_mnist_from_the_debian_package():
    require_files(FASHION_DIR, "Fashion-MNIST", "BATCHNORM_TEST_FASHION_DIR",
             ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    images, labels = load_fashion_mnist("test", FASHION_DIR, download=False)
    assert images.shape == (10_000, 28, 28)
    assert labels.bincount().tolist() == [1000] * 10


def test_data_sets_are_told_apart_by_checksum():
    """The same file names in a folder of the other data set are rejected, not loaded."""
    require_files(FASHION_DIR, "Fashion-MNIST", "BATCHNORM_TEST_FASHION_DIR",
             ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    with pytest.raises(MissingDataError, match="found but NOT used"):
        load_mnist("test", FASHION_DIR, download=False)


def test_loader_reads_the_data_root_from_the_environment(monkeypatch, tmp_path):
    require_files(MNIST_DIR, "MNIST test files", "BATCHNORM_TEST_MNIST_DIR",
             ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
    (tmp_path / "mnist").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        # decompressed copies under <root>/mnist, accepted by their content checksum
        (tmp_path / "mnist" / name[:-3]).write_bytes(gzip.decompress((MNIST_DIR / name)
                                                                     .read_bytes()))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    images, labels = load_mnist("test", download=False)
    reference, _ = load_mnist("test", MNIST_DIR, download=False)
    assert (images == reference).all() and len(labels) == 10_000


# ------------------------------------------------------------------ the experiments' data sets


def test_fashion_mnist_subset_is_standardized():
    try:
        data = load_data("fashion-mnist", FASHION_DIR, train_subset=500, test_subset=200)
    except MissingDataError as error:
        pytest.skip(f"Fashion-MNIST not available: {error}")
    x, y = data.train
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32
    assert data.test[0].shape == (200, 1, 28, 28)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) == 10


def fake_cifar_archive(path, rng, per_file=7):
    """A CIFAR-10 binary archive in the published layout with random records."""
    import io
    import tarfile

    from batchnorm.data.cifar import RECORD, SPLITS

    expected = {}
    with tarfile.open(path, "w:gz") as archive:
        for split, names in SPLITS.items():
            labels = torch.randint(10, (per_file * len(names),), generator=rng)
            images = torch.randint(256, (len(labels), 3, 32, 32), generator=rng,
                                   dtype=torch.int64).to(torch.uint8)
            expected[split] = images, labels
            for k, name in enumerate(names):
                part = slice(k * per_file, (k + 1) * per_file)
                records = torch.cat([labels[part, None].to(torch.uint8),
                                     images[part].reshape(per_file, -1)], dim=1)
                payload = records.numpy().tobytes()
                assert len(payload) == per_file * RECORD
                info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return expected


def test_cifar10_archive_is_parsed_and_verified(tmp_path, rng):
    from batchnorm.data.cifar import load_cifar10, read_archive

    path = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    path.parent.mkdir()
    expected = fake_cifar_archive(path, rng)
    for split in ("train", "test"):
        images, labels = read_archive(path, split)
        assert images.dtype == torch.uint8 and images.shape == (len(labels), 3, 32, 32)
        assert torch.equal(images, expected[split][0])
        assert torch.equal(labels, expected[split][1])
    # the loader only uses an archive whose md5 is the published one: ours is not
    with pytest.raises(MissingDataError, match="cifar-10-binary.tar.gz"):
        load_cifar10("train", tmp_path, download=False)
    with pytest.raises(ValueError, match="split"):
        load_cifar10("val", tmp_path, download=False)


def make_image_folder(root, rng, counts=(2, 3)):
    """root/cat, root/dog with random PNGs of different sizes (and one non-image file)."""
    image_module = pytest.importorskip("PIL.Image")
    for name, count in zip(("cat", "dog"), counts, strict=True):
        (root / name).mkdir(parents=True)
        for k in range(count):
            pixels = torch.randint(256, (30 + 7 * k, 40, 3), generator=rng, dtype=torch.int64)
            image_module.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{k}.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_loads_class_folders(tmp_path, rng):
    from batchnorm.data.imagefolder import ImageFolder

    make_image_folder(tmp_path, rng)
    train = ImageFolder(tmp_path, image_size=16, train=True)
    assert train.classes == ["cat", "dog"] and len(train) == 5
    assert [label for _, label in train.samples] == [0, 0, 1, 1, 1]
    x, label = train[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == 1
    test = ImageFolder(tmp_path, image_size=16, train=False, classes=train.classes)
    assert torch.equal(test[0][0], test[0][0])  # the centre crop is deterministic
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="not in `classes`"):
        ImageFolder(tmp_path, classes=["cat"])


def test_index_batches_are_a_function_of_the_step():
    full = IndexBatches(50, 8, seed=3)
    first = [b for b, _ in zip(full, range(20), strict=False)]
    resumed = [b for b, _ in zip(IndexBatches(50, 8, seed=3, start=7), range(13), strict=False)]
    assert resumed == first[7:]
    # each epoch (6 batches of 8 out of 50) visits distinct examples, in a new order each epoch
    epoch0 = sum(first[:6], [])
    assert len(set(epoch0)) == 48
    assert first[:6] != first[6:12]
    assert [b for b, _ in zip(IndexBatches(50, 8, seed=4), range(6), strict=False)] != first[:6]
    with pytest.raises(ValueError, match="--batch-size 8 is larger than the training set"):
        next(iter(IndexBatches(5, 8, seed=0)))


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="--dataset must be one of"):
        load_data("imagenet")
