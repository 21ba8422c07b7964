"""`iopnet dlq show|purge|list` against a real nats-server (no users here: the allow-lists
are exercised in tests/e2e/test_ops_dlq.py). Dead letters are written as a consumer
writes them: subject `iop.dlq.<service>.<event>.<site>`, the reason in headers."""

import pytest

from iopnet.dlq import DeadLetterError, list_dead_letters, purge_dead_letters, show_dead_letter
from shared.messaging.connection import connect_once
from shared.messaging.streams import STREAMS, ensure_streams
from tests.conftest import stream_count


async def dead_letter(url: str, service: str, payload: bytes, *, restricted: bool = False) -> int:
    headers = {
        "Iop-Dlq-Reason": "invalid event: uuid_parsing",
        "Iop-Consumer": f"{service}-IOP_INTAKE",
        "Iop-Original-Stream": "IOP_RESTRICTED" if restricted else "IOP_INTAKE",
        "Iop-Original-Sequence": "7",
        "Iop-Original-Subject": "iop.intake.patient_enrolled.columbus-east",
    }
    if restricted:
        headers["Iop-Payload-Withheld"] = "restricted"
    nc = await connect_once(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, [STREAMS["IOP_DLQ"]], 120)
        ack = await js.publish(f"iop.dlq.{service}.patient_enrolled.columbus-east", payload, headers=headers)
        return int(ack.seq)
    finally:
        await nc.close()


async def test_show_gives_the_reason_and_the_payload_whatever_it_is(nats_server) -> None:
    url = nats_server.url
    envelope = await dead_letter(url, "scheduling", b'{"event_type": "PatientEnrolled"}')
    withheld = await dead_letter(url, "notifications", b"", restricted=True)
    poison = await dead_letter(url, "scheduling", b"\xffnot json")

    shown = await show_dead_letter(url, envelope)
    assert shown["envelope"] == {"event_type": "PatientEnrolled"}
    assert (shown["reason"], shown["consumer"]) == ("invalid event: uuid_parsing", "scheduling-IOP_INTAKE")
    shown = await show_dead_letter(url, withheld)
    assert (shown["payload_bytes"], shown["payload_withheld"]) == (0, "restricted")
    assert shown["headers"]["Iop-Original-Stream"] == "IOP_RESTRICTED"
    shown = await show_dead_letter(url, poison)
    assert shown["payload"] == "\ufffdnot json" and "envelope" not in shown
    with pytest.raises(DeadLetterError, match="no dead letter 99 in IOP_DLQ"):
        await show_dead_letter(url, 99)


async def test_purge_one_a_services_or_all(nats_server) -> None:
    url = nats_server.url
    first = await dead_letter(url, "scheduling", b"{}")
    await dead_letter(url, "scheduling", b"{}")
    await dead_letter(url, "notifications", b"{}")
    await dead_letter(url, "notifications", b"{}")
    steps: list[tuple[int, int]] = []

    assert await purge_dead_letters(url, sequences=[first], progress=lambda *step: steps.append(step)) == 1
    assert steps == [(1, 1)]
    assert [letter["sequence"] for letter in await list_dead_letters(url, 50)] == [2, 3, 4]
    with pytest.raises(DeadLetterError, match=f"dead letter {first}: no message found"):
        await purge_dead_letters(url, sequences=[first])

    assert await purge_dead_letters(url, service="notifications") == 2
    assert [letter["subject"].split(".")[2] for letter in await list_dead_letters(url, 50)] == ["scheduling"]
    assert await purge_dead_letters(url) == 1
    assert await stream_count(url, "IOP_DLQ") == 0
    with pytest.raises(ValueError, match="unknown service"):
        await purge_dead_letters(url, service="billing")


async def test_purge_before_any_dead_letter_removes_nothing(nats_server) -> None:
    assert await purge_dead_letters(nats_server.url) == 0


async def test_list_reports_progress(nats_server) -> None:
    for _ in range(3):
        await dead_letter(nats_server.url, "scheduling", b"{}")
    steps: list[tuple[int, int]] = []
    letters = await list_dead_letters(nats_server.url, 2, progress=lambda *step: steps.append(step))
    assert [letter["sequence"] for letter in letters] == [2, 3]
    assert steps == [(1, 2), (2, 2)]
