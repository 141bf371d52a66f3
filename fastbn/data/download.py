"""Checksum-verified downloads into the cache (opt-in: nothing here runs unless asked).

A file is fetched into a temporary file next to its destination, its SHA-256 is compared with
the expected digest, and only then is it renamed into place, so the cache never holds a partial
or unverified file. Any URL scheme ``urllib`` understands works, including ``file://`` (which
is how the tests exercise this code without a network).
"""
import hashlib
import os
import shutil
import tempfile
import urllib.request

#: SHA-256 of the four official MNIST files (gzip-compressed IDX).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

#: Where ``download_mnist`` looks when no mirror is given; override with $FASTBN_MNIST_MIRROR.
DEFAULT_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


class ChecksumError(OSError):
    """A downloaded file's SHA-256 is not the expected one (the file was not kept)."""


def sha256_of(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url, dest, sha256, *, timeout=60):
    """Fetch ``url`` to ``dest`` if its SHA-256 equals ``sha256``; return ``dest``.

    An existing ``dest`` with the right digest is kept without fetching. On a digest mismatch
    :class:`ChecksumError` is raised and nothing is left behind.
    """
    dest = os.fspath(dest)
    if os.path.exists(dest) and sha256_of(dest) == sha256:
        return dest
    directory = os.path.dirname(os.path.abspath(dest))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".download-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        got = sha256_of(tmp)
        if got != sha256:
            raise ChecksumError(f"{url}: SHA-256 mismatch: expected {sha256}, got {got}; "
                                f"the file was not saved")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def download_mnist(directory, mirror=None, *, checksums=None, timeout=60):
    """Download the four MNIST files into ``directory``, each verified by SHA-256.

    Parameters
    ----------
    directory : path
        Destination (created if needed), normally ``<cache>/mnist``.
    mirror : str, optional
        Base URL the file names are appended to; default ``$FASTBN_MNIST_MIRROR`` or
        :data:`DEFAULT_MNIST_MIRROR`.
    checksums : dict, optional
        File name -> SHA-256; default :data:`MNIST_SHA256`.

    Returns
    -------
    list of str
        The paths of the verified files.
    """
    if mirror is None:
        mirror = os.environ.get("FASTBN_MNIST_MIRROR", DEFAULT_MNIST_MIRROR)
    if not mirror.endswith("/"):
        mirror += "/"
    checksums = MNIST_SHA256 if checksums is None else checksums
    return [download_file(mirror + name, os.path.join(directory, name), digest, timeout=timeout)
            for name, digest in checksums.items()]
