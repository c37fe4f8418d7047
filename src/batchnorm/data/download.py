"""Find, download and verify data-set files; shared by every loader in :mod:`batchnorm.data`.

A data set is a list of :class:`RemoteFile` s (a file name, the URLs it can be fetched from,
tried in turn, and the md5 checksums it may have). :func:`fetch` returns verified local paths:

1. the data root is ``data_dir`` if given, else ``$BATCHNORM_DATA``, else
   ``~/.cache/batchnorm`` (:func:`data_root`);
2. each file is looked for in ``<root>/<subdir>`` and then in ``<root>`` itself, under its
   published name and, for a ``.gz`` file, also decompressed (name without ``.gz``); with the
   default root, also in the data set's system folders (Debian's ``/usr/share/datasets/...``);
3. a file is used only if its checksum is accepted (:func:`verify`): a corrupt, truncated or
   foreign file (another data set's file of the same name) is reported and never used;
4. missing files are downloaded into ``<root>/<subdir>`` (from each URL in turn, with a
   progress bar), verified before they take their final name, and
5. if a file can neither be found nor downloaded, :class:`MissingDataError` says which files are
   missing, where they were looked for, why the downloads failed, and where to put them.

Checksums: ``md5`` lists the accepted md5s of the file's bytes as stored; for gzip files
``content_md5`` lists the accepted md5s of the decompressed content, which is what identifies
the data when a file was recompressed (Debian's packages recompress the published ``.gz``
files, so their bytes differ while the data is the same), and what identifies a decompressed
copy.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

ENV_VAR = "BATCHNORM_DATA"
DEFAULT_ROOT = Path("~/.cache/batchnorm")
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class MissingDataError(FileNotFoundError):
    """Required data files are neither on disk (with an accepted checksum) nor downloadable."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set.

    Attributes:
        name: the file's published name (also its name on disk).
        urls: full URLs to download it from, tried in order.
        md5: accepted md5 checksums (hex) of the file's bytes.
        content_md5: for gzip files, accepted md5 checksums of the decompressed content.
        description: what the file holds, for messages (e.g. "60,000 training images").
    """

    name: str
    urls: tuple[str, ...]
    md5: tuple[str, ...]
    content_md5: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if not self.md5 and not self.content_md5:
            raise ValueError(f"RemoteFile {self.name!r}: give at least one md5 or content_md5; "
                             "an unverified file could be corrupt")

    @property
    def local_names(self) -> tuple[str, ...]:
        """Names accepted on disk: the published name and, for ``x.gz`` with a known content
        checksum, the decompressed ``x``."""
        if self.name.endswith(".gz") and self.content_md5:
            return self.name, self.name[:-3]
        return (self.name,)


def mirror_urls(mirrors: Sequence[str], name: str) -> tuple[str, ...]:
    """``name`` under each mirror's base URL (a trailing slash is added when missing)."""
    return tuple(base.rstrip("/") + "/" + name for base in mirrors)


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$BATCHNORM_DATA``, else
    ``~/.cache/batchnorm``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return DEFAULT_ROOT.expanduser()


def search_dirs(subdir: str, data_dir: str | os.PathLike | None = None,
                system_dirs: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Where the files of data set ``subdir`` are looked for: ``<root>/<subdir>``, ``<root>``,
    then, only when no root was chosen (neither ``data_dir`` nor ``$BATCHNORM_DATA``), the
    data set's ``system_dirs`` (e.g. where a Linux distribution's package installs it)."""
    root = data_root(data_dir)
    dirs = [root / subdir, root]
    chose_root = (data_dir is not None and str(data_dir) != "") or os.environ.get(ENV_VAR, "")
    if not chose_root:
        dirs += [Path(d) for d in system_dirs]
    return dirs


def md5_of(path: str | os.PathLike, *, decompress: bool = False) -> str:
    """md5 (hex) of a file's bytes, or of its gzip-decompressed content, read in chunks."""
    digest = hashlib.md5()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == _GZIP_MAGIC


def verify(path: str | os.PathLike, spec: RemoteFile) -> tuple[bool, str]:
    """Whether ``path`` holds ``spec``'s data, and a one-line account of the check.

    Accepted: the file's md5 is in ``spec.md5``; or it is gzip and its decompressed content's
    md5 is in ``spec.content_md5``; or it is not gzip and its md5 is in ``spec.content_md5``
    (a decompressed copy). A truncated or otherwise broken gzip stream is rejected.
    """
    path = Path(path)
    digest = md5_of(path)
    if digest in spec.md5:
        return True, f"md5 {digest} (published file)"
    if not spec.content_md5:
        return False, f"md5 {digest} matches none of {list(spec.md5)}"
    if _is_gzip(path):
        try:
            content = md5_of(path, decompress=True)
        except (EOFError, OSError, gzip.BadGzipFile) as error:
            return False, f"md5 {digest} not accepted and the gzip stream is broken ({error})"
        if content in spec.content_md5:
            return True, f"decompressed content md5 {content}"
        return False, (f"md5 {digest} matches none of {list(spec.md5)} and the decompressed "
                       f"content's md5 {content} matches none of {list(spec.content_md5)}")
    if digest in spec.content_md5:
        return True, f"md5 {digest} (decompressed copy)"
    return False, f"md5 {digest} matches none of {list(spec.md5) + list(spec.content_md5)}"


