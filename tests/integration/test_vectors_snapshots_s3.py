"""airoboros.vectors.IndexSnapshots on the S3 API: moto's server, in-process on loopback
(as tests/integration/test_objects_s3.py runs it)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from airoboros.objects_s3 import S3ObjectStore
from airoboros.vectors import FaissVectorStore, IndexSnapshots

DIM = 32


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

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


async def test_an_approximate_index_round_trips_through_s3(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = S3ObjectStore(s3_endpoint, "k", "s", f"t-{uuid.uuid4().hex[:20]}")
    rng = np.random.default_rng(7)
    data = rng.standard_normal((1200, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    keys = [f"row:{i}" for i in range(len(data))]
    one = FaissVectorStore(DIM, approx_above=1000)
    await one.add("job", keys, data)
    assert await IndexSnapshots(objects).save(one, "job", mark=1200)

    def no_rebuild(*a: object, **kw: object) -> None:
        raise AssertionError("restoring rebuilt the index")

    monkeypatch.setattr("airoboros.vectors.build_approx", no_rebuild)
    two = FaissVectorStore(DIM, approx_above=1000)
    restored = await IndexSnapshots(objects).restore(two, "job")
    assert restored is not None and restored.mark == 1200 and restored.ids == keys
    assert two.is_approximate("job")
    scores, found = await two.search("job", data[[3, 999]], k=1)
    assert found == [["row:3"], ["row:999"]]
    assert scores[:, 0] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert await IndexSnapshots(objects).restore(two, "other-job") is None
