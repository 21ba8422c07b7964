"""Care-team alerts against a real nats-server, a real database (SQLite and PostgreSQL), a
real SMTP server and a real HTTP server: an urgent check-in reaches the on-call first at
once, escalates along the roster until acknowledged (driven with an explicit `now`),
elevated risk and treatment-hours alerts wait for business hours, missed sessions lead
to a "we missed you" and after two in a row to an alert; webhook subscriptions receive
signed events and are retried; the roster, settings and alert APIs are scoped by site."""

import asyncio
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select, text

from iopnet.testing import BusRecorder, eventually
from services.notifications import domain, store, usecases
from services.notifications.app import create_app
from shared.contracts import Envelope, new_envelope
from shared.contracts.events import (
    CheckInSubmitted,
    HoursAtRisk,
    PatientEnrolled,
    SessionScheduled,
    WeeklyHoursShortfall,
)
from tests.conftest import Checkouts, HttpPeer, SmtpSink, auth, publish, routine_transaction, running
from tests.integration.test_notifications_delivery import (
    SITE,
    TZ,
    Patient,
    live_settings,
    onboard,
    publish_and_settle,
    register_integration,
    register_site,
    rows,
    wait_mail,
    wait_rows,
)

ADMIN = auth("site_admin", [SITE])
CLINICIAN = auth("clinician", [SITE])
ON_CALL = "oncall@clinic.test"
BACKUP_PHONE = "+16145550199"
LAST = "director@clinic.test"
ROSTER = {
    "members": [
        {"name": "Dr. First", "role": "clinician", "channel": "email", "address": ON_CALL},
        {"name": "Nurse Second", "role": "nurse", "channel": "sms", "address": BACKUP_PHONE},
        {"name": "Director Third", "role": "site_admin", "channel": "email", "address": LAST, "language": "es"},
    ]
}


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer):
    return create_app(live_settings(nats_server.url, tmp_path, database_url, smtp_sink, http_peer))


def check_in(patient: Patient, risk: str, check_in_id=None) -> Envelope:
    event = CheckInSubmitted(
        check_in_id=check_in_id or uuid4(), patient_id=patient.patient_id, enrollment_id=patient.enrollment_id,
        submitted_at=datetime.now(UTC), mood=2, craving=9, used_since_last=True, safety_concern=risk == "urgent",
        risk=risk,
    )  # fmt: skip
    return new_envelope(event, site_id=patient.site_id)


