"""docs/events.md, the integrators' guide, is the one iopnet/events_doc.py renders from the
contracts (`make schemas` writes it), and it documents every public event type with an
example that keeps the contract, and no restricted one."""

import json
import re

from iopnet.events_doc import DOC_PATH, EXAMPLE_TEXT, example_envelope, public_events, render, restricted_events
from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES

DOC = DOC_PATH.read_text()


def test_the_committed_guide_is_the_one_the_contracts_render() -> None:
    assert render() == DOC, "docs/events.md is stale: run `make schemas`"


def _examples() -> dict[str, dict]:
    """The example envelopes in the guide, by event type."""
    blocks = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", DOC, flags=re.S)]
    return {block["event_type"]: block for block in blocks}


def test_every_public_event_is_documented_with_a_valid_example_and_no_restricted_one_is() -> None:
    documented = re.findall(r"^#### (\w+)$", DOC, flags=re.M)
    assert sorted(documented) == sorted(public_events())
    assert set(public_events()) | set(restricted_events()) == set(EVENT_TYPES)
    assert restricted_events() and set(restricted_events()).isdisjoint(documented)
    examples = _examples()
    assert set(examples) == set(public_events())
    for event_type, raw in examples.items():
        envelope = Envelope.model_validate(raw)
        envelope.event()  # the data keeps the event's contract
        assert envelope == example_envelope(event_type)
        assert f"`{envelope.subject.removesuffix(envelope.site_id)}<site_id>`" in DOC
    for name in restricted_events():
        # Named once, in the sentence that says they are not offered.
        assert DOC.count(f"`{name}`") == 1, name
    assert "Restricted events are not offered to integrations" in DOC


def test_examples_carry_no_personal_looking_text() -> None:
    """Text values are codes and labels from the vetted list; no date of birth, no e-mail
    address or phone number, no person's name."""
    vetted = {value for value in EXAMPLE_TEXT.values() if value is not None}
    for raw in _examples().values():
        strings = _strings(raw["data"])
        for value in strings:
            is_code = re.fullmatch(r"[0-9a-f-]{36}|\d{4}-\d{2}-\d{2}(T[\d:]+Z)?|[a-z0-9_.-]+|\d\d:\d\d", value)
            assert is_code or value in vetted, value
            assert "@" not in value and not re.search(r"\+?\d{10,}", value), value


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_the_guide_states_the_guarantees_and_policies() -> None:
    for text in (
        "De-duplicate by the envelope's\n  `event_id`",
        "`CheckInSubmitted` and `CareTeamAlerted`",
        "DeliverPolicy.BY_START_TIME",
        "$JS.API.CONSUMER.DELETE.<stream>.<durable>",
        "**side by side**",
        "GET /patients/{id}/disclosures",
        "`acme-ehr-IOP_INTAKE-columbus-east` | `iop.intake.*.columbus-east`",
        "`acme-ehr-IOP_FEED` | `iop.feed.acme-ehr.>`",
        "iopnet integrations add acme-ehr --site columbus-east --basis qsoa",
    ):
        assert text in DOC, text
