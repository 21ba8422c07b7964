"""A service's PostgreSQL pool (shared.db.create_engine, IOPNET_DB_POOL_SIZE): connections a
burst opened are kept for the next one, no more than the pool's size are ever open, and
each is named after its process in pg_stat_activity."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from iopnet.testing import eventually
from shared.db import DEFAULT_POOL_SIZE, create_engine
from shared.runtime import application_name
from shared.settings import Settings
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.postgres


class Connections:
    """What the pool did: connections opened, and the most held at once."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.opened = 0
        self.held = 0
        self.most_held = 0
        event.listen(engine.sync_engine, "connect", self._opened)
        event.listen(engine.sync_engine.pool, "checkout", self._out)
        event.listen(engine.sync_engine.pool, "checkin", self._in)

    def _opened(self, *_: object) -> None:
        self.opened += 1

    def _out(self, *_: object) -> None:
        self.held += 1
        self.most_held = max(self.most_held, self.held)

    def _in(self, *_: object) -> None:
        self.held -= 1


async def burst(engine: AsyncEngine, size: int) -> None:
    """`size` transactions that all hold a connection at the same moment."""
    together = asyncio.Barrier(size)

    async def one() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            await asyncio.wait_for(together.wait(), timeout=10)

    await asyncio.gather(*(one() for _ in range(size)))


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


async def test_a_burst_as_wide_as_the_benchmarks_clients_reuses_the_connections_of_the_one_before(url: str) -> None:
    # 16 concurrent clients, as `iopnet bench`: with a pool of 10 and 10 of overflow, each
    # burst opened 6 connections and closed them at check-in (73 connects per bench run).
    engine = create_engine(url)
    connections = Connections(engine)
    try:
        await burst(engine, 16)
        assert connections.opened == 16
        for _ in range(3):
            await burst(engine, 16)
        assert connections.opened == 16
        assert engine.sync_engine.pool.checkedin() == 16  # type: ignore[attr-defined]
    finally:
        await engine.dispose()


async def test_work_after_a_burst_takes_the_connection_given_back_last(url: str) -> None:
    """LIFO: one connection at a time goes on being the one that was just used, with its
    prepared statements, not the next of the burst's in turn (cold for this statement)."""
    engine = create_engine(url)
    try:
        await burst(engine, 8)
        backends = []
        for _ in range(6):
            async with engine.connect() as connection:
                backends.append((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        assert len(set(backends)) == 1, backends  # in turn (FIFO) they would be 6 of the 8
    finally:
        await engine.dispose()


async def test_no_more_than_the_pools_size_are_open_at_once_the_others_wait_their_turn(url: str) -> None:
    engine = create_engine(url, pool_size=3)
    connections = Connections(engine)
    release = asyncio.Event()

    async def hold() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            await release.wait()

    try:
        async with asyncio.timeout(20):
            holders = [asyncio.create_task(hold()) for _ in range(12)]
            queue = engine.sync_engine.pool._pool  # type: ignore[attr-defined]

            async def three_held_nine_waiting() -> bool:
                return connections.held == 3 and queue.waiting() == 9

            await eventually(three_held_nine_waiting, what="3 connections held and 9 callers waiting")
            release.set()
            await asyncio.gather(*holders)
        assert connections.most_held == 3
        assert connections.opened == 3
    finally:
        await engine.dispose()


def test_the_pools_size_comes_from_the_environment_and_a_senseless_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IOPNET_DB_POOL_SIZE", raising=False)
    assert Settings().db_pool_size == DEFAULT_POOL_SIZE
    monkeypatch.setenv("IOPNET_DB_POOL_SIZE", "4")
    assert Settings().db_pool_size == 4
    monkeypatch.setenv("IOPNET_DB_POOL_SIZE", "0")
    with pytest.raises(ValueError, match="db_pool_size"):
        Settings()


async def test_a_processs_connections_carry_its_service_and_lanes_in_pg_stat_activity(url: str) -> None:
    """What an operator looking at locks or slow statements needs: whose backend this is."""
    assert application_name("intake", "all") == "iopnet-intake"
    engine = create_engine(url, application_name=application_name("notifications", "safety"))
    try:
        async with engine.connect() as connection:
            named = await connection.scalar(
                text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            )
        assert named == "iopnet-notifications-safety"
    finally:
        await engine.dispose()
