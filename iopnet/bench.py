"""`iopnet bench` / `make bench`: measure the network as a user runs it.

Starts a private network (embedded nats-server, three service processes, SQLite in a
temp dir, free ports), enrolls N patients through intake's HTTP API concurrently, and
reports latencies read off the bus, first unloaded (one enrollment at a time), then
loaded (many clients at once, where queueing shows):
- http: POST /patients/{id}/enrollments round trip;
- relay: commit -> PatientEnrolled on the bus (outbox relay, from the event's occurred_at);
- chain: PatientEnrolled on the bus -> NotificationSent on the bus (consume, deliver, publish).
"""

import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from iopnet.natsd import free_port
from iopnet.network import LocalNetwork
from iopnet.testing import BusRecorder, eventually
from shared.auth import mint_token
from shared.settings import Settings


def _summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1)

    return {"n": len(ordered), "p50": pct(0.5), "p95": pct(0.95), "max": round(ordered[-1], 1),
            "mean": round(statistics.fmean(ordered), 1)}  # fmt: skip


class _Driver:
    """Creates and enrolls bench patients through intake's HTTP API."""

    def __init__(self, network: LocalNetwork, http: httpx.AsyncClient) -> None:
        secret = network.settings.signing_secret
        self.admin = {"Authorization": f"Bearer {mint_token(secret, sub='bench', role='network_admin')}"}
        token = mint_token(secret, sub="bench", role="front_desk", sites=["bench-site"])
        self.desk = {"Authorization": f"Bearer {token}"}
        self.intake = network.url("intake")
        self.http = http
        self.http_ms: list[float] = []

    async def register_site(self, scheduling: str) -> None:
        """Register the site at intake and publish a program at scheduling, then wait
        until each service has learned what it needs from the other's events."""
        site = {"site_id": "bench-site", "name": "Bench", "timezone": "America/New_York"}
        (await self.http.post(f"{self.intake}/sites", json=site, headers=self.admin)).raise_for_status()
        block = {"weekday": 2, "start": "18:00", "minutes": 180, "kind": "group_therapy", "title": "Group"}
        program = {"site_id": "bench-site", "name": "Bench IOP", "cohort": "adult", "blocks": [block]}

        async def published() -> httpx.Response | None:
            response = await self.http.post(f"{scheduling}/programs", json=program, headers=self.admin)
            return response if response.status_code == 201 else None

        response = await eventually(published, timeout=30, what="scheduling to know the site")
        assert response is not None  # eventually returns only a truthy value
        self.program_id = response.json()["program_id"]

        async def known() -> bool:
            listed = await self.http.get(f"{self.intake}/programs", headers=self.admin)
            return any(p["program_id"] == self.program_id for p in listed.json())

        await eventually(known, timeout=30, what="intake to know the program")

    async def enroll(self, index: int) -> str:
        patient = {
            "site_id": "bench-site", "given_name": "Bench", "family_name": f"Patient{index}",
            "birth_date": "1990-01-01", "email": f"bench{index}@example.org", "preferred_channel": "email",
        }  # fmt: skip
        created = await self.http.post(f"{self.intake}/patients", json=patient, headers=self.desk)
        created.raise_for_status()
        body = {
            "program_id": self.program_id, "level_of_care": "2.1", "cohort": "adult",
            "start_date": (date.today() + timedelta(days=1)).isoformat(), "referral_source": "self",
        }  # fmt: skip
        started = time.perf_counter()
        response = await self.http.post(
            f"{self.intake}/patients/{created.json()['patient_id']}/enrollments", json=body, headers=self.desk
        )
        self.http_ms.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        return str(response.json()["enrollment_id"])


def _chain_latencies(bus: BusRecorder) -> tuple[list[float], list[float]]:
    enrolled = {m.envelope()["event_id"]: m for m in bus.events("PatientEnrolled")}
    relay_ms, chain_ms = [], []
    for message in enrolled.values():
        occurred = datetime.fromisoformat(message.envelope()["occurred_at"])
        seen_wall = datetime.now(UTC) - timedelta(seconds=time.monotonic() - message.received_at)
        relay_ms.append(max(0.0, (seen_wall - occurred).total_seconds() * 1000))
    for sent in bus.events("NotificationSent"):
        cause = enrolled.get(sent.envelope()["causation_id"])
        if cause is not None:
            chain_ms.append((sent.received_at - cause.received_at) * 1000)
    return relay_ms, chain_ms


async def _measure(network: LocalNetwork, patients: int, concurrency: int, sequential: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=30) as http:
        driver = _Driver(network, http)
        await driver.register_site(network.url("scheduling"))

        # Unloaded: one enrollment at a time, each followed to its NotificationSent.
        bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
        for index in range(sequential):
            await driver.enroll(index)
            await bus.wait_for_event("NotificationSent", count=index + 1, timeout=30)
        await bus.stop()
        relay_ms, chain_ms = _chain_latencies(bus)
        results["unloaded"] = {
            "enrollments": sequential,
            "http_enroll_ms": _summary(driver.http_ms),
            "commit_to_bus_ms": _summary(relay_ms),
            "enrolled_to_notification_sent_ms": _summary(chain_ms),
        }

        # Loaded: `patients` enrollments from `concurrency` clients, as fast as intake answers.
        driver.http_ms = []
        bus = await BusRecorder(network.nats_url, network.observed_subjects).start()
        limiter = asyncio.Semaphore(concurrency)

        async def one(index: int) -> None:
            async with limiter:
                await driver.enroll(index)

        wall = time.perf_counter()
        await asyncio.gather(*(one(sequential + i) for i in range(patients)))
        await bus.wait_for_event("NotificationSent", count=patients, timeout=300)
        wall_s = time.perf_counter() - wall
        await bus.stop()
        relay_ms, chain_ms = _chain_latencies(bus)
        results["loaded"] = {
            "enrollments": patients,
            "concurrency": concurrency,
            "wall_seconds": round(wall_s, 2),
            "enrollments_per_second_end_to_end": round(patients / wall_s, 1),
            "http_enroll_ms": _summary(driver.http_ms),
            "commit_to_bus_ms": _summary(relay_ms),
            "enrolled_to_notification_sent_ms": _summary(chain_ms),
        }
    return results


def run_bench(patients: int, concurrency: int, sequential: int = 20) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="iopnet-bench-") as scratch:
        settings = Settings(
            data_dir=Path(scratch) / "data",
            nats_url=None,
            jwt_secret=None,
            embedded_nats_port=free_port(),
            intake_port=free_port(),
            scheduling_port=free_port(),
            notifications_port=free_port(),
            log_level="WARNING",
        )
        network = LocalNetwork(settings, log_dir=Path(scratch))
        try:
            network.start()
            return asyncio.run(_measure(network, patients, concurrency, sequential))
        finally:
            network.stop()


def main(patients: int, concurrency: int) -> None:
    print(json.dumps(run_bench(patients, concurrency), indent=2))
