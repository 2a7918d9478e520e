"""``tandem model-fetch``: put a model directory where a pod expects it, from a URI the user
supplies.

The Helm chart's ``model.source.type: init`` runs this in an init container that fills an
emptyDir before the engine starts. Sources:

- ``http(s)://.../model.tar[.gz|.tgz]``: unpacked as it streams in (no second copy on disk, so
  the emptyDir needs the model's size, not twice it), checked against ``--sha256`` when given,
  restarted from scratch on a network error;
- ``file:///path/model.tar.gz``: unpacked;
- ``file:///path/dir``: copied.

Archives are unpacked with ``tarfile``'s ``data`` filter, which refuses absolute paths, ``..``,
device files and links leaving the tree, so a hostile archive cannot write outside ``dest``. On
Pythons older than the 2025 fixes of that filter (CVE-2025-4517 and its siblings) links are
refused outright. The archive may hold the model files at its root or under one top-level
directory. The result must be a loadable model directory (config.json of a supported
architecture, tokenizer.json, and, unless ``--metadata-only``, safetensors weights); otherwise
the command fails and ``dest`` holds no half-written model. ``--metadata-only`` (the router's
init step) skips the weights: the router reads only the tokenizer and config.

The URI may carry a credential (a presigned URL): it can come from ``TANDEM_MODEL_FETCH_URI``
(a Secret in the chart), and logs and errors show it without its query string or user info. A
second run with the same URI finds its marker and does nothing (pod restarts do not download
again).
"""

import hashlib
import io
import logging
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tandem.api.errors import TandemError

logger = logging.getLogger(__name__)
MARKER = ".tandem-fetched"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelFetchError(TandemError):
    pass


