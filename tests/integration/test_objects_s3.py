"""airoboros.objects_s3 against a real S3 server: moto's, in-process on a loopback port.

The ObjectStore contract, on this adapter and LocalObjectStore alike, is in
tests/contract/test_object_store_contract.py (which uses the fixtures here); this file
holds what only S3 has: buckets, multipart uploads, credentials, endpoints, the factory.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import re
import socket
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from airoboros.errors import ConfigError, NotFoundError, StoreError
from airoboros.objects import LocalObjectStore
from airoboros.objects_s3 import S3ObjectStore, make_object_store

ACCESS = "airoboros-test"
SECRET = "do-not-print-this-secret"
MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bucket() -> str:
    # moto's buckets live in process-wide state: a fresh bucket per test isolates tests.
    return f"t-{uuid.uuid4().hex[:20]}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """``host:port`` of a moto S3 server running in this process."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request; keep failures readable.
    wz = logging.getLogger("werkzeug")
    level = wz.level
    wz.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop()
        wz.setLevel(level)


@pytest.fixture
def make_s3(s3_endpoint: str) -> Callable[..., S3ObjectStore]:
    def make(bucket: str | None = None, **kw: Any) -> S3ObjectStore:
        return S3ObjectStore(s3_endpoint, ACCESS, SECRET, bucket or _bucket(), **kw)

    return make


@pytest.fixture
def raw(s3_endpoint: str) -> Minio:
    """A plain minio client, to look at the server behind the adapter's back."""
    return Minio(s3_endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)


# --- S3 only ----------------------------------------------------------------------------------


async def test_bucket_is_created_on_first_use(
    make_s3: Callable[..., S3ObjectStore], raw: Minio
) -> None:
    bucket = _bucket()
    store = make_s3(bucket)
    assert not raw.bucket_exists(bucket)  # the constructor connects to nothing
    await store.put_bytes("a", b"1")
    assert raw.bucket_exists(bucket)
    # A second store (another replica) on the now existing bucket just uses it.
    assert await make_s3(bucket).get_bytes("a") == b"1"


async def test_two_stores_racing_to_create_the_bucket(
    make_s3: Callable[..., S3ObjectStore],
) -> None:
    bucket = _bucket()
    stores = [make_s3(bucket) for _ in range(4)]
    await asyncio.gather(*(s.put_bytes(f"k{i}", b"v") for i, s in enumerate(stores)))
    assert await stores[0].list() == ["k0", "k1", "k2", "k3"]


async def test_missing_bucket_without_create_is_a_clear_error(
    make_s3: Callable[..., S3ObjectStore], raw: Minio
) -> None:
    bucket = _bucket()
    store = make_s3(bucket, create_bucket=False)
    with pytest.raises(StoreError, match=f"bucket '{bucket}' does not exist"):
        await store.ensure_bucket()
    with pytest.raises(StoreError, match="does not exist"):
        await store.put_bytes("a", b"1")
    with pytest.raises(StoreError, match="does not exist"):
        await store.get_bytes("a")
    assert not raw.bucket_exists(bucket)


async def test_put_bytes_is_one_put(make_s3: Callable[..., S3ObjectStore], raw: Minio) -> None:
    store = make_s3()
    data = os.urandom(7 * MB)  # above minio's 5 MiB default part size
    await store.put_bytes("big.bin", data)
    # A multipart object's ETag ends in -<parts>; a single PUT's is a plain MD5.
    etag = raw.stat_object(store.bucket, "big.bin").etag or ""
    assert "-" not in etag
    assert await store.get_bytes("big.bin") == data


async def test_put_file_large_multipart_round_trip(
    make_s3: Callable[..., S3ObjectStore], raw: Minio, tmp_path: Path
) -> None:
    store = make_s3()
    data = os.urandom(12 * MB)
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(data)
    uri = await store.put_file("adapters/x/adapter.safetensors", src)
    assert uri == f"s3://{store.bucket}/adapters/x/adapter.safetensors"
    etag = raw.stat_object(store.bucket, "adapters/x/adapter.safetensors").etag or ""
    assert etag.endswith("-3"), etag  # 12 MB in 5 MiB parts: a 3-part upload
    got = await store.get_bytes("adapters/x/adapter.safetensors")
    assert len(got) == len(data)
    assert got == data


