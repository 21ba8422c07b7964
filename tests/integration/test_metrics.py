"""`GET /metrics` on a real service (intake, on real NATS and SQLite/PostgreSQL): HTTP by
route template and status, events published and consumed, outbox and consumer backlog."""

from pathlib import Path
from uuid import uuid4

import pytest
from prometheus_client.parser import text_string_to_metric_families

from iopnet.testing import eventually
from services.intake.app import create_app
from tests.conftest import auth, make_settings, program_published, publish, running

SITE = {"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"}


@pytest.fixture
def app(nats_server, database_url: str, tmp_path: Path):
    return create_app(make_settings(nats_server.url, tmp_path, intake_database_url=database_url))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests_events_and_backlog(app, nats_server) -> None:
    async with running(app) as client:
        assert (await client.post("/sites", json=SITE, headers=auth("network_admin"))).status_code == 201
        unknown = uuid4()
        assert (
            await client.get(f"/patients/{unknown}", headers=auth("front_desk", ["columbus-east"]))
        ).status_code == 404
        assert (await client.get(f"/patients/{unknown}")).status_code == 401
        await publish(nats_server.url, program_published("columbus-east"))

        async def scraped() -> dict | None:
            response = await client.get("/metrics")
            values = samples(response.text)
            applied = values.get(
                ("iopnet_events_consumed_total", (("consumer", "intake-IOP_SCHEDULING"), ("outcome", "applied")))
            )
            published = values.get(("iopnet_events_published_total", (("event", "site_registered"),)))
            return values if applied == 1 and published == 1 else None

        values = await eventually(scraped, what="the event consumed and the site published")
        text = (await client.get("/metrics")).text

    def requests(route: str, status: str) -> float | None:
        return values.get(("iopnet_http_requests_total", (("method", "GET"), ("route", route), ("status", status))))

    # By route template: the patient id never becomes a label.
    assert requests("/patients/{patient_id}", "404") == 1
    assert requests("/patients/{patient_id}", "401") == 1
    assert str(unknown) not in text
    assert values[("iopnet_http_request_duration_seconds_count", (("method", "POST"), ("route", "/sites")))] == 1
    assert values[("iopnet_outbox_pending", ())] == 0
    assert values[("iopnet_outbox_oldest_pending_age_seconds", ())] == 0
    assert values[("iopnet_consumer_pending", (("consumer", "intake-IOP_SCHEDULING"),))] == 0
    assert values[("iopnet_consumer_redelivered", (("consumer", "intake-IOP_SCHEDULING"),))] == 0
    assert values[("iopnet_dead_letters_total", (("consumer", "intake-IOP_SCHEDULING"),))] == 0
    # FastStream's Prometheus middleware on the service's broker: what its subscriber
    # received, by subject (the relay pipelines on the broker's connection and counts
    # its publishes in iopnet_events_published_total).
    bus = {
        (name, labels.get("handler") or labels.get("destination"), labels.get("app_name")): value
        for (name, pairs), value in values.items()
        if (labels := dict(pairs))
    }
    received = ("iopnet_bus_received_messages_total", "iop.scheduling.program_published.columbus-east", "iopnet-intake")
    # By intake's durable for programs only: its feed lane lies dormant without a
    # consent-based integration, and reads nothing.
    assert bus[received] == 1
    assert values[("iopnet_consumer_pending", (("consumer", "intake-IOP_SCHEDULING-feed"),))] == 0


async def test_a_scrape_does_not_wait_on_an_absent_broker(app, nats_server) -> None:
    async with running(app) as client:
        await publish(nats_server.url, program_published("columbus-east"))  # declares IOP_SCHEDULING

        async def bound() -> bool:
            consumers = app.state.runtime.consumers
            return any(c.durable == "intake-IOP_SCHEDULING" and c.bound.is_set() for c in consumers)

        await eventually(bound, what="the consumer bound")
        nats_server.stop(kill=True)
        response = await client.get("/metrics")
        values = samples(response.text)
    assert response.status_code == 200
    assert values[("iopnet_scrape_errors_total", (("source", "intake-IOP_SCHEDULING"),))] == 1


async def test_a_scrape_for_some_series_answers_and_reads_only_those(app, nats_server, monkeypatch) -> None:
    """`name[]` (prometheus-client's convention): a frequent scraper such as `iopnet bench`
    gets its series, and the service reads no backlog it did not ask for."""
    async with running(app) as client:
        await publish(nats_server.url, program_published("columbus-east"))
        outbox = app.state.runtime.outbox
        outbox_reads: list[str] = []
        real_pending_count = outbox.pending_count

        async def counted_pending_count(session):  # a spy: the real read still happens
            outbox_reads.append("pending_count")
            return await real_pending_count(session)

        monkeypatch.setattr(outbox, "pending_count", counted_pending_count)

        async def consumed() -> dict | None:
            wanted = "?name[]=iopnet_events_consumed_total&name[]=iopnet_consumer_pending"
            values = samples((await client.get("/metrics" + wanted)).text)
            key = ("iopnet_events_consumed_total", (("consumer", "intake-IOP_SCHEDULING"), ("outcome", "applied")))
            return values if values.get(key) == 1 else None

        values = await eventually(consumed, what="the event consumed")
        assert outbox_reads == []
        whole = samples((await client.get("/metrics")).text)
        assert outbox_reads == ["pending_count"]
    assert {name for name, _ in values} == {"iopnet_events_consumed_total", "iopnet_consumer_pending"}
    assert values[("iopnet_consumer_pending", (("consumer", "intake-IOP_SCHEDULING"),))] == 0
    assert ("iopnet_outbox_pending", ()) in whole
    assert {name for name, _ in whole} > {name for name, _ in values}
