"""docs/events.md, the integrators' guide, generated from the contracts so it cannot drift.

`make schemas` (python -m iopnet.events_doc) writes it; tests/contract/test_events_doc.py
fails when the committed file differs from what this module renders. The prose lives
here; every event, field, subject, durable and example envelope is computed from
shared/contracts and shared/messaging. Example values are made up and deterministic:
ids from a fixed namespace, fixed times, and for text fields only the vetted values in
EXAMPLE_TEXT (the generator refuses a text field it has no example for, so a new one
gets a reviewed value, never a placeholder that could look like a person's details)."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES, Event, Producer
from shared.contracts.subjects import event_name, event_subject
from shared.messaging.integrations import CONTEXT_EVENTS, FEED_STREAM, PUBLIC_STREAMS, integration_consumers
from shared.messaging.outbox import SAFETY_EVENTS
from shared.settings import Settings

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "events.md"

SITE = "columbus-east"
INTEGRATION = "acme-ehr"
PRODUCERS: tuple[Producer, ...] = ("intake", "scheduling", "notifications")
OCCURRED_AT = datetime(2025, 3, 3, 14, 5, tzinfo=UTC)
_NAMESPACE = UUID("6f1c2d4e-0000-4000-8000-00000000e7e5")

# Text fields' example values: (event type, field) first, then the field alone. None: the
# example shows null. Codes and labels only: never a name, a date of birth, a note.
EXAMPLE_TEXT: dict[str, str | None] = {
    "SiteRegistered.name": "Columbus East",
    "ProgramPublished.name": "Adult IOP",
    "timezone": "America/New_York",
    "program_id": str(uuid5(_NAMESPACE, "program_id")),
    "to_program_id": str(uuid5(_NAMESPACE, "to_program_id")),
    "to_site_id": "columbus-west",
    "recipient": f"org:{INTEGRATION}",
    "purpose": "care_coordination",
    "expires_event": None,
    "title": "Group therapy",
    "start": "09:00",
    "PatientBooked.reason": None,
    "BookingCancelled.reason": "site_closed",
    "CareTeamAlerted.reason": "urgent_check_in",
    "NotificationFailed.reason": "HTTP 503",
    "template": "session_reminder",
    "integration_id": INTEGRATION,
    "event_type": "CheckInSubmitted",
    "iso_week": "2025-W10",
    "site_id": SITE,
}
EXAMPLE_NUMBER: dict[str, float] = {
    "weekly_hours_target": 9.0,
    "attended_hours": 4.5,
    "remaining_booked_hours": 3.0,
    "target_hours": 9.0,
}
EXAMPLE_INT: dict[str, int] = {
    "mood": 6,
    "craving": 2,
    "minutes": 150,
    "capacity": 12,
    "position": 1,
    "present_count": 9,
    "absent_count": 1,
    "attempts": 1,
    "weekday": 1,
}


# Values of a closed list shown in the examples, where the first would look odd (an IOP
# is level 2.1).
EXAMPLE_ENUM: dict[str, str] = {
    "level_of_care": "2.1",
    "status": "present",
    "kind": "group_therapy",
    "severity": "urgent",
}
EXAMPLE_DATE: dict[str, str] = {"expires_on": "2026-03-03", "discharged_on": "2025-05-30"}
EXAMPLE_TIME: dict[str, str] = {
    "submitted_at": "2025-03-03T14:04:58Z",
    "ends_at": "2025-03-10T16:30:00Z",
    "ended_at": "2025-03-10T16:30:00Z",
    "disclosed_at": "2025-03-03T14:05:02Z",
}


class MissingExample(ValueError):
    pass


def public_events() -> dict[str, type[Event]]:
    return {name: cls for name, cls in EVENT_TYPES.items() if not cls.restricted}


def restricted_events() -> list[str]:
    return sorted(name for name, cls in EVENT_TYPES.items() if cls.restricted)


def feed_treatment(event_type: str) -> str:
    """What the consent-gated feed does with it (services/intake/usecases.forward_to_feeds)."""
    if "patient_id" in EVENT_TYPES[event_type].model_fields:
        return "under the patient's consent"
    if event_type in CONTEXT_EVENTS:
        return "always (context, names no patient)"
    return "never"


# --- example values ---------------------------------------------------------------------


def _example(schema: dict[str, Any], defs: dict[str, Any], owner: str, field: str) -> Any:
    if "$ref" in schema:
        return _object(defs[schema["$ref"].rsplit("/", 1)[1]], defs, owner)
    if "anyOf" in schema:
        key = f"{owner}.{field}" if f"{owner}.{field}" in EXAMPLE_TEXT else field
        if key in EXAMPLE_TEXT and EXAMPLE_TEXT[key] is None:
            return None
        branch = next(s for s in schema["anyOf"] if s.get("type") != "null")
        return _example(branch, defs, owner, field)
    if "enum" in schema:
        preferred = EXAMPLE_ENUM.get(field)
        return preferred if preferred in schema["enum"] else schema["enum"][0]
    kind = schema.get("type")
    if kind == "array":
        return [_example(schema["items"], defs, owner, field)]
    if kind == "boolean":
        return False
    if kind == "integer":
        return EXAMPLE_INT.get(field, schema.get("minimum", 1))
    if kind == "number":
        return EXAMPLE_NUMBER.get(field, 1.0)
    if kind == "string":
        if schema.get("format") == "uuid":
            return str(uuid5(_NAMESPACE, field))
        if schema.get("format") == "date":
            return EXAMPLE_DATE.get(field, "2025-03-10")
        if schema.get("format") == "date-time":
            return EXAMPLE_TIME.get(field, "2025-03-10T14:00:00Z")
        for key in (f"{owner}.{field}", field):
            if key in EXAMPLE_TEXT:
                return EXAMPLE_TEXT[key]
        if schema.get("pattern") == r"^[a-z0-9-]{2,40}$":
            return SITE
        raise MissingExample(f"no example for {owner}.{field}: add one to EXAMPLE_TEXT")
    raise MissingExample(f"cannot make an example for {owner}.{field} ({schema})")


def _object(schema: dict[str, Any], defs: dict[str, Any], owner: str) -> dict[str, Any]:
    return {name: _example(prop, defs, owner, name) for name, prop in schema["properties"].items()}


def example_data(event_type: str) -> dict[str, Any]:
    schema = EVENT_TYPES[event_type].model_json_schema()
    data = _object(schema, schema.get("$defs", {}), event_type)
    EVENT_TYPES[event_type].model_validate(data)  # the example keeps the contract
    return data


def example_envelope(event_type: str) -> Envelope:
    cls = EVENT_TYPES[event_type]
    event_id = uuid5(_NAMESPACE, f"{event_type}.event_id")
    # Notifications' events react to another (their cause_event_id): its chain goes on.
    reaction = cls.producer == "notifications"
    return Envelope(
        event_id=event_id,
        event_type=event_type,
        occurred_at=OCCURRED_AT,
        producer=cls.producer,
        site_id=SITE,
        correlation_id=uuid5(_NAMESPACE, "correlation_id") if reaction else event_id,
        causation_id=uuid5(_NAMESPACE, "cause_event_id") if reaction else None,
        data=example_data(event_type),
    )


# --- field tables -----------------------------------------------------------------------


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema['items'])}"
    if kind == "null":
        return "null"
    described = {"uuid": "UUID", "date": "date (YYYY-MM-DD)", "date-time": "RFC 3339 time, UTC"}
    text = described.get(schema.get("format", ""), kind)
    bounds = [
        f"{label} {schema[key]}"
        for key, label in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="))
        if key in schema
    ]
    if "pattern" in schema:
        bounds.append(f"pattern `{schema['pattern']}`")
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _table(schema: dict[str, Any]) -> list[str]:
    required = set(schema.get("required", []))
    rows = ["| field | type | required |", "|---|---|---|"]
    for name, prop in schema["properties"].items():
        rows.append(f"| `{name}` | {_type(prop)} | {'yes' if name in required else 'no'} |")
    return rows


def _event_section(event_type: str) -> list[str]:
    cls = EVENT_TYPES[event_type]
    schema = cls.model_json_schema()
    lines = [f"#### {event_type}", ""]
    if cls.__doc__ and cls.__doc__ is not Event.__doc__ and cls.__doc__ != cls.__mro__[1].__doc__:
        lines += [" ".join(cls.__doc__.split()), ""]
    lines += [
        f"Subject `{event_subject(cls.producer, event_type, SITE).removesuffix(SITE)}<site_id>`"
        f" (stream `{_stream_of(cls.producer)}`). Consent feed: {feed_treatment(event_type)}.",
        "",
        *_table(schema),
        "",
    ]
    for name, nested in schema.get("$defs", {}).items():
        lines += [f"`{name}`:", "", *_table(nested), ""]
    example = json.dumps(example_envelope(event_type).model_dump(mode="json"), indent=2)
    lines += ["```json", example, "```", ""]
    return lines


def _stream_of(producer: str) -> str:
    return next(stream for stream, p in PUBLIC_STREAMS.items() if p == producer)


def _durables(basis: str) -> list[str]:
    rows = ["| stream | durable | filter_subject |", "|---|---|---|"]
    for c in integration_consumers(INTEGRATION, (SITE,), basis):
        rows.append(f"| `{c.stream}` | `{c.durable}` | `{c.filter_subject}` |")
    return rows


def _envelope_table() -> list[str]:
    schema = Envelope.model_json_schema()
    notes = {
        "event_id": "unique per event; the `Nats-Msg-Id` header of the original message. **De-duplicate by it.**",
        "event_type": "one of the catalog below",
        "schema_version": "version of `data`'s shape for this event type (see the policy below)",
        "occurred_at": "when it happened, UTC",
        "producer": "the service that published it",
        "site_id": "the clinic site it belongs to (the last subject token)",
        "correlation_id": "the same along one chain of cause and effect",
        "causation_id": "the event_id of the event this one reacts to; null at the start of a chain",
        "data": "the event's fields (below)",
    }
    rows = ["| field | type | meaning |", "|---|---|---|"]
    for name, prop in schema["properties"].items():
        rows.append(f"| `{name}` | {_type(prop)} | {notes.get(name, '')} |")
    return rows


# --- the document -------------------------------------------------------------------------

_INTRO = """\
# iopnet events for integrators

