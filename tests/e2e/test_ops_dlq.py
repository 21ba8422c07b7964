"""The dead-letter commands as an operator runs them, as `ops`, against a running network
whose broker has its real accounts and allow-lists: `events tail` shows a restricted
dead letter (empty payload) by its headers, `dlq show` and `dlq retry` of a sequence
that does not exist say so in one line, and `dlq purge` removes a dead letter (or says
which permission the broker lacks)."""

import json
import subprocess
import sys
from itertools import count

from iopnet.natsd import PERMISSIONS
from iopnet.network import LocalNetwork
from iopnet.testing import LineReader, eventually
from tests.conftest import dead_letters
from tests.e2e.test_ops import PHONE, cli_env, iopnet, publish_contact_change


def start_dlq_tail(network: LocalNetwork) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "iopnet.cli", "events", "tail", "--subject", "iop.dlq.>", "--count", "1"],
        env=cli_env(network),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_tail_shows_a_restricted_dead_letter_and_dlq_commands_fail_cleanly(network: LocalNetwork) -> None:
    tail = start_dlq_tail(network)
    output = LineReader(tail.stdout)
    rounds = count()
    try:

        async def shown() -> bool:
            # A poison contact change each round (notifications dead-letters it with its
            # payload withheld) until the tail, started in parallel, has printed one.
            await publish_contact_change(network, {"patient_id": f"not-a-uuid-{next(rounds)}", "phone": PHONE})
            return tail.poll() is not None

        await eventually(shown, timeout=30, interval=0.5, what="the tail to print a dead letter")
    finally:
        if tail.poll() is None:
            tail.kill()
    assert tail.wait(timeout=10) == 0, output.text()
    [line] = output.text().splitlines()
    letter = json.loads(line)
    assert letter["subject"].startswith("iop.dlq.notifications.patient_contact_changed.")
    assert (letter["payload_bytes"], letter["payload_withheld"]) == (0, "restricted")
    assert letter["headers"]["Iop-Dlq-Reason"].startswith("invalid event: ")
    assert letter["headers"]["Iop-Original-Stream"] == "IOP_RESTRICTED"
    assert PHONE not in line

    letters = await eventually(lambda: dead_letters(network.nats_url), what="the dead letters")
    shown = iopnet(network, "dlq", "show", "1")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["payload_withheld"] == "restricted"

    for command in (["dlq", "retry", "99"], ["dlq", "show", "99"]):
        missing = iopnet(network, *command)
        assert missing.returncode == 1
        assert missing.stderr.strip() == "no dead letter 99 in IOP_DLQ"
        assert "Traceback" not in missing.stdout + missing.stderr

    asked = iopnet(network, "dlq", "purge")
    assert asked.returncode == 2 and "give dead letters' sequences, or --service S, or --all" in asked.stderr
    purged = iopnet(network, "dlq", "purge", "1", "--yes")
    if "$JS.API.STREAM.MSG.DELETE.IOP_DLQ" in PERMISSIONS["ops"].publish:
        assert purged.returncode == 0, purged.stderr
        assert purged.stdout.strip() == "removed 1 dead letter(s)"
        assert 1 not in [json.loads(line)["sequence"] for line in iopnet(network, "dlq", "list").stdout.splitlines()]
    else:
        # Until iopnet/natsd.py lets ops delete from IOP_DLQ: the missing permission, named.
        assert purged.returncode == 1
        assert "$JS.API.STREAM.MSG.DELETE.IOP_DLQ: this NATS user needs permission" in purged.stderr
        assert len(await dead_letters(network.nats_url)) >= len(letters)
