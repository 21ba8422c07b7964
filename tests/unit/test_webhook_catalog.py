"""What a webhook may subscribe to comes from the event catalog, and notifications hears
every such event: consumed from the stream that holds it, or produced by itself."""

from services.notifications import domain
from services.notifications.backfill import subjects_for
from services.notifications.handlers import SUBSCRIPTIONS
from services.notifications.usecases import WEBHOOK_EVENTS
from shared.contracts.events import EVENT_TYPES, SessionCompleted, SessionScheduled
from shared.contracts.subjects import event_name
from shared.messaging import Interest


def test_subscribable_types_are_the_public_catalog() -> None:
    assert {name for name, cls in EVENT_TYPES.items() if not cls.restricted} == WEBHOOK_EVENTS
    assert "PatientContactChanged" not in WEBHOOK_EVENTS
    assert {"ProgramPublished", "PatientTransferred", "TreatmentPlanUpdated", "PatientWaitlisted",
            "SessionCompleted"} <= WEBHOOK_EVENTS  # fmt: skip


def test_notifications_hears_every_subscribable_type_on_the_durables_it_has() -> None:
    consumed = {cls.__name__ for s in SUBSCRIPTIONS for cls in s.handlers if not cls.restricted}
    produced = {name for name, cls in EVENT_TYPES.items() if cls.producer == "notifications"}
    assert consumed | produced >= WEBHOOK_EVENTS
    # No durable beyond the ones the broker permissions grant today (iopnet/natsd.py).
    assert {s.durable("notifications") for s in SUBSCRIPTIONS} == {
        "notifications-IOP_RESTRICTED", "notifications-IOP_INTAKE", "notifications-IOP_SCHEDULING",
        "notifications-IOP_INTAKE-safety",
    }  # fmt: skip
    filters = {subject for s in SUBSCRIPTIONS for subject in s.filter_subjects()}
    for name in WEBHOOK_EVENTS - produced:
        cls = EVENT_TYPES[name]
        assert f"iop.{cls.producer}.{event_name(name)}.*" in filters


def test_a_subscription_wants_its_site_and_its_public_types_only() -> None:
    wants = domain.webhook_wants
    assert wants("a-site", ["ProgramPublished"], WEBHOOK_EVENTS, "a-site", "ProgramPublished")
    assert not wants("a-site", ["ProgramPublished"], WEBHOOK_EVENTS, "b-site", "ProgramPublished")
    assert not wants("a-site", ["ProgramPublished"], WEBHOOK_EVENTS, "a-site", "SessionScheduled")
    # A restricted type stored on a subscription (written past the API) is still never sent.
    assert not wants("a-site", ["PatientContactChanged"], WEBHOOK_EVENTS, "a-site", "PatientContactChanged")


def test_the_nth_failure_in_a_row_pauses() -> None:
    assert domain.pause_reason(9, 10, "HTTP 500") is None
    assert domain.pause_reason(10, 10, "HTTP 500") == "10 consecutive failed deliveries; last: HTTP 500"
    assert domain.pause_reason(1, 0, None) == "1 consecutive failed deliveries; last: unknown"


def test_backfill_reads_each_stream_of_the_subscribed_types_for_the_site_only() -> None:
    assert subjects_for("a-site", ["ProgramPublished"]) == {"IOP_SCHEDULING": "iop.scheduling.program_published.a-site"}
    assert subjects_for("a-site", ["ProgramPublished", "SessionCompleted", "PatientEnrolled", "CareTeamAlerted",
                                   "PatientContactChanged"]) == {
        "IOP_SCHEDULING": "iop.scheduling.*.a-site",
        "IOP_INTAKE": "iop.intake.patient_enrolled.a-site",
        "IOP_NOTIFICATIONS": "iop.notifications.care_team_alerted.a-site",
    }  # fmt: skip


def test_a_webhook_only_type_is_read_only_at_the_sites_a_subscription_asks_for() -> None:
    """Issue 10: what only outside systems need costs nothing where nobody asked."""
    scheduling = next(s for s in SUBSCRIPTIONS if s.durable("notifications") == "notifications-IOP_SCHEDULING")
    assert SessionCompleted in scheduling.optional and SessionScheduled not in scheduling.optional
    nobody = scheduling.filter_subjects(Interest())
    assert "iop.scheduling.session_scheduled.*" in nobody  # what notifications itself needs: every site
    assert not any("session_completed" in s or "program_published" in s for s in nobody)
    asked = Interest(wanted=frozenset({("SessionCompleted", "a-site"), ("SessionCompleted", "b-site")}))
    subjects = scheduling.filter_subjects(asked)
    assert {"iop.scheduling.session_completed.a-site", "iop.scheduling.session_completed.b-site"} <= set(subjects)
    assert set(nobody) < set(subjects) and len(subjects) == len(nobody) + 2
    everywhere = Interest(wanted=frozenset({("SessionCompleted", "*"), ("SessionCompleted", "a-site")}))
    assert "iop.scheduling.session_completed.*" in scheduling.filter_subjects(everywhere)
    # Without an interest (the AsyncAPI document): everything it could read.
    assert "iop.scheduling.session_completed.*" in scheduling.filter_subjects()
