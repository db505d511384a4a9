"""shared/storage.py on the local filesystem and on the GCS emulator (real GCS client)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from shared.events import ArtifactRef
from shared.storage import ArtifactCorrupted, ArtifactNotFound, ArtifactStore, UnsafeKey

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore.from_url((tmp_path / "store").as_uri(), cache_dir=tmp_path / "cache")
    request.getfixturevalue("gcs_emulator")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.Client(project="tuneloop", credentials=AnonymousCredentials()).create_bucket(bucket)
    return ArtifactStore.from_url(f"gs://{bucket}/artifacts", cache_dir=tmp_path / "cache")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def test_file_round_trip_is_content_addressed_and_verified(store, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_bytes(b'{"a": 1}\n' * 1000)
    ref = await store.put_file(src, kind="datasets")
    again = await store.put_file(src, kind="datasets")
    assert ref == again  # same bytes, same key
    assert ref.size_bytes == 9000
    assert ref.uri.startswith(("file://", "gs://"))
    assert ref.sha256 in ref.uri
    out = await store.get_file(ref, tmp_path / "out" / "train.jsonl")
    assert out.read_bytes() == src.read_bytes()


async def test_large_file_uses_resumable_upload_and_round_trips(store, tmp_path):
    src = tmp_path / "weights.bin"
    src.write_bytes(bytes(range(256)) * (40 * 1024 * 4))  # 40 MiB: several upload chunks
    ref = await store.put_file(src, kind="models")
    assert (await store.get_file(ref, tmp_path / "back.bin")).read_bytes() == src.read_bytes()


async def test_directory_round_trip_with_manifest(store, tmp_path):
    model = tmp_path / "adapter"
    (model / "sub").mkdir(parents=True)
    (model / "adapter_config.json").write_text('{"r": 16}')
    (model / "adapter_model.safetensors").write_bytes(b"\x00\x01" * 5000)
    (model / "sub" / "tokenizer.json").write_text("{}")
    ref = await store.put_dir(model, kind="adapters")
    dest = await store.fetch_dir(ref)
    got = _tree(dest)
    got.pop("tuneloop-manifest.json")
    got.pop(".complete")
    assert got == _tree(model)
    assert await store.fetch_dir(ref) == dest  # cached by content hash


async def test_corrupted_artifact_is_detected(store, tmp_path):
    src = tmp_path / "x.bin"
    src.write_bytes(b"good bytes")
    ref = await store.put_file(src, kind="blobs")
    # What a flipped bit or a truncated upload looks like from the reader's side.
    wrong_hash = ArtifactRef(uri=ref.uri, sha256="0" * 64, size_bytes=ref.size_bytes)
    with pytest.raises(ArtifactCorrupted):
        await store.get_file(wrong_hash, tmp_path / "y.bin")
    assert not (tmp_path / "y.bin").exists()  # nothing half-written left behind
    if ref.uri.startswith("file://"):
        Path(ref.uri.removeprefix("file://")).write_bytes(b"evil bytes")
        with pytest.raises(ArtifactCorrupted):
            await store.get_file(ref, tmp_path / "z.bin")


async def test_missing_artifact_is_reported(store, tmp_path):
    src = tmp_path / "x.bin"
    src.write_bytes(b"bytes")
    ref = await store.put_file(src, kind="blobs")
    missing = ArtifactRef(uri=ref.uri.replace("x.bin", "nope.bin"), sha256=ref.sha256, size_bytes=5)
    with pytest.raises(ArtifactNotFound):
        await store.get_file(missing, tmp_path / "y.bin")


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../../b", "/abs", ".hidden"])
async def test_hostile_names_cannot_escape_the_store(store, tmp_path, name):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    ref = await store.put_file(src, kind="blobs", name=name)
    # The name is flattened into one safe path segment under the content hash.
    assert "/../" not in ref.uri
    if ref.uri.startswith("file://"):
        assert Path(ref.uri.removeprefix("file://")).resolve().is_relative_to(tmp_path / "store")
    with pytest.raises(UnsafeKey):
        await store.put_file(src, kind="../escape")
    with pytest.raises(UnsafeKey):
        await store.put_file(src, kind="blobs", name="..")


async def test_uri_outside_the_store_is_refused(tmp_path):
    store = ArtifactStore.from_url((tmp_path / "store").as_uri())
    (tmp_path / "secret").write_text("s")
    outside = ArtifactRef(uri=(tmp_path / "secret").as_uri(), sha256="0" * 64, size_bytes=1)
    with pytest.raises(UnsafeKey):
        await store.get_file(outside, tmp_path / "copy")
