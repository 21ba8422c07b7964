"""The CLI as a user runs it: `iopnet run --demo` brings the network up on its embedded
nats-server, the console beside the services with the development sign-in (its demo
users are the demo data's staff), and Ctrl-C (SIGINT) stops every process; `iopnet token`
is accepted."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from iopnet.demo import DEMO_SITES
from iopnet.natsd import free_port
from iopnet.testing import LineReader
from services.console.signin import DEMO_STAFF


def test_run_demo_then_ctrl_c(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("INTAKE", "SCHEDULING", "NOTIFICATIONS", "CONSOLE", "EMBEDDED_NATS")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOPNET_")}
    env.update({f"IOPNET_{name}_PORT": str(port) for name, port in ports.items()})
    env["IOPNET_DATA_DIR"] = str(tmp_path / ".data")
    process = subprocess.Popen(
        [sys.executable, "-m", "iopnet.cli", "run", "--demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = LineReader(process.stdout)
    try:
        printed = output.wait_for("iopnet is up", timeout=90)
        assert f"nats://127.0.0.1:{ports['EMBEDDED_NATS']} (embedded" in printed
        assert "demo: 2 sites, 5 patients enrolled" in printed
        assert (tmp_path / ".data" / "nats" / "jetstream").is_dir()
        # Private at rest: names, contact details and passwords are the owner's only.
        exposed = [p for p in (tmp_path / ".data").rglob("*") if p.stat().st_mode & 0o077]
        assert not exposed and (tmp_path / ".data").stat().st_mode & 0o777 == 0o700, exposed
        assert {p.name for p in (tmp_path / ".data").glob("*.db")} == {
            "intake.db", "scheduling.db", "notifications.db",
        }  # fmt: skip

        token = subprocess.run(
            [sys.executable, "-m", "iopnet.cli", "token", "--role", "clinician", "--site", "columbus-east"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        with httpx.Client(timeout=5) as http:
            sites = http.get(f"http://127.0.0.1:{ports['INTAKE']}/sites", headers={"Authorization": f"Bearer {token}"})
        assert [s["site_id"] for s in sites.json()] == ["columbus-east"]

        assert f"http://127.0.0.1:{ports['CONSOLE']}  (sign in: " in printed
        demo_patient = re.search(r"as a patient with patient id ([0-9a-f-]{36})", printed)
        assert demo_patient, printed
        check_the_console(f"http://127.0.0.1:{ports['CONSOLE']}", demo_patient.group(1))
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    assert code == 0, output.text()
    assert "iopnet stopped" in output.text()
    with httpx.Client(timeout=1) as http:
        for name in ("INTAKE", "SCHEDULING", "NOTIFICATIONS", "CONSOLE"):
            try:
                http.get(f"http://127.0.0.1:{ports[name]}/healthz")
            except httpx.ConnectError:
                continue
            raise AssertionError(f"{name} still answering after Ctrl-C")


def check_the_console(console: str, patient_id: str) -> None:
    """Up and ready (its NATS user hears the bus), the development sign-in offered with
    the demo staff, whose sites are the demo data's; a demo clinician signs in and the
    alert inbox loads from notifications with the token the console minted."""
    with httpx.Client(base_url=console, timeout=10) as browser:
        assert browser.get("/healthz").status_code == 200
        ready = browser.get("/readyz")
        assert ready.status_code == 200 and ready.json()["service"] == "console", ready.text
        page = browser.get("/signin")
        assert page.status_code == 200 and 'action="/signin/dev"' in page.text
        for sub, _, _ in DEMO_STAFF:
            assert f'value="{sub}"' in page.text
        staff_sites = {site for _, _, sites in DEMO_STAFF for site in sites}
        assert staff_sites == {site["site_id"] for site in DEMO_SITES}, "demo users for the demo sites"
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        signed_in = browser.post("/signin/dev", data={"csrf": csrf.group(1), "sub": "demo-clinician"})
        assert signed_in.status_code == 303, signed_in.text
        inbox = browser.get("/alerts")
        assert inbox.status_code == 200 and 'action="/signout"' in inbox.text, inbox.text
        browser.cookies.clear()
        page = browser.get("/signin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        as_patient = {"csrf": csrf.group(1), "sub": "demo-patient", "patient_id": patient_id}
        assert browser.post("/signin/dev", data=as_patient).headers["location"] == "/me"
        mine = browser.get("/me")
        assert mine.status_code == 200 and "My schedule" in mine.text and "My consents" in mine.text
