"""Notifications' safety lane in a process of its own (`IOPNET_LANES`, issue 10): on
PostgreSQL one process reads only the safety lane (check-ins, the care-team alerts) and
another every other lane, on one database. Each consumes only its own durables, the
alert and the welcome both happen, and an operator's control request about a durable is
answered by the process that reads it, never refused by the other. Two notifications
apps in this process, real nats-server and PostgreSQL (tests/unit/test_lanes.py: who
refuses the split)."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iopnet.testing import BusRecorder, eventually
from services.notifications.app import create_app
from shared.messaging.connection import connect_once
from shared.messaging.control import ConsumerStateRequest, ControlReply, control_subject
from tests.conftest import HttpPeer, SmtpSink, fresh_postgres_database, publish, running
from tests.integration.test_notifications_alerts import ON_CALL, check_in, with_roster
from tests.integration.test_notifications_delivery import Patient, live_settings, wait_mail

pytestmark = pytest.mark.postgres

SAFETY = "notifications-IOP_INTAKE-safety"
ROUTINE = "notifications-IOP_INTAKE"


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with fresh_postgres_database() as url:
        yield url


async def consumer_state(nats_url: str, durable: str) -> ControlReply:
    nc = await connect_once(nats_url)
    try:
        body = ConsumerStateRequest(durable=durable).model_dump_json().encode()
        answer = await nc.request(control_subject("notifications", "consumer_state"), body, timeout=10)
        return ControlReply.model_validate_json(answer.data)
    finally:
        await nc.close()


async def test_the_safety_lane_in_a_process_of_its_own(
    nats_server, tmp_path: Path, postgres_url: str, smtp_sink: SmtpSink, http_peer: HttpPeer, bus: BusRecorder
) -> None:
    def settings(lanes: str):
        return live_settings(nats_server.url, tmp_path / lanes, postgres_url, smtp_sink, http_peer, lanes=lanes)

    routine_app, safety_app = create_app(settings("routine")), create_app(settings("safety"))
    patient = Patient()
    async with running(routine_app) as client, running(safety_app):
        routine, safety = routine_app.state.runtime, safety_app.state.runtime
        assert [c.durable for c in safety.consumers] == [SAFETY]
        durables = {c.durable for c in routine.consumers}
        assert SAFETY not in durables and ROUTINE in durables
        await with_roster(routine_app, nats_server.url, client)
        await publish(nats_server.url, patient.contact, patient.enrolled, patient.consent, check_in(patient, "urgent"))
        await bus.wait_for_event("CareTeamAlerted", timeout=30)
        await wait_mail(smtp_sink, ON_CALL)  # the alert's message, sent
        await wait_mail(smtp_sink, patient.email)  # the welcome, planned by the other process
        # The safety process sends urgent messages only (at most the alert's; the routine
        # process's urgent lane may have taken it first on its tick); the welcome is not its.
        dispatchers = routine_app.state.notifier.dispatcher, safety_app.state.notifier.dispatcher
        assert [d.lanes for d in dispatchers] == [("urgent", "routine"), ("urgent",)]

        async def both_recorded() -> bool:  # a mail is out a moment before it is recorded
            return sum(d.sent for d in dispatchers) == 2

        await eventually(both_recorded, what="the welcome and the alert's message recorded as sent")
        assert dispatchers[1].sent <= 1 and dispatchers[0].sent >= 1
        [lane] = safety.consumers
        assert lane.stats.applied == 1  # the check-in, read by the safety process only
        # Control requests reach one process of each kind; only the one that reads the
        # durable answers (each request to both kinds: 8 in a row, none refused).
        for durable, process in ((SAFETY, safety), (ROUTINE, routine)):
            replies = await asyncio.gather(*(consumer_state(nats_server.url, durable) for _ in range(8)))
            assert all(r.ok and r.durable == durable for r in replies), [r.error for r in replies]
            reader = next(c for c in process.consumers if c.durable == durable)
            assert {r.applied for r in replies} == {reader.stats.applied}
