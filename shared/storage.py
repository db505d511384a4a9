"""The artifact store: datasets, adapters and models, content-addressed and verified.

Keys look like ``<kind>/<sha256>/<name>``: the same bytes always land at the same key, so a
re-upload is free and a key can never point at other bytes. Every download checks the
sha256 the caller expects (from an event's :class:`~shared.events.ArtifactRef`).

A directory (an adapter or model folder) is stored as its files plus a JSON manifest listing
each file's relative path, sha256 and size; the directory's ref is the manifest's ref.

Backends: the local filesystem (``file://``; atomic writes) and Google Cloud Storage
(``gs://``; resumable uploads; honours ``STORAGE_EMULATOR_HOST``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from shared.events import ArtifactRef

CHUNK = 1024 * 1024
MANIFEST_NAME = "tuneloop-manifest.json"


class ArtifactError(Exception):
    """Base for artifact store failures."""


class ArtifactCorrupted(ArtifactError):
    """The bytes read back do not match the expected sha256 or size."""


class ArtifactNotFound(ArtifactError):
    pass


class UnsafeKey(ArtifactError, ValueError):
    """A key that would escape the store (``..``, absolute, backslashes, control chars)."""


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def safe_key(key: str) -> str:
    """Validate a relative key; refuse anything that could escape the store's root."""
    if not key or len(key) > 1024:
        raise UnsafeKey(f"artifact key must be 1-1024 characters, got {len(key)}")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise UnsafeKey(f"unsafe artifact key {key!r}")
    if any(p in ("..", ".", "") for p in key.split("/")):
        raise UnsafeKey(f"unsafe artifact key {key!r}: no '.', '..' or empty segments")
    return key


_KIND_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def safe_name(name: str) -> str:
    """Flatten a file name into one harmless path segment (no separators, no leading dots)."""
    flat = name.strip().replace("/", "_").replace("\\", "_").lstrip(".")
    if not flat or any(ord(c) < 32 for c in flat):
        raise UnsafeKey(f"unsafe artifact name {name!r}")
    return flat[:200]


def safe_kind(kind: str) -> str:
    if not _KIND_RE.match(kind):
        raise UnsafeKey(f"artifact kind {kind!r} must match {_KIND_RE.pattern}")
    return kind


class Backend(ABC):
    """Where bytes live. Keys are already validated by :class:`ArtifactStore`."""

    scheme: str

    @abstractmethod
    def uri(self, key: str) -> str: ...

    @abstractmethod
    def key_of(self, uri: str) -> str: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def upload(self, src: Path, key: str) -> None: ...

    @abstractmethod
    def download(self, key: str, dest: Path) -> None: ...


