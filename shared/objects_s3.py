"""S3-compatible object store (MinIO, AWS S3, Ceph RGW, ...) through the ``minio`` client,
and ``make_object_store``, which picks the object store adapter from configuration.

The deployed services keep exported datasets and trained adapters here; the embedded
default is ``airoboros.objects.LocalObjectStore``. Both honour the same contract
(``airoboros.ports.ObjectStore``): a reader never sees a partially written object.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE, MIN_PART_SIZE, check_bucket_name

from airoboros.errors import ConfigError, NotFoundError, ObjectStoreUnavailable, StoreError
from airoboros.objects import LocalObjectStore

T = TypeVar("T")

#: S3 error codes that mean the credentials (not the request) are wrong.
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
#: Codes with which a create-bucket call loses a race to another process of ours.
_BUCKET_CREATED_ELSEWHERE = frozenset({"BucketAlreadyOwnedByYou"})
_MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes


def _check_key(key: str) -> None:
    """Reject keys that the local store would resolve differently (``a//b``, ``./a``,
    ``../a``, ``/a``) or that S3 refuses, so that a key valid on one adapter is valid,
    and names the same object, on the other."""
    if not key:
        raise ValueError("object key must not be empty")
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ValueError(f"object key longer than {_MAX_KEY_BYTES} bytes: {key[:60]!r}...")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"object key {key!r} has an empty, '.' or '..' segment (or a leading or "
            "trailing '/'): such keys would name a different object, or none, in a "
            "local store"
        )


class S3ObjectStore:
    """Objects in one bucket of an S3-compatible server.

    Contract (``airoboros.ports.ObjectStore``), as S3 provides it:

    - ``put_bytes`` sends the object in one PUT request; ``put_file`` sends large files as
      a multipart upload. S3 makes an object visible only once its PUT, or the
      CompleteMultipartUpload of its parts, has succeeded, and replaces an existing object
      in one step, so a concurrent reader sees the old object (or none) until then and the
      whole new object after: never a partial one. An interrupted multipart upload leaves
      invisible parts behind, which a bucket lifecycle rule
      (AbortIncompleteMultipartUpload) should clean up.
    - ``get_bytes`` of a missing key raises ``NotFoundError``; ``delete`` of a missing key
      is not an error.
    - Keys are ``/``-separated, non-empty, without empty, ``.`` or ``..`` segments
      (``ValueError`` otherwise), the same keys ``LocalObjectStore`` accepts.
    - Every failure of the server or the network raises ``StoreError``, whose message names
      the endpoint and the bucket (never the secret key). Wrong credentials and a missing
      bucket get messages of their own.

    With ``create_bucket`` the bucket is created on first use if it does not exist; without
    it a missing bucket is a ``StoreError`` (a misconfiguration, reported rather than read
    as "no objects"; only ``exists`` may answer False, as S3's HEAD cannot tell the two
    apart). Nothing connects in the constructor.

    The ``minio`` client is blocking and thread-safe: each call runs in a worker thread
    (``asyncio.to_thread``), so the event loop stays live during long transfers.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        *,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 300.0,
        max_retries: int = 3,
    ) -> None:
        """``endpoint`` is ``host[:port]`` (no scheme: ``secure`` chooses https).

        ``max_retries`` bounds urllib3's retries of connection errors and 5xx answers to
        idempotent requests; ``connect_timeout``/``read_timeout`` are per request, in
        seconds. Raises ``ValueError`` for an invalid bucket name or endpoint.
        """
        check_bucket_name(bucket, strict=True)
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        self.region = region
        self.create_bucket = create_bucket
        # Our own pool instead of minio's default, whose 5-minute connect timeout and 5
        # retries with backoff would hold a worker for minutes on a dead endpoint.
        # maxsize matches asyncio's default thread pool, so concurrent calls don't churn
        # connections ("connection pool is full, discarding connection").
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=32,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=max_retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._bucket_ready = False
        # A threading lock, not an asyncio one: the check runs in worker threads, and the
        # store may outlive the event loop it was first used from.
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        # Spelled out so that the secret key never lands in a log line or a traceback.
        return f"S3ObjectStore(endpoint={self._where()!r}, bucket={self.bucket!r})"

    def _where(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def uri(self, key: str) -> str:
        """The object's address, ``s3://<bucket>/<key>`` (what ``put_bytes`` returns)."""
        return f"s3://{self.bucket}/{key}"

    # --- plumbing -------------------------------------------------------------------------

    def _error(self, op: str, key: str | None, exc: Exception) -> StoreError:
        what = f"{op} {key!r}" if key is not None else op
        where = f"object store {self._where()}, bucket {self.bucket!r}"
        if isinstance(exc, S3Error):
            if exc.code in _AUTH_CODES:
                return StoreError(
                    f"{where}: {what} was refused ({exc.code}): check the access key and "
                    "secret key, and that they may use this bucket"
                )
            if exc.code == "NoSuchBucket":
                return self._missing_bucket()
            return StoreError(f"{where}: {what} failed: {exc.code}: {exc.message}")
        if isinstance(exc, InvalidResponseError | ServerError):
            return StoreError(f"{where}: {what} failed: unexpected answer from server: {exc}")
        if isinstance(exc, urllib3.exceptions.MaxRetryError):
            if isinstance(exc.reason, urllib3.exceptions.ResponseError):
                # Reached, but it kept answering 5xx through every retry.
                return ObjectStoreUnavailable(f"{where}: {what} failed: server error: {exc.reason}")
            return ObjectStoreUnavailable(f"cannot reach {where}: {what} failed: {exc.reason}")
        return StoreError(f"{where}: {what} failed: {type(exc).__name__}: {exc}")

    def _missing_bucket(self) -> StoreError:
        return StoreError(
            f"object store {self._where()}: bucket {self.bucket!r} does not exist; create "
            "it, or let the store create it (create_bucket=True)"
        )

    def _ensure_bucket(self) -> None:
        if self._bucket_ready or not self.create_bucket:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket, location=self.region)
                except S3Error as exc:
                    # Another replica created it between our check and our create.
                    if exc.code not in _BUCKET_CREATED_ELSEWHERE:
                        raise
            self._bucket_ready = True

    def _guarded(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run ``fn`` (blocking) after making sure the bucket exists; minio and urllib3
        errors become ``StoreError``. Our own errors (``NotFoundError``) pass through."""
        try:
            self._ensure_bucket()
            try:
                return fn()
            except S3Error as exc:
                if exc.code != "NoSuchBucket" or not self.create_bucket:
                    raise
                # The bucket went away under us (a restarted MinIO without its volume):
                # make it again, once, rather than fail every call until a restart.
                self._bucket_ready = False
                self._ensure_bucket()
                return fn()
        except (MinioException, urllib3.exceptions.HTTPError) as exc:
            raise self._error(op, key, exc) from exc

    async def _run(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._guarded, op, key, fn)

    async def ensure_bucket(self) -> None:
        """Connect, and create the bucket if allowed and missing; a composition root may
        call this at start to fail fast on a wrong endpoint or credentials. Raises
        ``StoreError``."""

        def check() -> None:
            if not self.create_bucket and not self._client.bucket_exists(self.bucket):
                raise self._missing_bucket()

        await self._run("checking the bucket", None, check)

    # --- the port ---------------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` in a single PUT, replacing any object there, and
        return ``s3://<bucket>/<key>``. The object becomes visible only once the whole body
        has arrived, so readers see either the previous object (or none) or all of
        ``data``."""
        _check_key(key)
        # One part as large as the data (S3 accepts 5 MiB to 5 GiB per part), so minio
        # sends one PUT rather than a multipart upload. Beyond 5 GiB it has to go
        # multipart, which is just as atomic.
        part_size = min(max(len(data), MIN_PART_SIZE), MAX_PART_SIZE)

        def put() -> None:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), part_size=part_size
            )

        await self._run("put", key, put)
        return self.uri(key)

    async def put_file(self, key: str, path: str | Path) -> str:
        """Upload the local file at ``path`` under ``key`` (multipart above 5 MiB, parts in
        parallel), without reading it into memory; returns ``s3://<bucket>/<key>``. The
        object becomes visible only when the upload completes, whole, as with
        ``put_bytes``. A missing or unreadable file raises ``OSError`` before anything is
        sent."""
        _check_key(key)
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no file to upload at {p}")

        def put() -> None:
            self._client.fput_object(self.bucket, key, str(p))

        await self._run("put", key, put)
        return self.uri(key)

    async def get_bytes(self, key: str) -> bytes:
        """The whole object; ``NotFoundError`` if there is none under ``key``."""
        _check_key(key)

        def get() -> bytes:
            try:
                response = self._client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    raise NotFoundError(f"no object {key!r} in {self.uri('')}") from exc
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._run("get", key, get)

    async def exists(self, key: str) -> bool:
        _check_key(key)

        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return False
                raise
            return True

        return await self._run("stat", key, stat)

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error (S3 answers 204 either way)."""
        _check_key(key)
        await self._run("delete", key, lambda: self._client.remove_object(self.bucket, key))

    # Last in the class, so that ``list[...]`` above still means the builtin.
    async def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (plain string prefix, not a folder), sorted."""

        def names() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return sorted(o.object_name for o in objects if o.object_name and not o.is_dir)

        return await self._run("list", prefix, names)


