"""`iopnet events replay`: a consumer whose database lost recent work gets it back from
the stream, and what it had already applied is skipped by its inbox. Nothing is
re-published: other subscribers see no copies."""

from datetime import date
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import delete, func, select

from iopnet.replay import ReplayFailed, replay_events
from iopnet.testing import eventually
from services.scheduling import store
from services.scheduling.app import create_app
from shared.contracts import new_envelope
from shared.contracts.events import PatientEnrolled, SiteRegistered
from shared.messaging.control import subject_matches
from tests.conftest import make_settings, publish, running, stream_count


def enrolled():
    event = PatientEnrolled(patient_id=uuid4(), enrollment_id=uuid4(), program_id="p-1", level_of_care="2.1",
                            cohort="adult", start_date=date(2026, 12, 1), referral_source="self")  # fmt: skip
    return new_envelope(event, site_id="columbus-east")


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, scheduling_database_url=database_url))


async def enrollment_count(app) -> int:
    async with app.state.runtime.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(store.enrollments))).scalar_one())


async def test_replay_restores_lost_work_and_skips_the_rest(app, nats_server) -> None:
    site = new_envelope(SiteRegistered(name="Columbus East", timezone="America/New_York"), site_id="columbus-east")
    first, second = enrolled(), enrolled()
    async with running(app):
        await publish(nats_server.url, site, first, second)

        async def both() -> bool:
            return await enrollment_count(app) == 2

        await eventually(both, what="two enrollments projected")
        # As if the database were restored from a backup taken before the second event.
        async with app.state.runtime.sessions() as session, session.begin():
            lost = second.data["enrollment_id"]
            await session.execute(delete(store.enrollments).where(store.enrollments.c.enrollment_id == lost))
            await session.execute(delete(store.inbox.table).where(store.inbox.table.c.event_id == str(second.event_id)))
        assert await enrollment_count(app) == 1

        consumer = app.state.runtime.consumers[0]
        skipped_before = consumer.stats.skipped_duplicates
        progress = []
        summaries = await replay_events(
            nats_server.url,
            "IOP_INTAKE",
            1,
            subject="iop.intake.patient_enrolled.>",
            services=("scheduling",),
            chunk=2,
            progress=progress.append,
        )
        # Answered only when applied: no waiting needed.
        assert summaries == [{"service": "scheduling", "applied": 1, "duplicates": 1, "not_handled": 0, "failed": []}]
        assert [(p.next_seq, p.last_seq) for p in progress] == [(3, 3), (4, 3)]  # two chunks of two
        assert await enrollment_count(app) == 2
        assert consumer.stats.skipped_duplicates == skipped_before + 1
        # Not re-published: the stream holds the three original events only.
        assert await stream_count(nats_server.url, "IOP_INTAKE") == 3


async def test_replay_says_when_a_consumer_is_not_running(nats_server) -> None:
    await publish(nats_server.url, enrolled())
    with pytest.raises(ReplayFailed, match="scheduling service is not running"):
        await replay_events(nats_server.url, "IOP_INTAKE", 1, services=("scheduling",))


async def test_replay_refuses_other_streams(nats_server) -> None:
    with pytest.raises(ValueError, match="cannot be replayed"):
        await replay_events(nats_server.url, "IOP_DLQ", 1)


@pytest.mark.parametrize(
    ("pattern", "subject", "match"),
    [
        ("iop.intake.>", "iop.intake.patient_enrolled.site-1", True),
        ("iop.intake.*.site-1", "iop.intake.patient_enrolled.site-1", True),
        ("iop.intake.*.site-1", "iop.intake.patient_enrolled.site-2", False),
        ("iop.intake.>", "iop.intake", False),
        ("iop.*", "iop.intake.x.y", False),
    ],
)
def test_subject_matching(pattern: str, subject: str, match: bool) -> None:
    assert subject_matches(pattern, subject) is match
