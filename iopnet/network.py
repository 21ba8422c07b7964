"""The whole network as local processes: an embedded nats-server (unless a NATS URL is
given) and `iopnet serve` for each service. Used by `iopnet run`, `iopnet bench` and the
end-to-end tests, so all three start the network the same way."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import httpx

from iopnet.natsd import (
    OBSERVED_SUBJECTS,
    RESTRICTED_USERS,
    NatsServer,
    embedded_data_dir,
    load_or_create_credentials,
    public_url,
)
from shared.settings import SERVICES, ServiceName, Settings


class LocalNetwork:
    def __init__(self, settings: Settings, log_dir: Path | None = None, *, bench_password: str | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir
        # `iopnet bench`: the embedded server gets an account for the raw baseline.
        self.bench_password = bench_password
        self.nats: NatsServer | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    @property
    def nats_url(self) -> str:
        """For observers (the CLI, tests, bench): on the embedded server, the `ops` user,
        which sees every public subject but nothing on `iop.restricted.>`."""
        return self.nats.user_url("ops") if self.nats is not None else self.settings.effective_nats_url

    @property
    def observed_subjects(self) -> tuple[str, ...]:
        """What `nats_url` may subscribe to (for a BusRecorder)."""
        return OBSERVED_SUBJECTS if self.nats is not None else ("iop.>",)

    @property
    def public_nats_url(self) -> str:
        """`nats_url` without credentials, for printing."""
        return public_url(self.nats_url)

    def service_nats_url(self, service: ServiceName) -> str:
        """Each service connects to the embedded server as its own user."""
        return self.nats.user_url(service) if self.nats is not None else self.settings.effective_nats_url

    def url(self, service: str) -> str:
        return self.settings.base_url(service)  # type: ignore[arg-type]

    def child_env(self, service: ServiceName) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "IOPNET_NATS_URL": self.service_nats_url(service),
                "IOPNET_DATA_DIR": str(self.settings.data_dir),
                "IOPNET_HTTP_HOST": self.settings.http_host,
                "IOPNET_LOG_LEVEL": self.settings.log_level,
                **{f"IOPNET_{n.upper()}_DATABASE_URL": self.settings.database_url(n) for n in SERVICES},
                **{f"IOPNET_{name.upper()}_PORT": str(self.settings.port(name)) for name in SERVICES},
            }
        )
        if self.settings.jwt_secret:
            env["IOPNET_JWT_SECRET"] = self.settings.jwt_secret
        if self.nats is not None and service in RESTRICTED_USERS:
            # Contact details live in a NATS account of their own (iopnet/natsd.py).
            env["IOPNET_NATS_RESTRICTED_URL"] = self.nats.user_url(RESTRICTED_USERS[service])
        elif self.settings.nats_restricted_url:
            env["IOPNET_NATS_RESTRICTED_URL"] = self.settings.nats_restricted_url
        return env

    def start(self, timeout: float = 60) -> "LocalNetwork":
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        _ = self.settings.signing_secret  # created once here, before the services race for it
        if self.settings.nats_url is None:
            embedded = embedded_data_dir(self.settings.data_dir)
            self.nats = NatsServer(
                embedded,
                self.settings.embedded_nats_host,
                self.settings.embedded_nats_port,
                users=load_or_create_credentials(embedded),
                bench_password=self.bench_password,
            )
            self.nats.start()
        for name in SERVICES:
            self._spawn(name)
        self.wait_ready(timeout)
        return self

    def _spawn(self, name: ServiceName) -> None:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            output = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(output)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "iopnet.cli", "serve", name], env=self.child_env(name), stdout=output, stderr=output
        )

    # --- faults: one process at a time, same ports, same data dir (tests/faults) ---------------

    def signal_service(self, name: ServiceName, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        """Send `sig` (kill -9 by default, or SIGTERM for a graceful stop) to one service
        and wait for it to exit; returns its exit status."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(sig)
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()  # a graceful stop that hangs is itself a fault: end it
            process.wait()
            raise RuntimeError(f"{name} did not exit within {timeout}s of signal {sig}") from None

    def restart_service(self, name: ServiceName, timeout: float = 60) -> None:
        """Start a stopped service again, as `start` did, and wait until it is ready."""
        if self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name)
        self.wait_ready(timeout, [name])

    def stop_nats(self, kill: bool = True) -> None:
        """kill -9 (or SIGTERM) the embedded nats-server; its data dir and port are kept."""
        if self.nats is None:
            raise RuntimeError("no embedded nats-server: IOPNET_NATS_URL names an external one")
        self.nats.stop(kill=kill)

    def start_nats(self) -> None:
        """Start the embedded nats-server again on the same port, data dir and users."""
        if self.nats is None:
            raise RuntimeError("no embedded nats-server: IOPNET_NATS_URL names an external one")
        self.nats.start()

    def wait_ready(self, timeout: float, names: Iterable[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.processes if names is None else names)
        with httpx.Client(timeout=1) as client:
            while pending:
                for name in sorted(pending):
                    if self.processes[name].poll() is not None:
                        raise RuntimeError(f"{name} exited during start ({self.processes[name].returncode})")
                    if self._answers_ready(client, name):
                        pending.discard(name)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {timeout}s: {', '.join(sorted(pending))}")
                if pending:
                    time.sleep(0.1)  # readiness poll of child processes

    def _answers_ready(self, client: httpx.Client, name: str) -> bool:
        """Ready, and it is `name` that answers: another process on its port (one that took
        the port first) must not pass for it."""
        try:
            answer = client.get(f"{self.url(name)}/readyz")
            return answer.status_code == 200 and answer.json().get("service") == name
        except (httpx.HTTPError, ValueError):
            return False

    def died(self) -> list[str]:
        return [name for name, process in self.processes.items() if process.poll() is not None]

    def stop(self) -> dict[str, int]:
        """SIGTERM every service (graceful: in-flight work finishes), then the broker."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        if self.nats is not None:
            self.nats.stop()
        for log in self._logs:
            log.close()
        return codes
