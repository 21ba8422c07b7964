"""Scheduling applies a consumer's batch of enrollments with fewer reads (issue 10), on
SQLite and PostgreSQL: the site and the program of a wave's enrollments are read once per
transaction, a new enrollment is answered by its own INSERT (not read back), the sessions'
booked seats and waitlists are read together, a batch's enrollments and episode ends are
read ahead in one statement each, and what is stored and booked is what reading it again
gives."""

from datetime import timedelta

from services.scheduling import domain, handlers, store, usecases
from shared import clock
from tests.conftest import Statements, running
from tests.integration.test_out_of_order_scheduling import STAFF, app, discharged, enrolled, open_program, places_of

__all__ = ["app"]  # the fixture, shared with the out-of-order tests


async def test_a_batch_of_enrollments_reads_its_site_and_program_once(app, nats_server) -> None:
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        batch = [enrolled(program_id) for _ in range(3)]
        async with app.state.runtime.sessions() as session, session.begin(), Statements(session) as statements:
            statuses = [await usecases.open_enrollment(session, e, e.event(), clock.now()) for e in batch]
        stored = [(await client.get(f"/enrollments/{e.data['enrollment_id']}", headers=STAFF)).json() for e in batch]
        async with app.state.runtime.sessions() as session:
            booked = [len(await store.enrollment_bookings(session, e.data["enrollment_id"])) for e in batch]
    assert statements.reads("sites") == 1
    assert statements.reads("programs") == 1
    # One read per event, to see whether it is new; none after the INSERT that made it.
    assert statements.reads("enrollments") == len(batch)
    # Per enrollment: the sessions' seats and waitlists in one statement. An enrollment
    # projected in this transaction holds no booking yet: its bookings are not read.
    assert statements.reads("bookings") == len(batch)
    # Its program's open sessions are found and locked in one statement; the seats'
    # statement reads them again by key, to count each one's bookings in the index.
    assert statements.reads("sessions") == 2 * len(batch)
    assert statuses == [s["status"] for s in stored] == ["active"] * 3
    assert [s["program_id"] for s in stored] == [program_id] * 3
    assert all(count > 0 for count in booked), "each enrollment was booked (or waitlisted) from what it got back"


async def test_a_program_read_once_is_read_again_after_a_change(app, nats_server) -> None:
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        async with app.state.runtime.sessions() as session, session.begin(), Statements(session) as statements:
            before = await store.get_program(session, program_id)
            assert before is not None
            before["name"] = "changed by a caller"
            assert (await store.get_program(session, program_id) or {}).get("name") == "Adult IOP"
            until = before["materialized_until"] + timedelta(days=7)
            await store.set_materialized_until(session, program_id, until)
            after = await store.get_program(session, program_id)
    assert statements.reads("programs") == 2
    assert after is not None and after["materialized_until"] == until


async def test_a_batch_read_ahead_reads_its_enrollments_and_their_ends_once(app, nats_server) -> None:
    """As the consumer applies a batch: its enrollments and ends read ahead in one
    statement each, and a discharge that comes first in the batch still ends the episode
    it names (what it writes replaces what was read ahead)."""
    async with running(app) as client:
        program_id = await open_program(app, client, nats_server.url)
        batch = [enrolled(program_id) for _ in range(3)]
        ended = discharged(batch[0])
        async with app.state.runtime.sessions() as session, session.begin(), Statements(session) as statements:
            await usecases.read_batch_ahead(session, [ended, *batch])
            await usecases.end_enrollment(
                session, ended, ended.data["enrollment_id"], ended.data["patient_id"],
                domain.EpisodeEnd("discharged", ended.event().discharged_on), clock.now(),
            )  # fmt: skip
            statuses = [await usecases.open_enrollment(session, e, e.event(), clock.now()) for e in batch]
        stored = [(await client.get(f"/enrollments/{e.data['enrollment_id']}", headers=STAFF)).json() for e in batch]
        places = [await places_of(app, e) for e in batch]
    assert statements.reads("enrollments") == 1 and statements.reads("episode_ends") == 2  # ahead, and after the end
    assert statuses == [s["status"] for s in stored] == ["discharged", "active", "active"]
    assert places[0] == [] and all(places[1:]), "the discharged episode holds no place, the others are booked"
    assert handlers.SUBSCRIPTIONS[0].read_ahead is usecases.read_batch_ahead  # the consumer's batches read ahead