async def with_roster(app, nats_url: str, client, roster: dict = ROSTER) -> list[dict]:
    await register_site(app, nats_url)
    response = await client.put(f"/sites/{SITE}/care-team", json=roster, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["members"]


async def escalate(app, now: datetime) -> list[str]:
    notifier = app.state.notifier
    async with app.state.runtime.sessions() as session, session.begin():
        escalated = await usecases.escalate_alerts(session, notifier.policy, now)
        notifier.dispatcher.wake_after_commit(session)
    return escalated


# --- urgent check-ins and escalation ------------------------------------------------------------------


async def test_urgent_check_in_reaches_the_on_call_first_at_once(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)  # alerts need no patient consent
        cause = check_in(patient, "urgent")
        await publish_and_settle(app, nats_server.url, cause)
        [mail] = await wait_mail(smtp_sink, ON_CALL)
        assert mail["subject"] == domain.SUBJECTS["care_urgent"]["en"]
        assert patient.id in mail["text"]
        assert patient.email not in mail["text"]
        [alerted] = await bus.wait_for_event("CareTeamAlerted")
        envelope = alerted.envelope()
        assert envelope["causation_id"] == str(cause.event_id)
        assert envelope["correlation_id"] == str(cause.correlation_id)
        assert (envelope["data"]["reason"], envelope["data"]["severity"]) == ("urgent_check_in", "urgent")
        alert_id = envelope["data"]["alert_id"]
        assert alert_id in mail["text"]

        async def recorded_sent() -> list[dict] | None:  # the mail is out a moment before it is recorded
            listed = await client.get("/alerts", params={"status": "open"}, headers=CLINICIAN)
            assert listed.status_code == 200
            alerts = listed.json()
            return alerts if [m["status"] for a in alerts for m in a["messages"]] == ["sent"] else None

        [alert] = await eventually(recorded_sent, what="the alert's message recorded as sent")
        assert (alert["alert_id"], alert["level"], alert["severity"]) == (alert_id, 0, "urgent")
        assert (await client.get("/alerts", params={"status": "acknowledged"}, headers=CLINICIAN)).json() == []
        assert (await client.get("/alerts", headers=auth("clinician", ["dayton-north"]))).json() == []
        assert (await client.get("/alerts", headers=auth("front_desk", [SITE]))).status_code == 403
        assert http_peer.posts("/sms") == []  # the backup is not paged yet


async def test_an_urgent_check_in_is_alerted_while_a_wave_of_enrollments_still_waits(
    app, nats_server, bus: BusRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, safety first: check-ins have a lane of their own (and the priority gate
    makes a routine batch in progress yield), so an urgent one does not wait behind a
    backlog of enrollments on the same stream."""
    patient = Patient()
    wave = [Patient().enrolled for _ in range(60)]
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)
        [routine] = [c for c in app.state.runtime.consumers if c.durable == "notifications-IOP_INTAKE"]
        original = routine.subscription.handlers[PatientEnrolled]

        async def slow_enrollment(session, envelope, event) -> None:
            await asyncio.sleep(0.05)  # the work itself: the wave takes 3 s to apply
            await original(session, envelope, event)

        monkeypatch.setitem(routine.subscription.handlers, PatientEnrolled, slow_enrollment)
        applied_before = routine.stats.applied
        await publish(nats_server.url, *wave)

        async def wave_started() -> bool:
            return routine.stats.applied > applied_before  # the first alone, the rest in one batch now

        await eventually(wave_started, what="the enrollment wave under way")
        await publish(nats_server.url, check_in(patient, "urgent"))
        await bus.wait_for_event("CareTeamAlerted", timeout=30)
        behind = routine.stats.applied - applied_before
        assert behind < len(wave), "the alert waited for the whole enrollment wave"

        async def wave_done() -> bool:
            return routine.stats.applied - applied_before == len(wave)

        await eventually(wave_done, timeout=60, what="the rest of the wave, in order, after the alert")


class HoldsWelcomes:
    """The email channel, with the welcomes held until `release` (a slow provider)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.release = asyncio.Event()
        self.held = 0

    async def send(self, message):
        if message.template == "welcome":
            self.held += 1
            await self.release.wait()
        return await self.inner.send(message)


async def test_the_care_team_is_messaged_while_a_round_of_welcomes_is_under_way(
    app, nats_server, smtp_sink: SmtpSink
) -> None:
    """Issue 10, safety first, the last stage: the care team's urgent message has a
    dispatcher lane of its own (woken by the alert's commit, its own claims, records and
    send slots). Before, it waited for the round of routine messages under way to end:
    under the bench's enrollment wave, 0.5-2.4 s between the alert and the on-call's
    message; here, with the round's welcomes stuck at the provider, it never went."""
    patients = [Patient() for _ in range(12)]
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        dispatcher = app.state.notifier.dispatcher
        channel = HoldsWelcomes(dispatcher.channels["email"])
        dispatcher.channels["email"] = channel
        await publish_and_settle(
            app, nats_server.url, *[e for p in patients for e in (p.contact, p.enrolled, p.consent)]
        )

        async def stuck() -> bool:
            return channel.held > 0

        await eventually(stuck, what="a round of welcomes stuck at the provider")
        await publish(nats_server.url, check_in(patients[0], "urgent"))
        [mail] = await wait_mail(smtp_sink, ON_CALL)
        assert mail["subject"] == domain.SUBJECTS["care_urgent"]["en"]
        assert smtp_sink.to(patients[0].email) == []  # the welcomes are still held
        channel.release.set()
        for patient in patients:
            await wait_mail(smtp_sink, patient.email)


async def test_routine_check_ins_do_not_hold_the_enrollment_wave_back(
    app, nats_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a check-in that alerts is safety work: a stream of low-risk check-ins rides
    the safety lane without pressing the priority gate, so the routine lane keeps its
    batches (with every check-in pressing, each routine batch stopped after one event)."""
    patient = Patient()
    wave = [Patient().enrolled for _ in range(40)]
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)
        consumers = {c.durable: c for c in app.state.runtime.consumers}
        routine, safety = consumers["notifications-IOP_INTAKE"], consumers["notifications-IOP_INTAKE-safety"]
        for lane, event_type in ((routine, PatientEnrolled), (safety, CheckInSubmitted)):
            original = lane.subscription.handlers[event_type]

            async def slow(session, envelope, event, original=original) -> None:
                await asyncio.sleep(0.05)  # the work itself: each lane is busy for 2 s
                await original(session, envelope, event)

            monkeypatch.setitem(lane.subscription.handlers, event_type, slow)
        # Batches bounded by work alone, not by time, so that only a yield cuts them short.
        monkeypatch.setattr(routine, "transaction_budget_seconds", 60.0)
        applied, transactions = routine.stats.applied, routine.stats.transactions
        pressed = []
        original_urgent = app.state.runtime.gate.urgent

        def urgent():
            pressed.append(True)
            return original_urgent()

        monkeypatch.setattr(app.state.runtime.gate, "urgent", urgent)
        await publish(nats_server.url, *[check_in(patient, "low") for _ in range(40)], *wave)

        async def wave_done() -> bool:
            return routine.stats.applied - applied == len(wave)

        await eventually(wave_done, timeout=60, what="the enrollment wave")
        assert pressed == [], "a low-risk check-in pressed the priority gate"
        # The first alone, the rest in few batches: not one transaction per enrollment.
        assert routine.stats.transactions - transactions <= 10
        await publish(nats_server.url, check_in(patient, "urgent"))

        async def alerted() -> bool:
            return bool(pressed)

        await eventually(alerted, what="the urgent check-in pressing the gate")


async def test_the_safety_lane_is_first_in_line_for_the_database(
    nats_server, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    """On SQLite a service has one connection. A check-in, even a low-risk one that holds
    nothing back, takes it before the routine transactions already waiting for it (the
    pool's line, shared/priority.py); before, it waited behind all of them, and an urgent
    check-in fetched after it waited too."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'notifications.db'}"
    # The dispatcher's urgent lane, safety work too, looks for due messages at every tick:
    # with the suite's 0.2 s tick it queued for the connection beside the check-in in 1
    # run of 8, and the test could not tell which was waiting. Here it runs only when a
    # commit wakes it (nothing urgent is planned).
    app = create_app(
        live_settings(nats_server.url, tmp_path, database, smtp_sink, http_peer, notify_dispatch_tick_seconds=3600.0)
    )
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)
        runtime = app.state.runtime
        pool = runtime.engine.sync_engine.pool
        [safety] = [c for c in runtime.consumers if c.durable == "notifications-IOP_INTAKE-safety"]
        applied = safety.stats.applied
        checkouts = Checkouts(pool)
        async with runtime.sessions() as holder, holder.begin():
            await holder.execute(text("SELECT 1"))  # the one connection is taken
            routine = [
                asyncio.create_task(routine_transaction(runtime.sessions), name=f"routine {n}") for n in range(3)
            ]

            async def all_waiting() -> bool:
                return pool._pool.waiting(safety_work=False) >= len(routine)

            await eventually(all_waiting, what="routine transactions waiting for the connection")
            await publish(nats_server.url, check_in(patient, "low"))

            async def check_in_waiting() -> bool:
                return pool._pool.waiting(safety_work=True) == 1

            await eventually(check_in_waiting, what="the check-in waiting for the connection")
            checkouts.start()
        async with asyncio.timeout(10):
            await asyncio.gather(*routine)

        async def check_in_applied() -> bool:
            return safety.stats.applied > applied

        await eventually(check_in_applied, what="the check-in applied")
        checkouts.stop()
        # Before every routine transaction that was waiting (the dispatcher's urgent lane,
        # safety work too, may take its turn among the first as well).
        routine_turns = [checkouts.names.index(task.get_name()) for task in routine]
        assert checkouts.names.index(safety.durable) < min(routine_turns), checkouts.names


async def raise_urgent(app, session, patient: Patient, cause: Envelope, now: datetime) -> str | None:
    policy, key = app.state.notifier.policy, f"check_in:{cause.event_id}"
    return await usecases.raise_alert(
        session, policy, reason="urgent_check_in", site_id=SITE, patient_id=patient.id, cause=cause, dedupe_key=key,
        now=now,
    )  # fmt: skip


async def test_an_urgent_alert_is_raised_in_five_statements_and_once(app, nats_server) -> None:
    """Issue 10, the safety path: the roster is read first, so the alert is written once
    with its level and escalation timer (one INSERT … ON CONFLICT on its dedupe key), then
    the on-call's message, the event and its webhook fan-out: five statements, nine before.
    Raised again for the same cause, it adds nothing."""
    patient = Patient()
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    async with running(app) as client:
        members = await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)
        cause = check_in(patient, "urgent")
        now = datetime.now(UTC)
        raised = []
        for _ in range(2):
            async with app.state.runtime.sessions() as session, session.begin():
                ours = (await session.connection()).sync_connection  # not the dispatcher's
                event.listen(ours, "before_cursor_execute", count)
                try:
                    raised.append(await raise_urgent(app, session, patient, cause, now))
                finally:
                    event.remove(ours, "before_cursor_execute", count)
            if raised[0] and len(raised) == 1:
                assert len(statements) <= 5, "\n".join(s.split("\n")[0][:90] for s in statements)
        async with app.state.runtime.sessions() as session:
            query = select(store.alerts).where(store.alerts.c.alert_id == raised[0])
            [alert] = (await session.execute(query)).mappings().all()
        messages = await rows(app, alert_id=raised[0])
    assert raised[0] is not None and raised[1] is None
    assert (alert["level"], alert["status"]) == (0, "open")
    assert alert["escalate_at"] is not None
    assert [(m["recipient"], m["urgent"]) for m in messages] == [
        (domain.recipient_key("staff", members[0]["member_id"]), True)
    ]


async def test_unacknowledged_alert_escalates_along_the_roster(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        await wait_mail(smtp_sink, ON_CALL)
        [alert] = (await client.get("/alerts", headers=CLINICIAN)).json()
        raised = datetime.fromisoformat(alert["created_at"])

        assert await escalate(app, raised + timedelta(minutes=9)) == []  # not overdue yet (10 min)
        assert await escalate(app, raised + timedelta(minutes=11)) == [alert["alert_id"]]

        async def paged():
            return http_peer.posts("/sms", status=200)

        [page] = await eventually(paged, what="the backup paged by SMS")
        document = json.loads(page["body"])
        assert document["to"] == BACKUP_PHONE
        assert "escalated" in document["body"] and alert["alert_id"] in document["body"]
        escalations = await bus.wait_for(
            lambda m: "care_team_alerted" in m.subject and m.envelope()["data"]["reason"] == "escalated"
        )
        assert escalations[0].envelope()["data"]["alert_id"] == alert["alert_id"]

        assert await escalate(app, raised + timedelta(minutes=22)) == [alert["alert_id"]]
        [last] = await wait_mail(smtp_sink, LAST)
        assert last["subject"] == domain.SUBJECTS["care_urgent"]["es"]
        assert await escalate(app, raised + timedelta(minutes=40)) == []  # nobody left on the roster
        current = (await client.get(f"/alerts/{alert['alert_id']}", headers=CLINICIAN)).json()
        assert (current["status"], current["level"], current["escalate_at"]) == ("open", 2, None)
        assert [m["template"] for m in current["messages"]] == [
            "care_urgent_check_in",
            "care_escalated",
            "care_escalated",
        ]


async def test_acknowledgement_stops_escalation(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink, http_peer: HttpPeer
) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        await wait_mail(smtp_sink, ON_CALL)
        [alert] = (await client.get("/alerts", headers=CLINICIAN)).json()
        path = f"/alerts/{alert['alert_id']}/acknowledge"
        assert (await client.post(path, headers=auth("clinician", ["dayton-north"]))).status_code == 404
        assert (await client.post(path, headers=auth("front_desk", [SITE]))).status_code == 403
        assert (await client.post(f"/alerts/{uuid4()}/acknowledge", headers=CLINICIAN)).status_code == 404
        acked = await client.post(path, headers=CLINICIAN)
        assert acked.status_code == 200, acked.text
        assert (acked.json()["status"], acked.json()["acknowledged_by"], acked.json()["escalate_at"]) == (
            "acknowledged", "tester", None,
        )  # fmt: skip
        again = await client.post(path, headers=CLINICIAN)
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "conflict"

        raised = datetime.fromisoformat(alert["created_at"])
        assert await escalate(app, raised + timedelta(minutes=30)) == []
        assert http_peer.posts("/sms") == []
        assert len(bus.events("CareTeamAlerted")) == 1
        assert [a["alert_id"] for a in (await client.get("/alerts?status=acknowledged", headers=CLINICIAN)).json()] == [
            alert["alert_id"]
        ]


async def test_a_redelivered_check_in_alerts_once(app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        cause = check_in(patient, "urgent")
        await publish_and_settle(app, nats_server.url, cause)
        await publish_and_settle(app, nats_server.url, cause, msg_id_prefix="replay-")
        # The same check-in announced again under a new event id.
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent", cause.data["check_in_id"]))
        await wait_mail(smtp_sink, ON_CALL)
        assert len((await client.get("/alerts", headers=CLINICIAN)).json()) == 1
        assert len(smtp_sink.to(ON_CALL)) == 1
        assert len(bus.events("CareTeamAlerted")) == 1


# --- non-urgent alerts: business hours ------------------------------------------------------------------


async def test_elevated_and_hours_alerts_wait_for_business_hours_but_urgent_ones_do_not(
    nats_server, database_url: str, tmp_path: Path, smtp_sink: SmtpSink, http_peer: HttpPeer, bus: BusRecorder
) -> None:
    # Business hours that open two hours from now (site time), and quiet hours now.
    wall = datetime.now(ZoneInfo(TZ))
    opens, closes = wall + timedelta(hours=2), wall + timedelta(hours=3)
    closing = closes.strftime("%H:%M") if closes.time() > opens.time() else "23:59"  # no window across midnight
    settings = live_settings(
        nats_server.url, tmp_path, database_url, smtp_sink, http_peer,
        notify_business_start=opens.strftime("%H:%M"), notify_business_end=closing,
        notify_quiet_start=(wall - timedelta(hours=1)).strftime("%H:%M"),
        notify_quiet_end=(wall + timedelta(hours=1)).strftime("%H:%M"),
    )  # fmt: skip
    app = create_app(settings)
    patient = Patient()
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        week = datetime.now(UTC).strftime("%G-W%V")
        at_risk = HoursAtRisk(
            patient_id=patient.patient_id, enrollment_id=patient.enrollment_id, iso_week=week,
            attended_hours=2.0, remaining_booked_hours=3.0, target_hours=9.0,
        )  # fmt: skip
        shortfall = WeeklyHoursShortfall(
            patient_id=patient.patient_id, enrollment_id=patient.enrollment_id, iso_week=week,
            attended_hours=5.0, target_hours=9.0,
        )  # fmt: skip
        await publish_and_settle(
            app,
            nats_server.url,
            check_in(patient, "elevated"),
            new_envelope(at_risk, site_id=SITE),
            new_envelope(shortfall, site_id=SITE),
            check_in(patient, "low"),
        )
        waiting = await rows(app, recipient_kind="care_team")
        assert sorted(r["template"] for r in waiting) == [
            "care_elevated_check_in",
            "care_hours_at_risk",
            "care_weekly_shortfall",
        ]
        for row in waiting:
            assert row["status"] == "pending"
            assert row["due_at"].astimezone(ZoneInfo(TZ)).strftime("%H:%M") == opens.strftime("%H:%M")
        severities = sorted(m.envelope()["data"]["severity"] for m in bus.events("CareTeamAlerted"))
        assert severities == ["info", "info", "warning"]

        # An urgent check-in goes out at once: quiet hours and business hours do not hold it.
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        [mail] = await wait_mail(smtp_sink, ON_CALL)
        assert "URGENT" in mail["text"]
        assert len(smtp_sink.mails) == 1  # the patient's welcome waits for the quiet hours to end


# --- attendance follow-ups ---------------------------------------------------------------------------------


async def test_missed_you_then_two_absences_alert_the_care_team(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink
) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        await wait_mail(smtp_sink, patient.email)  # welcome
        now = datetime.now(UTC)
        sessions = []
        for days in (3, 2, 1):
            session_id = uuid4()
            starts = now - timedelta(days=days)
            scheduled = SessionScheduled(
                session_id=session_id, program_id="p", kind="group_therapy", title="Afternoon", capacity=12,
                starts_at=starts, ends_at=starts + timedelta(hours=1),
            )  # fmt: skip
            sessions.append(session_id)
            await publish_and_settle(app, nats_server.url, new_envelope(scheduled, site_id=SITE))

        # Recorded out of order: the third session first, then the first (present).
        await publish_and_settle(app, nats_server.url, patient.attended(sessions[2], "absent"))
        missed = (await wait_mail(smtp_sink, patient.email, count=2))[1]
        assert missed["text"].strip() == domain.render("missed_you", "en")
        await publish_and_settle(app, nats_server.url, patient.attended(sessions[0], "present"))
        # The handler has committed: an alert would already be a row (the bus lags behind).
        assert (await client.get("/alerts", headers=CLINICIAN)).json() == []

        second = patient.attended(sessions[1], "absent")
        await publish_and_settle(app, nats_server.url, second)
        [alerted] = await bus.wait_for_event("CareTeamAlerted")
        data = alerted.envelope()["data"]
        assert (data["reason"], data["severity"], data["cause_event_id"]) == (
            "two_absences", "warning", str(second.event_id),
        )  # fmt: skip
        [care] = await wait_mail(smtp_sink, ON_CALL)
        assert "two sessions in a row" in care["text"]
        await wait_mail(smtp_sink, patient.email, count=3)

        # The same absence recorded again raises no second alert.
        await publish_and_settle(app, nats_server.url, patient.attended(sessions[1], "absent"))
        assert len(bus.events("CareTeamAlerted")) == 1
        assert len((await client.get("/alerts", headers=CLINICIAN)).json()) == 1
        templates = sorted(r["template"] for r in await rows(app, patient_id=patient.id, recipient_kind="patient"))
        assert templates == ["missed_you", "missed_you", "missed_you", "welcome"]


async def test_an_excused_absence_is_no_warning(app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink) -> None:
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient)
        now = datetime.now(UTC)
        ids = [uuid4(), uuid4()]
        for index, session_id in enumerate(ids):
            starts = now - timedelta(days=2 - index)
            scheduled = SessionScheduled(
                session_id=session_id, program_id="p", kind="workshop", title="Workshop", capacity=12,
                starts_at=starts, ends_at=starts + timedelta(hours=1),
            )  # fmt: skip
            await publish_and_settle(app, nats_server.url, new_envelope(scheduled, site_id=SITE))
        await publish_and_settle(
            app, nats_server.url, patient.attended(ids[0], "excused"), patient.attended(ids[1], "absent")
        )
        assert (await client.get("/alerts", headers=CLINICIAN)).json() == []
        missed = await wait_rows(
            app, lambda r: len(r) == 1, "one missed-you", patient_id=patient.id, template="missed_you"
        )
        assert missed[0]["session_id"] == str(ids[1])


# --- webhooks ----------------------------------------------------------------------------------------


async def test_webhook_subscriptions_receive_signed_events_with_retries(
    app, nats_server, bus: BusRecorder, http_peer: HttpPeer, smtp_sink: SmtpSink
) -> None:
    secret = "whsec-" + "k" * 24
    http_peer.secrets["/hooks/ehr"] = secret
    http_peer.fail["/hooks/ehr"] = 1
    patient = Patient()
    integration = auth("integration", [SITE])
    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await with_roster(app, nats_server.url, client)
        body = {"site_id": SITE, "url": http_peer.url("/hooks/ehr"), "events": ["CareTeamAlerted"], "secret": secret}
        created = await client.post("/subscriptions", json=body, headers=integration)
        assert created.status_code == 201, created.text
        assert "secret" not in created.json()
        assert created.json()["events"] == ["CareTeamAlerted"]
        for bad in ({"events": ["PatientContactChanged"]}, {"secret": "short"}, {"url": "not a url"}):
            response = await client.post("/subscriptions", json={**body, **bad}, headers=integration)
            assert response.status_code == 422, bad
            assert response.json()["error"]["code"] == "invalid"
        assert (await client.post("/subscriptions", json=body, headers=CLINICIAN)).status_code == 403
        other = {**body, "site_id": "dayton-north"}
        assert (await client.post("/subscriptions", json=other, headers=integration)).status_code == 404

        await onboard(app, nats_server.url, patient)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))

        async def delivered():
            return http_peer.posts("/hooks/ehr", status=200)

        [post] = await eventually(delivered, what="the webhook delivered")
        assert [p["status"] for p in http_peer.posts("/hooks/ehr")] == [500, 200]
        assert post["signature_ok"] is True
        timestamp = post["headers"]["X-Iopnet-Timestamp"]
        expected = hmac.new(secret.encode(), timestamp.encode() + b"." + post["body"], hashlib.sha256).hexdigest()
        assert post["headers"]["X-Iopnet-Signature"] == expected
        envelope = json.loads(post["body"])
        [alerted] = await bus.wait_for_event("CareTeamAlerted")
        assert envelope == alerted.envelope()
        [hook] = await wait_rows(
            app, lambda r: r and r[0]["status"] == "sent", "webhook row sent", recipient_kind="integration"
        )
        assert hook["attempts"] == 2 and hook["patient_id"] is None
        # Both attempts carry the delivery's identity, for the receiver to drop a resent copy.
        keys = {
            (p["headers"]["Idempotency-Key"], p["headers"]["X-Iopnet-Delivery-Id"])
            for p in http_peer.posts("/hooks/ehr")
        }
        assert keys == {(hook["notification_id"], hook["notification_id"])}

        # A subscriber with the wrong secret is refused by the receiver: no retry helps.
        http_peer.secrets["/hooks/bad"] = "another-secret-entirely"
        wrong = {**body, "url": http_peer.url("/hooks/bad")}
        assert (await client.post("/subscriptions", json=wrong, headers=integration)).status_code == 201
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        refused = await wait_rows(
            app, lambda r: any(x["status"] == "failed" for x in r), "refused webhook failed",
            recipient_kind="integration",
        )  # fmt: skip
        [failed] = [r for r in refused if r["status"] == "failed"]
        assert (failed["attempts"], failed["status_reason"], failed["last_error"]) == (1, "refused", "HTTP 401")
        listed = await client.get("/subscriptions", headers=integration)
        assert len(listed.json()) == 2
        assert (
            await client.delete(f"/subscriptions/{created.json()['subscription_id']}", headers=integration)
        ).status_code == 204
        assert len((await client.get("/subscriptions", headers=integration)).json()) == 1


# --- rosters and site settings -----------------------------------------------------------------------------


async def test_a_batch_asks_once_whether_a_site_has_webhook_subscriptions(
    app, nats_server, http_peer: HttpPeer
) -> None:
    """Issue 10: every event applied is offered to the site's webhook subscriptions. A
    site with none is asked once per transaction (a consumer's batch), not once per event;
    a site with subscriptions is read for each event, and a subscription committed since
    gets the next transaction's events."""
    patient = Patient()
    integration = auth("integration", [SITE])
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if "subscriptions.event_types" in statement:  # the site's subscriptions read
            statements.append(statement)

    async def offer(events: list[Envelope]) -> int:
        async with app.state.runtime.sessions() as session, session.begin():
            ours = (await session.connection()).sync_connection  # not the dispatcher's
            event.listen(ours, "before_cursor_execute", count)
            try:
                return sum([await usecases.fan_out_event(session, envelope) for envelope in events])
            finally:
                event.remove(ours, "before_cursor_execute", count)

    async with running(app) as client:
        await register_integration(app, nats_server.url, [SITE])
        await with_roster(app, nats_server.url, client)
        await onboard(app, nats_server.url, patient, consent=False)
        assert await offer([check_in(patient, "low") for _ in range(5)]) == 0
        assert len(statements) == 1
        body = {"site_id": SITE, "url": http_peer.url("/hooks/ehr"), "events": ["CheckInSubmitted"], "secret": "s" * 30}
        assert (await client.post("/subscriptions", json=body, headers=integration)).status_code == 201
        statements.clear()
        assert await offer([check_in(patient, "low") for _ in range(3)]) == 3
        assert len(statements) == 3


async def test_care_team_roster_is_validated_and_scoped(app, nats_server) -> None:
    async with running(app) as client:
        members = await with_roster(app, nats_server.url, client)
        assert [m["position"] for m in members] == [0, 1, 2]
        assert [m["address"] for m in members] == [ON_CALL, BACKUP_PHONE, LAST]
        assert members[0]["language"] == "en" and members[2]["language"] == "es"
        read = await client.get(f"/sites/{SITE}/care-team", headers=CLINICIAN)
        assert read.status_code == 200 and read.json()["members"] == members
        one = ROSTER["members"][0]
        for bad in (
            {**one, "address": "not-an-email"},
            {**one, "channel": "sms", "address": "555-0100"},
            {**one, "channel": "webhook", "address": "https://pager.test/hook"},  # no secret
            {**one, "channel": "fax"},
        ):
            response = await client.put(f"/sites/{SITE}/care-team", json={"members": [bad]}, headers=ADMIN)
            assert response.status_code == 422, bad
        twice = await client.put(f"/sites/{SITE}/care-team", json={"members": [one, one]}, headers=ADMIN)
        assert twice.status_code == 422
        assert (await client.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=CLINICIAN)).status_code == 403
        other = auth("site_admin", ["dayton-north"])
        assert (await client.put(f"/sites/{SITE}/care-team", json=ROSTER, headers=other)).status_code == 404
        assert (await client.get(f"/sites/{SITE}/care-team", headers=other)).status_code == 404
        hook = {"name": "Pager", "role": "pager", "channel": "webhook", "address": "https://pager.test/hook",
                "secret": "pager-secret-0123456789"}  # fmt: skip
        replaced = await client.put(f"/sites/{SITE}/care-team", json={"members": [hook, one]}, headers=ADMIN)
        assert replaced.status_code == 200
        assert [m["channel"] for m in replaced.json()["members"]] == ["webhook", "email"]
        assert "secret" not in replaced.text and "pager-secret" not in replaced.text

        settings = await client.get(f"/sites/{SITE}/notification-settings", headers=CLINICIAN)
        assert settings.json()["reminder_offsets_minutes"] == [1440, 120]
        put = await client.put(
            f"/sites/{SITE}/notification-settings", json={"reminder_offsets_minutes": [60, 2880]}, headers=ADMIN
        )
        assert put.json()["reminder_offsets_minutes"] == [2880, 60]
        bad = await client.put(f"/sites/{SITE}/notification-settings", json={"quiet_start": "22:00"}, headers=ADMIN)
        assert bad.status_code == 422
        assert (await client.put(f"/sites/{SITE}/notification-settings", json={}, headers=CLINICIAN)).status_code == 403