<!-- Generated by `make schemas` (python -m iopnet.events_doc) from shared/contracts.
     Do not edit: tests/contract/test_events_doc.py fails when this file is stale. -->

Outside systems (EHRs, billing, analytics, state reporting) read iopnet's events from its
NATS JetStream broker as an **integration**: a NATS user of their own that may read the
public events of its sites (basis `qsoa`) or only its own consent-gated feed (basis
`consent`), and nothing else. Webhooks (HTTP POSTs, signed) carry the same events.
Working code to copy: [examples/subscriber.py](../examples/subscriber.py) (NATS) and
[examples/webhook_receiver.py](../examples/webhook_receiver.py) (webhooks);
`tests/e2e/test_integrator.py` runs both against a real network.

Everything below about events, subjects, durables and examples is generated from the
code (`shared/contracts`, `shared/messaging`), so it is what the services do.

## 1. Credentials

A network administrator of the deployment adds the integration, for some sites, on a
basis: `qsoa` (a qualified service organization agreement: it reads its sites' public
events directly) or `consent` (42 CFR Part 2: it reads only its own feed, which carries
an event about a patient only under that patient's consent naming it, for `--purpose`).

```sh
iopnet integrations add {integration} --site {site} --basis qsoa
iopnet integrations add research-x --site {site} --basis consent --purpose research
iopnet integrations list            # --json for the records
iopnet integrations rotate {integration}     # a new password; the old one stops working now
iopnet integrations revoke {integration}     # for good: the broker closes its connections now
```

The same over HTTP at intake (role `network_admin`): `POST /integrations`
`{{"integration_id": "{integration}", "sites": ["{site}"], "basis": "qsoa"}}` (basis `consent`
also takes `purpose`), `GET /integrations`, `POST /integrations/{{id}}/rotate`,
`POST /integrations/{{id}}/revoke`. The answer to `add` and `rotate` carries:

| field | meaning |
|---|---|
| `nats_user` | `integration-<id>` |
| `password` | shown once; iopnet keeps only its bcrypt hash. Lost: `rotate` |
| `inbox_prefix` | `_INBOX.integration-<id>`: give it to your NATS client (the only inbox you may subscribe to) |
| `consumers` | the durables you may create: `stream`, `durable`, `filter_subject` |

The broker admits, rotates and drops integrations by a configuration reload, without a
restart: the CLI does it for the embedded broker of `iopnet run`; for a broker of the
deployment's own, `iopnet integrations sync --write FILE` writes the users and the
operator reloads it (`nats-server --signal reload`).

For webhooks an integration also needs an HTTP token (a JWT with role `integration`,
`sub` = the integration id, `sites` = its sites), issued by the deployment's operator;
on a local network: `iopnet token --role integration --sub {integration} --site {site}`.

## 2. Connecting and consuming

Your user may create, read, delete and pull from **your durables only**, and ack their
messages. It may publish nothing else (no event, no stream request, no other consumer)
and may not subscribe to `iop.>` directly. So:

- connect with `user`, `password` and `inbox_prefix`;
- create each durable with exactly its `durable` name and its one `filter_subject`
  (`ConsumerConfig(name=..., durable_name=..., filter_subject=..., ack_policy=EXPLICIT)`;
  the broker checks the filter, which nats-py puts in the request subject when the
  config has a `name` and a single `filter_subject`), then bind to it and pull;
- always name the stream (you may not look streams up by subject).

Basis `qsoa`, one durable per public stream and site:

{qsoa_durables}

Basis `consent`, one durable on your feed:

{consent_durables}

```python
# user "integration-{integration}", inbox_prefix "_INBOX.integration-{integration}", and one of your durables:
nc = await nats.connect(url, user=user, password=password, inbox_prefix=inbox_prefix)
js = nc.jetstream()
config = ConsumerConfig(
    name=durable,
    durable_name=durable,
    filter_subject=filter_subject,
    ack_policy=AckPolicy.EXPLICIT,
    deliver_policy=DeliverPolicy.ALL,
    ack_wait=30,
)
await js.add_consumer(stream, config)  # the same config again: no-op
sub = await js.pull_subscribe_bind(durable, stream=stream)
for msg in await sub.fetch(64, timeout=5):
    envelope = json.loads(msg.data)
    ...  # process, skipping an event_id already done
    await msg.ack()  # after processing, never before
```

A durable keeps your position while you are away: start again and you get what you had
not acked, then what came meanwhile.

"""

_MIDDLE = """\
## 3. Subjects and the envelope

Every event is published on `iop.<producer>.<event_name>.<site_id>`, `event_name` being
the snake_case of the event type (`PatientEnrolled` -> `{example_subject}`). Site ids are
slugs `[a-z0-9-]{{2,40}}`. Streams: {streams}. Your consent feed is `{feed_stream}`, subjects
`iop.feed.<integration>.<producer>.<event_name>.<site_id>` (e.g.
`{example_feed_subject}`): the original subject behind your prefix.

The body of each message is one JSON envelope (the JSON Schema:
[shared/contracts/schemas/Envelope.json](../shared/contracts/schemas/Envelope.json); each
event's `data`: `shared/contracts/schemas/<EventType>.json`):

{envelope_table}

Patients are named on the bus by `patient_id` (a UUID) only: no names, dates of birth,
contact details or free text travel on the subjects you may read.

## 4. Guarantees

- **At least once.** An event may reach you more than once (a redelivery after a missed
  ack, a re-drive you asked for, a producer's retry). **De-duplicate by the envelope's
  `event_id`**: keep the ids you have processed, in the same transaction as the effect if
  you can, and ack after. In your consent feed the message's `Nats-Msg-Id` header is not
  the event_id (each feed's copy has its own); the envelope is the original, unchanged,
  so its `event_id` is the key there too.
- **Order per stream.** A durable delivers in the order its stream stored the events
  (re-deliveries of unacked messages excepted), which is each producer's commit order with
  one exception: the safety events {safety} are published ahead of routine events
  committed before them, so they may overtake those. There is no order between streams
  (a `PatientBooked` may reach you before the `PatientEnrolled` it follows): make your
  handling tolerate it. In a consent feed, events of one source stream keep that
  stream's order; the streams are interleaved.
- **Retention.** The streams keep events by limits (`RetentionPolicy.LIMITS`, discard
  old); iopnet sets no age or size limit, so an event stays until the deployment's
  operator sets one. Ask yours how far back you can start or replay. Your durable stays
  on the broker, with your position, until you delete it.

## 5. Starting from a point in time

A new durable takes its start when it is created: `deliver_policy=DeliverPolicy.ALL` (the
whole retained history), `DeliverPolicy.NEW` (from now), or `DeliverPolicy.BY_START_TIME`
with `opt_start_time` (RFC 3339, UTC: from the first event stored at or after it). The start of an existing durable
cannot be changed; to start it elsewhere, replay.

## 6. Replay (re-driving your durable)

Delete your durable (`$JS.API.CONSUMER.DELETE.<stream>.<durable>`, which your user may
do) and create it again with the same name and filter and a new start
(`BY_START_TIME`). The stream is not rewritten and nobody else sees anything; you get the
events again, so your de-duplication by `event_id` decides what to apply (clear your
store of seen ids first to rebuild). `examples/subscriber.py --since TIME` does exactly
this. An operator's `iopnet events replay --consumer <your durable>` resets nothing of
yours (iopnet's operators may not touch an integration's durable).

## 7. schema_version

`schema_version` is the version of the shape of one event type's `data`. Within a
version, changes are additive only: new optional fields, new event types, new values
where a field's list of values is documented as open. Ignore fields you do not know.
Nothing is renamed, removed or changes type within a version (the contract tests
compare every change with the committed JSON Schemas). A breaking change is published as
a new version **side by side** with the old one for a deprecation period announced in
the release notes, so you move when you are ready; filter on `schema_version` and the
`event_type`. Every event type is at version 1 today.

## 8. Basis, consent and the accounting of disclosures

- **`qsoa`.** You read your sites' public streams directly, under the qualified service
  organization agreement. These reads are not entered in the patients' accounting of
  disclosures event by event (the agreement covers them; the grant itself is audited at
  intake for each site it covers, and published as `IntegrationRegistered`).
- **`consent`.** You read only your feed. Intake forwards into it the context events of
  your sites ({context}) and an event about a patient only while that patient has an
  active consent with recipient `org:<your id>` for your purpose that was on record when
  the event happened; a revocation stops it at once (a backlog included), and nothing from
  before the consent comes through. Events that name no patient and are not context
  (e.g. `NotificationSent`) are never forwarded. Your feed starts when your integration
  is registered: intake reads a site's events for feeds only while a consent-based
  integration covers that site, so nothing from before your registration is forwarded
  (short of a minute's margin for clocks). Each forwarded event about a patient is
  entered in that patient's **accounting of disclosures**: when, to whom
  (`org:<your id>`), purpose, channel (`feed`), event type and event_id. The patient and
  their site's admins read it at intake: `GET /patients/{{id}}/disclosures?limit=&offset=`
  (paged, audited). Entries are kept {retention_years} years by default
  (`IOPNET_DISCLOSURE_RETENTION_DAYS`).
- **Webhooks** follow your basis: under `consent` an event about a patient is delivered
  only under consent, and each such delivery is entered in the accounting with channel
  `webhook`; under `qsoa` deliveries are not entered per event.

## 9. Webhooks

Instead of NATS, subscribe an HTTPS endpoint at notifications: `POST /subscriptions`
`{{"site_id", "url", "events": [event types], "secret", "backfill_from"?}}` with your
integration token (any public event type below; restricted ones are refused with 422).
Each delivery is a POST of the envelope, with `X-Iopnet-Timestamp` (unix seconds) and
`X-Iopnet-Signature` = hex HMAC-SHA256(secret, `<timestamp>.<raw body>`); verify it over
the raw bytes and refuse an old timestamp (a replay): see
[examples/webhook_receiver.py](../examples/webhook_receiver.py). `Idempotency-Key` (=
`X-Iopnet-Delivery-Id`) is the same on every attempt of one delivery; de-duplicate by it
or by the envelope's `event_id`. A subscription receives the events applied from its
creation on, and the past ones from `backfill_from` if given (notifications reads a type it
needs only for webhooks at a site only while a subscription asks for it there). The
delivery log: `GET /subscriptions/{{id}}/deliveries`;
a subscription paused after repeated failures resumes with `POST /subscriptions/{{id}}/resume`.

## 10. The events

Every public event type, by producer, with its fields and an example envelope (made-up
values). "Consent feed" says whether the consent-gated feed carries it.

**Restricted events are not offered to integrations**, on NATS or by webhook: {restricted}.
They carry contact details or who receives a patient's records, travel on
`iop.restricted.>` in a separate account, and are read by iopnet's own services only.

"""


def render() -> str:
    feed_example = integration_consumers(INTEGRATION, (SITE,), "consent")[0]
    parts = [
        _INTRO.format(
            integration=INTEGRATION,
            site=SITE,
            qsoa_durables="\n".join(_durables("qsoa")),
            consent_durables="\n".join(_durables("consent")),
        ),
        _MIDDLE.format(
            example_subject=event_subject("intake", "PatientEnrolled", SITE),
            streams=", ".join(f"`{s}` = `iop.{p}.>`" for s, p in PUBLIC_STREAMS.items()),
            feed_stream=FEED_STREAM,
            example_feed_subject=feed_example.filter_subject.removesuffix(">")
            + event_subject("intake", "CheckInSubmitted", SITE).removeprefix("iop."),
            envelope_table="\n".join(_envelope_table()),
            safety=" and ".join(f"`{_type_of(name)}`" for name in SAFETY_EVENTS),
            context=", ".join(f"`{name}`" for name in sorted(CONTEXT_EVENTS)),
            retention_years=Settings.model_fields["disclosure_retention_days"].default // 366,
            restricted=", ".join(f"`{name}`" for name in restricted_events()),
        ),
    ]
    for producer in PRODUCERS:
        names = [name for name, cls in public_events().items() if cls.producer == producer]
        parts.append(f"### {producer} (`{_stream_of(producer)}`)\n\n")
        parts.append("\n".join(line for name in names for line in _event_section(name)) + "\n")
    return "".join(parts).rstrip("\n") + "\n"


def _type_of(name: str) -> str:
    return next(t for t in EVENT_TYPES if event_name(t) == name)


def main() -> None:
    DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
    DOC_PATH.write_text(render())
    print(f"wrote {DOC_PATH}")


if __name__ == "__main__":
    main()