@dataclass
class _Search:
    """What happened while looking for one file."""

    spec: RemoteFile
    found: Path | None = None
    rejected: list[str] = field(default_factory=list)  # "path: reason"
    download_errors: list[str] = field(default_factory=list)  # "url: reason"


def _find(spec: RemoteFile, dirs: Sequence[Path]) -> _Search:
    search = _Search(spec)
    for directory in dirs:
        for name in spec.local_names:
            path = directory / name
            if not path.is_file():
                continue
            ok, account = verify(path, spec)
            if ok:
                search.found = path
                return search
            search.rejected.append(f"{path}: {account}")
    return search


def _download(url: str, dest: Path, *, progress: bool, timeout: float) -> None:
    """Stream ``url`` into ``dest`` with a byte progress bar. ``dest``'s folder is created only
    once the server answers, so a failed attempt leaves nothing behind."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # http(s):// or file://
        dest.parent.mkdir(parents=True, exist_ok=True)
        total = response.headers.get("Content-Length")
        with open(dest, "wb") as handle, tqdm(
            total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"download {url.rsplit('/', 1)[-1]}", disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))


def _try_download(search: _Search, target_dir: Path, *, progress: bool, timeout: float) -> None:
    """Try each URL in turn; keep the first download whose checksum is accepted."""
    spec = search.spec
    final = target_dir / spec.name
    # a per-process temporary name: concurrent downloads never write the same file
    part = target_dir / f"{spec.name}.part{os.getpid()}"
    for url in spec.urls:
        try:
            _download(url, part, progress=progress, timeout=timeout)
            ok, account = verify(part, spec)
            if not ok:
                search.download_errors.append(f"{url}: downloaded, but {account}")
                continue
            os.replace(part, final)  # atomic: a reader never sees a half-written file
            search.found = final
            return
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
            search.download_errors.append(f"{url}: {getattr(error, 'reason', None) or error}")
        finally:
            if part.exists():
                part.unlink()


def fetch(
    files: Sequence[RemoteFile],
    subdir: str,
    data_dir: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    system_dirs: Sequence[str | os.PathLike] = (),
    download: bool = True,
    progress: bool = True,
    timeout: float = 30.0,
) -> dict[str, Path]:
    """Verified local paths of ``files`` (``{published name: path}``), downloading what is
    missing into ``<root>/<subdir>`` when ``download`` is true.

    Args:
        files: the files needed.
        subdir: the data set's folder under the data root (e.g. ``"mnist"``).
        data_dir: the data root or the folder holding the files (see :func:`data_root`).
        dataset: the data set's name, for messages (default ``subdir``).
        system_dirs: read-only folders searched last when no root was chosen (see
            :func:`search_dirs`); downloads never go there.
        download: try the URLs for missing files (no network access when false).
        progress: show a progress bar per download.
        timeout: seconds before a stalled connection is abandoned.

    Raises:
        MissingDataError: some file is neither present with an accepted checksum nor
            downloadable; the message lists those files and where to put them.
    """
    dirs = search_dirs(subdir, data_dir, system_dirs)
    searches = [_find(spec, dirs) for spec in files]
    for search in searches:
        if search.found is None and download:
            _try_download(search, dirs[0], progress=progress, timeout=timeout)
    missing = [s for s in searches if s.found is None]
    if missing:
        raise MissingDataError(_missing_message(missing, dirs, dataset or subdir, download))
    return {s.spec.name: s.found for s in searches}


def _missing_message(missing: list[_Search], dirs: list[Path], dataset: str,
                     download: bool) -> str:
    lines = [f"{dataset}: {len(missing)} required file(s) missing or failed the checksum:"]
    for search in missing:
        spec = search.spec
        what = f" ({spec.description})" if spec.description else ""
        lines.append(f"  - {spec.name}{what}")
        for rejected in search.rejected:
            lines.append(f"      found but NOT used: {rejected}")
        if not download:
            lines.append("      download: not attempted (download disabled)")
        for error in search.download_errors:
            lines.append(f"      download failed: {error}")
    shown = ", ".join(str(d) for d in dirs)
    lines += [
        f"Looked in: {shown}.",
        f"Put the files (published names; .gz as published or recompressed, or decompressed) "
        f"in {dirs[0]} or {dirs[1]}, or point --data-dir or the environment variable "
        f"{ENV_VAR} at the folder that holds them.",
    ]
    urls = [u for s in missing for u in s.spec.urls[:1]]
    if urls:
        lines.append("Published at e.g. " + ", ".join(urls) + ".")
    return "\n".join(lines)