async def test_a_pager_on_the_roster_gets_a_signed_webhook(app, nats_server, http_peer: HttpPeer) -> None:
    secret = "pager-secret-0123456789"
    http_peer.secrets["/pager"] = secret
    pager = {"name": "Pager", "role": "pager", "channel": "webhook", "address": http_peer.url("/pager"),
             "secret": secret}  # fmt: skip
    patient = Patient()
    async with running(app) as client:
        await with_roster(app, nats_server.url, client, {"members": [pager, *ROSTER["members"]]})
        await onboard(app, nats_server.url, patient)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))

        async def paged():
            return http_peer.posts("/pager", status=200)

        [post] = await eventually(paged, what="the pager called")
        assert post["signature_ok"] is True
        document = json.loads(post["body"])
        assert document["template"] == "care_urgent_check_in"
        assert "URGENT" in document["text"] and patient.id in document["text"]


async def test_alert_raised_before_any_roster_goes_out_when_the_roster_is_set(
    app, nats_server, bus: BusRecorder, smtp_sink: SmtpSink
) -> None:
    patient = Patient()
    async with running(app) as client:
        await register_site(app, nats_server.url)
        await onboard(app, nats_server.url, patient, consent=False)
        await publish_and_settle(app, nats_server.url, check_in(patient, "urgent"))
        [alerted] = await bus.wait_for_event("CareTeamAlerted")
        [alert] = (await client.get("/alerts", params={"status": "open"}, headers=CLINICIAN)).json()
        assert alert["level"] == -1  # nobody to tell yet
        assert smtp_sink.mails == []
        await with_roster(app, nats_server.url, client)
        [mail] = await wait_mail(smtp_sink, ON_CALL)
        assert alerted.envelope()["data"]["alert_id"] in mail["text"]
        [alert] = (await client.get("/alerts", params={"status": "open"}, headers=CLINICIAN)).json()
        assert alert["level"] == 0
