"""The ObjectStore contract (airoboros.ports.ObjectStore), held against LocalObjectStore
(a folder) and S3ObjectStore (moto's S3 server, in-process on a loopback port, started by
the fixtures of tests/integration/test_objects_s3.py), so that code written against one
behaves the same on the other.

What only one adapter does lives beside it: tests/unit/test_objects_vectors.py (the
folder: temp files, file URLs) and tests/integration/test_objects_s3.py (buckets,
multipart uploads, credentials, endpoints).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from airoboros.errors import NotFoundError
from airoboros.objects import LocalObjectStore
from airoboros.objects_s3 import S3ObjectStore
from airoboros.ports import ObjectStore
from tests.integration.test_objects_s3 import make_s3 as make_s3
from tests.integration.test_objects_s3 import s3_endpoint as s3_endpoint

MB = 1024 * 1024
Store = LocalObjectStore | S3ObjectStore


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, make_s3: Callable[..., S3ObjectStore]
) -> AsyncIterator[Store]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    else:
        yield make_s3()


def _is_the_port(store: ObjectStore) -> ObjectStore:  # mypy holds both to the port here
    return store


async def test_round_trip_returns_uri(store: Store) -> None:
    _is_the_port(store)
    data = b"\x00weights\xff" * 100
    uri = await store.put_bytes("runs/1/model.bin", data)
    assert uri == store.uri("runs/1/model.bin")
    assert uri.endswith("runs/1/model.bin")
    if isinstance(store, S3ObjectStore):
        assert uri == f"s3://{store.bucket}/runs/1/model.bin"
    else:
        assert uri.startswith("file://")
    assert await store.get_bytes("runs/1/model.bin") == data


async def test_empty_object(store: Store) -> None:
    await store.put_bytes("empty", b"")
    assert await store.exists("empty")
    assert await store.get_bytes("empty") == b""


async def test_overwrite(store: Store) -> None:
    await store.put_bytes("k", b"old")
    await store.put_bytes("k", b"new, and longer")
    assert await store.get_bytes("k") == b"new, and longer"
    await store.put_bytes("k", b"new")  # and shorter: nothing of the old one is left
    assert await store.get_bytes("k") == b"new"
    assert await store.list() == ["k"]


async def test_exists_list_prefix_delete(store: Store) -> None:
    assert await store.list() == []
    await store.put_bytes("runs/1/model.bin", b"1")
    await store.put_bytes("runs/2/model.bin", b"2")
    await store.put_bytes("runs10/x", b"x")
    await store.put_bytes("datasets/a.jsonl", b"{}\n")
    assert await store.exists("runs/1/model.bin")
    assert not await store.exists("runs/1/other.bin")
    assert not await store.exists("runs"), "a prefix is not an object"
    assert await store.list() == [
        "datasets/a.jsonl",
        "runs/1/model.bin",
        "runs/2/model.bin",
        "runs10/x",
    ]
    assert await store.list("runs/") == ["runs/1/model.bin", "runs/2/model.bin"]
    # A string prefix, not a folder: "runs" matches "runs10/x" too.
    assert await store.list("runs") == ["runs/1/model.bin", "runs/2/model.bin", "runs10/x"]
    assert await store.list("nothing/") == []

    await store.delete("runs/1/model.bin")
    assert not await store.exists("runs/1/model.bin")
    with pytest.raises(NotFoundError):
        await store.get_bytes("runs/1/model.bin")
    await store.delete("runs/1/model.bin")  # deleting twice is fine
    await store.delete("never/was")
    assert await store.list("runs/") == ["runs/2/model.bin"]


async def test_missing_key_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError, match=re.escape("nope/missing.bin")):
        await store.get_bytes("nope/missing.bin")
    assert not await store.exists("nope/missing.bin")


async def test_unicode_keys(store: Store) -> None:
    key = "jobs/ジョブ/export/été data.jsonl"
    await store.put_bytes(key, "ü\n".encode())
    assert await store.list("jobs/ジョブ/") == [key]
    assert await store.get_bytes(key) == "ü\n".encode()


@pytest.mark.parametrize("key", ["../outside.bin", "a/../../outside.bin", "/etc/passwd", "."])
async def test_keys_outside_the_store_are_refused(store: Store, key: str) -> None:
    with pytest.raises(ValueError):
        await store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        await store.get_bytes(key)


async def test_concurrent_puts_and_gets(store: Store) -> None:
    keys = [f"batch/{i:02d}" for i in range(24)]
    await asyncio.gather(*(store.put_bytes(k, k.encode() * 1000) for k in keys))
    got = await asyncio.gather(*(store.get_bytes(k) for k in keys))
    assert got == [k.encode() * 1000 for k in keys]
    assert await store.list("batch/") == keys


# --- atomic visibility ------------------------------------------------------------------------


async def poll_while(
    store: ObjectStore, key: str, write: asyncio.Task[str], allowed: list[bytes]
) -> tuple[int, int]:
    """Read ``key`` until ``write`` is done; every read must be NotFound or one of
    ``allowed``, whole. Returns (reads that found nothing, reads that found an object)."""
    missing = found = 0
    while not write.done():
        try:
            got = await store.get_bytes(key)
        except NotFoundError:
            missing += 1
            # A store may answer "not found" without awaiting anything: let the write run.
            await asyncio.sleep(0)
            continue
        found += 1
        assert any(got == a for a in allowed), f"partial or mixed object: {len(got)} bytes"
    return missing, found


async def test_a_new_object_appears_whole(store: Store) -> None:
    data = os.urandom(8 * MB)
    await store.put_bytes("warmup", b"")  # the bucket exists before the race starts
    write = asyncio.create_task(store.put_bytes("new.bin", data))
    await poll_while(store, "new.bin", write, [data])
    await write
    assert await store.get_bytes("new.bin") == data


async def test_reader_during_overwrite_sees_old_or_new_whole(store: Store) -> None:
    old, new = os.urandom(8 * MB), os.urandom(12 * MB)
    await store.put_bytes("model.bin", old)

    write = asyncio.create_task(store.put_bytes("model.bin", new))
    missing, found = await poll_while(store, "model.bin", write, [old, new])
    await write
    assert missing == 0, "an overwritten object must never disappear"
    assert found > 0
    assert await store.get_bytes("model.bin") == new
