"""``tandem model-fetch``: the chart's init step, from a real HTTP server on a local socket."""

import hashlib
import io
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tandem.model_dir import load_model_config
from tandem.model_fetch import MARKER, ModelFetchError, ModelFetchOptions, fetch_model, redact


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A directory served over HTTP; yields (directory, base URL)."""
    root = tmp_path_factory.mktemp("www")
    handler = partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_archive(path: Path, model_dir: Path, arcname: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(model_dir, arcname=arcname)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_http_archive_is_fetched_verified_and_not_fetched_twice(served, llama_dir, tmp_path):
    root, base = served
    digest = make_archive(root / "model.tar.gz", llama_dir, "tiny-llama")  # one top-level directory
    dest = tmp_path / "model"
    options = ModelFetchOptions(uri=f"{base}/model.tar.gz", dest=dest, sha256=digest)
    fetch_model(options)
    assert load_model_config(dest).architecture == load_model_config(llama_dir).architecture
    assert (dest / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    assert not list(dest.glob(".fetch-*"))  # no staging left behind
    (root / "model.tar.gz").unlink()  # a second run (pod restart) must not download again
    fetch_model(options)
    assert (dest / MARKER).is_file() and options.uri not in (
        dest / MARKER
    ).read_text()  # no URI kept on disk


def test_metadata_only_skips_the_weights_and_the_uri_can_come_from_the_environment(
    served, llama_dir, tmp_path, monkeypatch
):
    root, base = served
    make_archive(root / "meta.tar.gz", llama_dir, "tiny-llama")
    monkeypatch.setenv("TANDEM_MODEL_FETCH_URI", f"{base}/meta.tar.gz")  # a Secret in the chart
    dest = tmp_path / "router-model"
    fetch_model(ModelFetchOptions(dest=dest, metadata_only=True))
    assert (dest / "config.json").is_file() and (dest / "tokenizer.json").is_file()
    assert not list(dest.glob("*.safetensors"))
    from tandem.tokenizer import Tokenizer

    assert Tokenizer(dest).encode("hello")  # what the router needs from it works


def test_file_uris_of_a_directory_and_of_a_flat_archive(llama_dir, tmp_path):
    fetch_model(ModelFetchOptions(uri=f"file://{llama_dir}", dest=tmp_path / "a"))
    assert (tmp_path / "a" / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()
    make_archive(tmp_path / "flat.tar", llama_dir, ".")  # files at the archive's root
    fetch_model(ModelFetchOptions(uri=f"file://{tmp_path / 'flat.tar'}", dest=tmp_path / "b"))
    assert (tmp_path / "b" / "config.json").is_file()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "HTTP 404"),
        ("secret-in-query", "HTTP 404"),
        ("checksum", r"sha256 of http.* is [0-9a-f]{64}, expected 0{64}"),
        ("not-a-model", "no config.json"),
        ("no-weights", "not a loadable model"),
        ("traversal", "unsafe archive member"),
        ("escaping-link", "unsafe archive member"),
        ("garbage", "not a readable tar archive"),
        ("scheme", "unsupported scheme"),
        ("not-an-archive", "expected a"),
        ("refused", "after 1 retries"),
    ],
)
def test_bad_sources_fail_clearly_and_leave_dest_empty(served, llama_dir, tmp_path, case, match):
    root, base = served
    name = f"{case}.tar.gz"
    uri, sha256 = f"{base}/{name}", None
    if case == "checksum":
        make_archive(root / name, llama_dir, "m")
        sha256 = "0" * 64
    elif case == "not-a-model":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "README").write_text("hello")
        make_archive(root / name, tmp_path / "notes", "notes")
    elif case == "no-weights":
        partial_dir = tmp_path / "partial"
        partial_dir.mkdir()
        for f in ("config.json", "tokenizer.json"):
            (partial_dir / f).write_bytes((llama_dir / f).read_bytes())
        make_archive(root / name, partial_dir, "m")
    elif case == "traversal":
        with tarfile.open(root / name, "w:gz") as tar:
            data = b"owned"
            info = tarfile.TarInfo("../../escaped.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    elif case == "escaping-link":
        with tarfile.open(root / name, "w:gz") as tar:
            info = tarfile.TarInfo("m/config.json")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    elif case == "garbage":
        (root / name).write_bytes(b"this is not gzip")
    elif case == "secret-in-query":
        uri = f"{base}/nothing.tar.gz?X-Amz-Signature=SECRET"
    elif case == "scheme":
        uri = "s3://bucket/model.tar.gz"
    elif case == "not-an-archive":
        uri = f"{base}/model.zip"
    elif case == "refused":
        uri = "http://127.0.0.1:9/model.tar.gz"  # the discard port: nothing listens
    dest = tmp_path / "dest"
    with pytest.raises(ModelFetchError, match=match) as e:
        fetch_model(ModelFetchOptions(uri=uri, dest=dest, sha256=sha256, retries=1, timeout_s=5))
    assert "SECRET" not in str(e.value)  # a presigned URL's credential never reaches logs or errors
    assert not dest.exists() or not any(dest.iterdir())
    assert not list(tmp_path.parent.rglob("escaped.txt"))


def test_a_dest_holding_something_else_is_refused(llama_dir, tmp_path):
    (tmp_path / "other.bin").write_bytes(b"x")
    with pytest.raises(ModelFetchError, match="not empty"):
        fetch_model(ModelFetchOptions(uri=f"file://{llama_dir}", dest=tmp_path))
    (tmp_path / "other.bin").unlink()
    (tmp_path / ".fetch-stale").mkdir()  # left by a killed fetch: cleaned up, not refused
    fetch_model(ModelFetchOptions(uri=f"file://{llama_dir}", dest=tmp_path))
    assert (tmp_path / "config.json").is_file() and not (tmp_path / ".fetch-stale").exists()


def test_redact_keeps_only_what_locates_the_file():
    assert redact("https://user:pw@host:8443/a/m.tar.gz?sig=x#f") == "https://host:8443/a/m.tar.gz"
    assert redact("file:///models/m.tar") == "file:///models/m.tar"