# --- choosing an adapter ----------------------------------------------------------------------


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _split_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """``http(s)://host:port`` or ``host:port`` -> (``host:port``, secure)."""
    if "://" not in endpoint:
        return endpoint.rstrip("/"), secure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise ConfigError(
            [
                f"object store endpoint: expected host[:port] or http(s)://host[:port], got {_redact(endpoint)!r}"
            ]
        )
    return parts.netloc, parts.scheme == "https"


def _pick(name: str, from_url: str | None, given: str | None) -> str | None:
    if from_url and given and from_url != given:
        raise ConfigError(
            [f"object store: the URL and the {name} argument disagree ({from_url!r} vs {given!r})"]
        )
    return from_url or given


def make_object_store(
    url: str | None = None,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    bucket: str | None = None,
    secure: bool = False,
) -> LocalObjectStore | S3ObjectStore:
    """The object store that ``url`` (the ``object_store_url`` setting) names.

    - ``file:///path`` or a plain path: ``LocalObjectStore`` on that folder.
    - ``s3://<bucket>``: ``S3ObjectStore`` on that bucket at ``endpoint``.
    - ``http(s)://[access:secret@]host[:port]/<bucket>``: ``S3ObjectStore`` at that server
      (https means ``secure``); credentials in the URL are percent-decoded.
    - no ``url``: ``S3ObjectStore`` at ``endpoint`` (``host:port`` or ``http(s)://host:port``)
      on ``bucket``.

    Keyword arguments fill in what the URL leaves out; where both give a value they must
    agree. Raises ``ConfigError`` (naming what is missing or wrong, never the secret) when
    neither a URL nor an endpoint is given, the URL's scheme is unknown, or an S3 store
    lacks a bucket or credentials. Connects to nothing.
    """
    u_endpoint: str | None = None
    u_bucket: str | None = None
    u_access: str | None = None
    u_secret: str | None = None
    if url:
        parts = urlsplit(url)
        # One letter is a Windows drive (C:\data), not a scheme.
        if parts.scheme == "file" or len(parts.scheme) <= 1:
            return LocalObjectStore.from_url(url)
        if parts.scheme == "s3":
            if parts.path.strip("/"):
                raise ConfigError(
                    [
                        f"object store URL {_redact(url)!r}: a prefix inside the bucket is not supported"
                    ]
                )
            u_bucket = parts.netloc or None
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise ConfigError([f"object store URL {_redact(url)!r}: no host"])
            host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
            u_endpoint = f"{host}:{parts.port}" if parts.port else host
            secure = parts.scheme == "https"
            path = parts.path.strip("/")
            if "/" in path:
                raise ConfigError(
                    [
                        f"object store URL {_redact(url)!r}: a prefix inside the bucket is not supported"
                    ]
                )
            u_bucket = path or None
            u_access = unquote(parts.username) if parts.username else None
            u_secret = unquote(parts.password) if parts.password else None
        else:
            raise ConfigError(
                [
                    f"object store URL: unknown scheme {parts.scheme!r}; use file://, s3:// "
                    "(with an endpoint), or http(s)://host:port/bucket"
                ]
            )
    elif not endpoint:
        raise ConfigError(["object store: give a URL (file://... or s3://...) or an endpoint"])

    if endpoint:
        endpoint, secure_from_endpoint = _split_endpoint(endpoint, secure)
        if u_endpoint is None:
            secure = secure_from_endpoint
    ep = _pick("endpoint", u_endpoint, endpoint)
    bk = _pick("bucket", u_bucket, bucket)
    ak = _pick("access key", u_access, access_key)
    sk = u_secret or secret_key  # never compared in a message: it is the secret
    if not ep or not bk or not ak or not sk:
        problems = []
        if not ep:
            problems.append("object store: an s3:// URL needs an endpoint (host:port)")
        if not bk:
            problems.append("object store: no bucket given")
        if not ak or not sk:
            problems.append("object store: an S3 endpoint needs an access key and a secret key")
        raise ConfigError(problems)
    try:
        return S3ObjectStore(ep, ak, sk, bk, secure=secure)
    except ValueError as exc:
        raise ConfigError([f"object store: {exc}"]) from exc