async def test_put_file_of_a_missing_file(
    make_s3: Callable[..., S3ObjectStore], tmp_path: Path
) -> None:
    store = make_s3()
    with pytest.raises(FileNotFoundError):
        await store.put_file("x", tmp_path / "not-there")
    assert await store.list() == []


async def _poll_while(
    store: S3ObjectStore, key: str, upload: asyncio.Task[str], allowed: list[bytes]
) -> tuple[int, int]:
    """Read ``key`` until ``upload`` is done; every read must be NotFound or one of
    ``allowed``, whole. Returns (reads that found nothing, reads that found an object)."""
    missing = found = 0
    while not upload.done():
        try:
            got = await store.get_bytes(key)
        except NotFoundError:
            missing += 1
            continue
        found += 1
        assert any(got == a for a in allowed), f"partial or mixed object: {len(got)} bytes"
    return missing, found


async def test_reader_never_sees_a_partial_upload(
    make_s3: Callable[..., S3ObjectStore], tmp_path: Path
) -> None:
    store = make_s3()
    data = os.urandom(12 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    await store.put_bytes("warmup", b"")  # bucket created before the race starts

    upload = asyncio.create_task(store.put_file("big.bin", src))
    missing, _found = await _poll_while(store, "big.bin", upload, [data])
    await upload
    assert missing > 0, "the reader never ran while the upload was in progress"
    assert await store.get_bytes("big.bin") == data


# --- failures ---------------------------------------------------------------------------------


def _assert_no_secret(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:  # the message and everything chained to it
        assert SECRET not in str(seen)
        assert SECRET not in repr(seen)
        seen = seen.__cause__ or seen.__context__


@pytest.fixture
def s3_auth(s3_endpoint: str) -> Iterator[tuple[str, str]]:
    """Turn on moto's credential checks for one test; yields a real (access, secret) pair.

    moto accepts any credentials unless told otherwise; the switch is process-wide, so it
    is switched back off however the test ends.
    """
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=f"http://{s3_endpoint}",
        region_name="us-east-1",
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
    )
    user = f"u{uuid.uuid4().hex[:12]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def reset_auth(count: str) -> None:
        req = urllib.request.Request(
            f"http://{s3_endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form type would hide the body
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    reset_auth("0")
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        reset_auth("inf")


async def test_unknown_access_key_is_a_clear_store_error(
    s3_endpoint: str, s3_auth: tuple[str, str]
) -> None:
    store = S3ObjectStore(s3_endpoint, "AKIANOSUCHKEY0000000", SECRET, _bucket())
    with pytest.raises(StoreError) as err:
        await store.put_bytes("a", b"1")
    msg = str(err.value)
    assert "InvalidAccessKeyId" in msg
    assert "check the access key and secret key" in msg
    assert s3_endpoint in msg and store.bucket in msg
    _assert_no_secret(err.value)


async def test_wrong_secret_key_is_a_clear_store_error(
    s3_endpoint: str, s3_auth: tuple[str, str]
) -> None:
    access, _right_secret = s3_auth
    store = S3ObjectStore(s3_endpoint, access, SECRET, _bucket())
    with pytest.raises(StoreError) as err:
        await store.get_bytes("a")
    msg = str(err.value)
    assert "SignatureDoesNotMatch" in msg
    assert "check the access key and secret key" in msg
    assert s3_endpoint in msg and store.bucket in msg
    _assert_no_secret(err.value)


async def test_unreachable_endpoint_is_a_store_error() -> None:
    endpoint = f"127.0.0.1:{_free_port()}"  # nothing listens there
    store = S3ObjectStore(endpoint, ACCESS, SECRET, "some-bucket", max_retries=0)
    for call in (store.put_bytes("a", b"1"), store.get_bytes("a"), store.list()):
        with pytest.raises(StoreError) as err:
            await call
        msg = str(err.value)
        assert msg.startswith(f"cannot reach object store http://{endpoint}, bucket 'some-bucket'")
        assert "refused" in msg.lower()
        _assert_no_secret(err.value)


async def test_endpoint_that_is_not_s3_is_a_store_error() -> None:
    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_HEAD = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        store = S3ObjectStore(endpoint, ACCESS, SECRET, "some-bucket", max_retries=0)
        with pytest.raises(
            StoreError, match=re.escape(f"object store http://{endpoint}, bucket 'some-bucket'")
        ):
            await store.put_bytes("a", b"1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_repr_hides_the_secret() -> None:
    store = S3ObjectStore("127.0.0.1:9000", ACCESS, SECRET, "some-bucket")
    assert SECRET not in repr(store)
    assert "127.0.0.1:9000" in repr(store)


# --- make_object_store -------------------------------------------------------------------------


def test_factory_local(tmp_path: Path) -> None:
    by_url = make_object_store(f"file://{tmp_path}/objs")
    assert isinstance(by_url, LocalObjectStore)
    assert by_url.root == (tmp_path / "objs").resolve()
    by_path = make_object_store(str(tmp_path / "objs"))
    assert isinstance(by_path, LocalObjectStore)
    assert by_path.root == by_url.root


def test_factory_s3_forms() -> None:
    a = make_object_store(
        "s3://datasets", endpoint="minio:9000", access_key=ACCESS, secret_key=SECRET
    )
    assert isinstance(a, S3ObjectStore)
    assert (a.endpoint, a.bucket, a.secure) == ("minio:9000", "datasets", False)

    b = make_object_store(f"https://{ACCESS}:{SECRET.replace('-', '%2D')}@s3.example:443/data")
    assert isinstance(b, S3ObjectStore)
    assert (b.endpoint, b.bucket, b.secure) == ("s3.example:443", "data", True)

    c = make_object_store(
        endpoint="http://minio:9000", bucket="data", access_key=ACCESS, secret_key=SECRET
    )
    assert isinstance(c, S3ObjectStore)
    assert (c.endpoint, c.bucket, c.secure) == ("minio:9000", "data", False)

    d = make_object_store(
        endpoint="minio:9000", bucket="data", access_key=ACCESS, secret_key=SECRET, secure=True
    )
    assert isinstance(d, S3ObjectStore)
    assert d.secure


@pytest.mark.parametrize(
    ("url", "kw", "match"),
    [
        (None, {}, "give a URL"),
        ("s3://data", {"access_key": ACCESS, "secret_key": SECRET}, "needs an endpoint"),
        ("s3://data", {"endpoint": "minio:9000"}, "access key and a secret key"),
        ("http://minio:9000", {"access_key": ACCESS, "secret_key": SECRET}, "no bucket"),
        ("s3://data", {"endpoint": "m:9000", "bucket": "other"}, "disagree"),
        (f"ftp://{ACCESS}:{SECRET}@host/data", {}, "unknown scheme 'ftp'"),
        ("s3://data/some/prefix", {"endpoint": "m:9000"}, "prefix inside the bucket"),
        (f"http://{ACCESS}:{SECRET}@m:9000/data/pre", {}, r"'http://airoboros-test:\*\*\*@m"),
        (None, {"endpoint": f"http://{ACCESS}:{SECRET}@m:9000/x"}, "expected host"),
        (
            "s3://Bad_Bucket",
            {"endpoint": "m:9000", "access_key": ACCESS, "secret_key": SECRET},
            "invalid bucket name",
        ),
    ],
)
def test_factory_errors(url: str | None, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        make_object_store(url, **kw)
    _assert_no_secret(err.value)


async def test_factory_store_round_trip(s3_endpoint: str) -> None:
    store = make_object_store(f"http://{ACCESS}:{SECRET}@{s3_endpoint}/{_bucket()}")
    assert isinstance(store, S3ObjectStore)
    await store.put_bytes("x/y", b"via the factory")
    assert await store.get_bytes("x/y") == b"via the factory"
