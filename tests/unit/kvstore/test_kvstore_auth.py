"""kvstore's credentials: the Redis password (a wrong or missing one fails the start clearly) and
the cluster secret it refuses to start without."""

import asyncio
import os
import subprocess
import sys

import pytest

from services.kvstore import server as kvstore_server
from services.kvstore.settings import KVStoreSettings
from services.local_cluster import RedisProcess
from tandem.api import cluster_auth
from tandem.api.cluster_auth import ClusterSecretMissing
from tandem.api.errors import Unauthenticated
from tandem.proto.kvstore.v1 import kvstore_pb2, kvstore_pb2_grpc

PASSWORD = "redis-test-password-42"


@pytest.fixture(scope="module")
def locked_redis():
    server = RedisProcess.start(password=PASSWORD)
    yield server
    server.stop()


def _start(**settings):
    return kvstore_server.start(KVStoreSettings(host="127.0.0.1", port=0, **settings))


def test_redis_with_a_password_works_through_kvstore(locked_redis):
    async def main():
        service = await _start(redis_url=locked_redis.url, redis_password=PASSWORD)
        try:
            async with cluster_auth.aio_channel(f"127.0.0.1:{service.port}", []) as channel:
                resp = await kvstore_pb2_grpc.KVStoreServiceStub(channel).Lookup(
                    kvstore_pb2.LookupRequest(model_fingerprint="f", block_hashes=[b"h" * 16]),
                    timeout=5,
                )
            assert list(resp.matches) == []  # answered: Redis took our password
        finally:
            await service.stop(0)

    asyncio.run(main())


def test_the_password_may_come_in_the_url(locked_redis):
    async def main():
        url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis.port}/0"
        service = await _start(redis_url=url)
        await service.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize("password", [None, "not-the-password"])
def test_a_missing_or_wrong_redis_password_fails_the_start(locked_redis, password, caplog):
    async def main():
        with pytest.raises(Unauthenticated, match="Redis at redis://127.0.0.1") as exc:
            await _start(redis_url=locked_redis.url, redis_password=password)
        return exc

    exc = asyncio.run(main())
    assert PASSWORD not in str(exc.value) and "not-the-password" not in str(exc.value)


def test_the_password_never_reaches_the_log():
    url = f"redis://user:{PASSWORD}@redis:6379/0"
    assert kvstore_server.redacted(url) == "redis://user:***@redis:6379/0"
    assert kvstore_server.redacted("redis://redis:6379/0") == "redis://redis:6379/0"


def test_kvstore_refuses_to_start_without_a_cluster_secret(monkeypatch):
    monkeypatch.delenv(cluster_auth.SECRET_ENV)
    with pytest.raises(ClusterSecretMissing, match="TANDEM_CLUSTER_SECRET"):
        asyncio.run(_start())
    # The command line says why, in one line, and exits non-zero.
    env = {k: v for k, v in os.environ.items() if k != cluster_auth.SECRET_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "kvstore", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "no cluster secret" in done.stderr and "Traceback" not in done.stderr
