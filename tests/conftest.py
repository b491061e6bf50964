"""Shared fixtures: a real etcd server (Debian's etcd-server), unique names per test run."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aetcd
import pytest
from hypothesis import settings

from integration.etcdserver import EtcdServer

# Hypothesis: "ci" (the default) keeps each property to a few seconds; HYPOTHESIS_PROFILE=long
# runs many more examples (e.g. before a release, or after changing a parser).
settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("long", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Helper modules with asserts of their own: the same detailed failure messages as in tests.
pytest.register_assert_rewrite("tests.labtools")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces and kernel devices")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One real etcd for the whole session; tests isolate themselves with `etcd_prefix`."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A unique flannel prefix per test, so tests sharing a server never see each other's keys."""
    return f"/overlay-test-{uuid.uuid4().hex[:12]}/coreos.com/network"


@pytest.fixture
def etcd_factory() -> Iterator[Callable[..., EtcdServer]]:
    """Private etcd servers for tests that stop, restart or compact the server."""
    servers: list[EtcdServer] = []

    def make(**kwargs: object) -> EtcdServer:
        server = EtcdServer(**kwargs).start()  # type: ignore[arg-type]
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    """The Docker engine of the container labs: the one that answers, or a dockerd started
    for this session (as `lab up --provider containers` starts it) and stopped at its end."""
    from integration.docker_lab import engine_and_starter

    _, started = engine_and_starter()
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            started.wait(timeout=60)


@pytest.fixture
def unique() -> str:
    """A short unique token for names of namespaces, links and files (kernel names <= 15 chars)."""
    return uuid.uuid4().hex[:6]


def raw_client(server: EtcdServer) -> aetcd.Client:
    host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    return aetcd.Client(host=host, port=int(port), timeout=5)


@pytest.fixture
async def raw(etcd_server: EtcdServer, etcd_prefix: str) -> AsyncIterator[aetcd.Client]:
    """aetcd's own client, to check and disturb etcd independently of the code under test.

    Deletes the test's prefix at the end.
    """
    client = raw_client(etcd_server)
    await client.connect()
    try:
        yield client
    finally:
        await client.delete_prefix(etcd_prefix.encode())
        await client.close()