class LocalBackend(Backend):
    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise UnsafeKey(f"key {key!r} escapes the store root")
        return path

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ArtifactError(f"{uri!r} is not a file:// URI of this store")
        path = Path(unquote(parsed.path)).resolve()
        if not path.is_relative_to(self.root):
            raise UnsafeKey(f"{uri!r} is outside the store root {self.root}")
        return path.relative_to(self.root).as_posix()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def upload(self, src: Path, key: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
                shutil.copyfileobj(inp, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def download(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ArtifactNotFound(self.uri(key))
        shutil.copyfile(src, dest)


class GcsBackend(Backend):
    scheme = "gs"

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None) -> None:
        from google.cloud import storage

        if client is None:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(
                    project=os.environ.get("GOOGLE_CLOUD_PROJECT", "tuneloop"),
                    credentials=AnonymousCredentials(),
                )
            else:
                client = storage.Client()
        self.client = client
        self.bucket = client.bucket(bucket)
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def key_of(self, uri: str) -> str:
        head = f"gs://{self.bucket_name}/" + (f"{self.prefix}/" if self.prefix else "")
        if not uri.startswith(head):
            raise ArtifactError(f"{uri!r} is not in {head}")
        return uri[len(head) :]

    def exists(self, key: str) -> bool:
        return bool(self.bucket.blob(self._name(key)).exists())

    def upload(self, src: Path, key: str) -> None:
        # A chunk size makes the client use a resumable upload (large adapters and models).
        blob = self.bucket.blob(self._name(key), chunk_size=8 * CHUNK)
        blob.upload_from_filename(str(src))

    def download(self, key: str, dest: Path) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(self._name(key)).download_to_filename(str(dest))
        except NotFound as exc:
            raise ArtifactNotFound(self.uri(key)) from exc


class ArtifactStore:
    """Content-addressed artifact storage with integrity checks on the way back.

    The blocking backends run in threads; the async methods are what services call.
    """

    def __init__(self, backend: Backend, *, cache_dir: Path | None = None) -> None:
        self.backend = backend
        self.cache_dir = cache_dir

    @classmethod
    def from_url(cls, url: str, *, cache_dir: Path | None = None) -> ArtifactStore:
        """``file:///abs/dir``, a plain path, or ``gs://bucket[/prefix]``."""
        parsed = urlparse(url)
        if parsed.scheme == "gs":
            return cls(GcsBackend(parsed.netloc, parsed.path), cache_dir=cache_dir)
        if parsed.scheme in ("file", ""):
            path = Path(unquote(parsed.path) if parsed.scheme else url)
            return cls(LocalBackend(path), cache_dir=cache_dir)
        raise ValueError(f"unsupported artifact store URL {url!r}: use file:// or gs://")

    # ---------------------------------------------------------------- files

    def put_file_sync(self, path: Path, *, kind: str, name: str | None = None) -> ArtifactRef:
        digest, size = sha256_file(path)
        key = safe_key(f"{safe_kind(kind)}/{digest}/{safe_name(name or path.name)}")
        if not self.backend.exists(key):
            self.backend.upload(path, key)
        return ArtifactRef(uri=self.backend.uri(key), sha256=digest, size_bytes=size)

    async def put_file(self, path: Path, *, kind: str, name: str | None = None) -> ArtifactRef:
        return await asyncio.to_thread(self.put_file_sync, path, kind=kind, name=name)

    async def put_bytes(self, data: bytes, *, kind: str, name: str) -> ArtifactRef:
        def write() -> ArtifactRef:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / safe_name(name)
                path.write_bytes(data)
                return self.put_file_sync(path, kind=kind, name=name)

        return await asyncio.to_thread(write)

    def get_file_sync(self, ref: ArtifactRef, dest: Path) -> Path:
        key = safe_key(self.backend.key_of(ref.uri))
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=".dl-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.backend.download(key, tmp)
            digest, size = sha256_file(tmp)
            if digest != ref.sha256 or size != ref.size_bytes:
                raise ArtifactCorrupted(
                    f"{ref.uri}: expected sha256 {ref.sha256} ({ref.size_bytes} bytes), "
                    f"got {digest} ({size} bytes)"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    async def get_file(self, ref: ArtifactRef, dest: Path) -> Path:
        """Download to ``dest`` and verify; raises :class:`ArtifactCorrupted` on mismatch."""
        return await asyncio.to_thread(self.get_file_sync, ref, dest)

    async def get_bytes(self, ref: ArtifactRef) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            path = await self.get_file(ref, Path(tmp) / "blob")
            return path.read_bytes()

    # ---------------------------------------------------------------- directories

    def put_dir_sync(self, directory: Path, *, kind: str) -> ArtifactRef:
        safe_kind(kind)
        if not directory.is_dir():
            raise ArtifactError(f"{directory} is not a directory")
        files = []
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            if rel == MANIFEST_NAME:
                continue
            ref = self.put_file_sync(path, kind=f"{kind}-files", name=path.name)
            files.append(
                {
                    "path": safe_key(rel),
                    "uri": ref.uri,
                    "sha256": ref.sha256,
                    "size_bytes": ref.size_bytes,
                }
            )
        manifest = json.dumps({"kind": kind, "files": files}, indent=1, sort_keys=True).encode()
        with tempfile.TemporaryDirectory() as tmp:
            mpath = Path(tmp) / MANIFEST_NAME
            mpath.write_bytes(manifest)
            return self.put_file_sync(mpath, kind=kind, name=MANIFEST_NAME)

    async def put_dir(self, directory: Path, *, kind: str) -> ArtifactRef:
        """Upload every file of a directory; returns the ref of its manifest."""
        return await asyncio.to_thread(self.put_dir_sync, directory, kind=kind)

    def get_dir_sync(self, ref: ArtifactRef, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        mpath = self.get_file_sync(ref, dest / MANIFEST_NAME)
        manifest = json.loads(mpath.read_text())
        root = dest.resolve()
        for entry in manifest["files"]:
            target = (root / safe_key(entry["path"])).resolve()
            if not target.is_relative_to(root):
                raise UnsafeKey(f"manifest entry {entry['path']!r} escapes {dest}")
            file_ref = ArtifactRef(
                uri=entry["uri"], sha256=entry["sha256"], size_bytes=entry["size_bytes"]
            )
            if target.is_file() and sha256_file(target) == (file_ref.sha256, file_ref.size_bytes):
                continue
            self.get_file_sync(file_ref, target)
        return dest

    async def get_dir(self, ref: ArtifactRef, dest: Path) -> Path:
        """Download a directory stored by :meth:`put_dir`, verifying every file."""
        return await asyncio.to_thread(self.get_dir_sync, ref, dest)

    async def fetch_dir(self, ref: ArtifactRef) -> Path:
        """Download a directory into the local cache, keyed by its manifest hash (reused)."""
        if self.cache_dir is None:
            raise ArtifactError("this store has no cache_dir")
        dest = self.cache_dir / ref.sha256
        done = dest / ".complete"
        if done.exists():
            return dest
        await self.get_dir(ref, dest)
        done.touch()
        return dest