class ModelFetchOptions(BaseSettings):
    """Copy a model directory from a URI into --dest (the chart's init step)."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_MODEL_FETCH_", frozen=True, extra="forbid", use_attribute_docstrings=True
    )

    uri: str
    """http(s):// or file:// URI of a .tar/.tar.gz/.tgz of the model directory, or file:// of a
    directory."""
    dest: Path
    """Directory to fill (created if missing; must be empty unless it holds this URI's earlier
    fetch)."""
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    """Expected SHA-256 of the archive."""
    metadata_only: bool = False
    """Skip weight files (config and tokenizer only: what the router reads)."""
    timeout_s: float = Field(60.0, gt=0)
    """Network timeout of each read (not of the whole download)."""
    retries: int = Field(5, ge=0)
    """Retries of a download that failed on the network (exponential backoff, from scratch)."""


def fetch_model(options: ModelFetchOptions) -> Path:
    dest = options.dest
    shown = redact(options.uri)
    marker = dest / MARKER
    if marker.is_file() and marker.read_text() == _marker_text(options):
        logger.info("%s already holds %s", dest, shown)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob(
        ".fetch-*"
    ):  # left by a fetch that was killed (the init container restarts)
        shutil.rmtree(stale, ignore_errors=True)
    if any(dest.iterdir()):
        raise ModelFetchError(
            f"{dest} is not empty and holds no fetch of {shown}; refusing to mix models"
        )
    url = urlparse(options.uri)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as work:
        staging = Path(work) / "model"
        if url.scheme == "file":
            source = Path(unquote(url.path))
            if source.is_dir():
                ignore = (
                    shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES))
                    if options.metadata_only
                    else None
                )
                shutil.copytree(source, staging, ignore=ignore)
            elif source.is_file():
                with source.open("rb") as f:
                    _unpack_stream(f, staging, options, shown)
            else:
                raise ModelFetchError(f"{source} does not exist")
        elif url.scheme in ("http", "https"):
            if not url.path.endswith(ARCHIVE_SUFFIXES):
                raise ModelFetchError(f"{shown}: expected a {'/'.join(ARCHIVE_SUFFIXES)} archive")
            _download_and_unpack(options, staging, shown)
        else:
            raise ModelFetchError(
                f"{shown}: unsupported scheme {url.scheme!r} (use http, https or file)"
            )
        root = _model_root(staging)
        _check_loadable(root, options.metadata_only)
        for item in root.iterdir():
            item.rename(dest / item.name)
    marker.write_text(_marker_text(options))
    logger.info(
        "fetched %s into %s%s",
        shown,
        dest,
        " (config and tokenizer only)" if options.metadata_only else "",
    )
    return dest


def redact(uri: str) -> str:
    """The URI without user info, query or fragment (where presigned URLs keep their secrets)."""
    url = urlparse(uri)
    host = url.hostname or ""
    if url.port:
        host = f"{host}:{url.port}"
    return urlunparse((url.scheme, host, url.path, "", "", ""))


def _marker_text(options: ModelFetchOptions) -> str:
    digest = hashlib.sha256(options.uri.encode()).hexdigest()
    return f"{digest} {'metadata' if options.metadata_only else 'full'}"


def _download_and_unpack(options: ModelFetchOptions, staging: Path, shown: str) -> None:
    import httpx
    from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

    @retry(
        retry=retry_if_exception_type(httpx.TransportError),
        stop=stop_after_attempt(options.retries + 1),
        wait=wait_exponential(multiplier=1, max=30),
        reraise=True,
    )
    def attempt() -> None:
        shutil.rmtree(staging, ignore_errors=True)  # a retry starts from scratch
        with httpx.stream(
            "GET", options.uri, timeout=options.timeout_s, follow_redirects=True
        ) as response:
            if response.status_code != 200:
                raise ModelFetchError(f"GET {shown}: HTTP {response.status_code}")
            _unpack_stream(_IteratorReader(response.iter_bytes(1 << 20)), staging, options, shown)

    try:
        attempt()
    except httpx.TransportError as e:
        raise ModelFetchError(
            f"GET {shown}: {type(e).__name__} (after {options.retries} retries)"
        ) from None


class _IteratorReader(io.RawIOBase):
    """A read-only file over an iterator of byte blocks (tarfile's stream mode reads from it)."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        self._blocks = blocks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = next(self._blocks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class _HashingReader(io.RawIOBase):
    def __init__(self, raw) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def _unpack_stream(raw, into: Path, options: ModelFetchOptions, shown: str) -> None:
    """Unpack a tar (optionally compressed) read front to back, checking its SHA-256 on the way."""
    reader = _HashingReader(raw)
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|*") as tar:
            tar.extractall(into, filter=_member_filter(options.metadata_only))
        while reader.read(
            1 << 20
        ):  # the padding after the archive's end: the hash covers the whole file
            pass
    except tarfile.FilterError as e:
        raise ModelFetchError(f"{shown}: unsafe archive member refused: {e}") from None
    except (tarfile.TarError, EOFError) as e:
        raise ModelFetchError(f"{shown}: not a readable tar archive ({e})") from None
    if options.sha256 and reader.digest.hexdigest() != options.sha256.lower():
        raise ModelFetchError(
            f"sha256 of {shown} is {reader.digest.hexdigest()}, expected {options.sha256.lower()}"
        )


def _links_filter_is_trustworthy() -> bool:
    """Pythons with the June 2025 fixes of tarfile's data filter (links escaping the tree)."""
    v = sys.version_info
    fixed = {(3, 11): (3, 11, 13), (3, 12): (3, 12, 11), (3, 13): (3, 13, 4)}
    return v >= fixed.get(v[:2], (3, 14, 0))


def _member_filter(metadata_only: bool):
    trust_links = _links_filter_is_trustworthy()

    def member_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if (member.issym() or member.islnk()) and not trust_links:
            raise tarfile.FilterError(
                f"{member.name!r} is a link, refused on this Python; "
                "re-create the archive with tar --dereference"
            )
        member = tarfile.data_filter(member, path)
        if metadata_only and member.name.endswith(WEIGHT_SUFFIXES):
            return None
        return member

    return member_filter


def _model_root(staging: Path) -> Path:
    """The archive's root, or its single top-level directory, whichever holds config.json."""
    if (staging / "config.json").is_file():
        return staging
    entries = list(staging.iterdir()) if staging.is_dir() else []
    if len(entries) == 1 and (entries[0] / "config.json").is_file():
        return entries[0]
    raise ModelFetchError(
        "no config.json at the archive's root or in its single top-level directory"
    )


def _check_loadable(root: Path, metadata_only: bool) -> None:
    from tandem.model_dir import load_model_config, weight_files

    try:
        load_model_config(root)
        if not metadata_only:
            weight_files(root)
    except TandemError as e:
        raise ModelFetchError(f"the fetched directory is not a loadable model: {e}") from None
    if not (root / "tokenizer.json").is_file():
        raise ModelFetchError("the fetched directory has no tokenizer.json")
