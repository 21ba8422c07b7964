"""The committed AsyncAPI documents (docs/asyncapi/) are the ones the code serves, and the
AsyncAPI parser (the library behind `asyncapi validate`, from npm) finds no error in them.

The parser is installed by this test into `.cache/asyncapi-parser` (gitignored), once,
with the machine's node and npm, pinned to one version."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from iopnet.asyncapi_docs import DOCS_DIR, documents, render
from shared.settings import SERVICES

REPO = Path(__file__).resolve().parents[2]
PARSER = "@asyncapi/parser@3.6.6"
CACHE = REPO / ".cache" / "asyncapi-parser"
VALIDATOR = Path(__file__).parent / "asyncapi" / "validate.mjs"


@pytest.fixture(scope="module")
def validator() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed to validate the AsyncAPI documents")
        pytest.skip("AsyncAPI validation skipped: node and npm are not installed")
    marker = CACHE / "node_modules" / "@asyncapi" / "parser" / "package.json"
    if not marker.exists() or json.loads(marker.read_text())["version"] != PARSER.rsplit("@", 1)[1]:
        CACHE.mkdir(parents=True, exist_ok=True)
        # --ignore-scripts: a dependency's postinstall would phone home; none is needed.
        subprocess.run(
            ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--ignore-scripts", PARSER],
            check=True,
            capture_output=True,
            timeout=600,
        )
    # ES modules resolve packages from the script's own folder: run it from the cache.
    script = CACHE / VALIDATOR.name
    shutil.copyfile(VALIDATOR, script)
    return script


@pytest.mark.parametrize("service", SERVICES)
def test_the_committed_document_is_the_one_the_code_builds(service: str) -> None:
    committed = (DOCS_DIR / f"{service}.json").read_text()
    assert committed == render(documents()[service]), f"docs/asyncapi/{service}.json is stale: run `make schemas`"


def test_every_document_validates_with_the_asyncapi_parser(validator: Path) -> None:
    paths = [str(DOCS_DIR / f"{service}.json") for service in SERVICES]
    result = subprocess.run(["node", str(validator), *paths], capture_output=True, text=True, timeout=120)
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).stem for r in reports] == list(SERVICES), result.stderr
    assert {Path(r["path"]).stem: r["errors"] for r in reports} == {service: [] for service in SERVICES}
    assert result.returncode == 0, result.stderr


def test_the_parser_catches_a_broken_reference(validator: Path, tmp_path: Path) -> None:
    """The check itself works: the nested-$defs mistake these documents once had is an error."""
    document = documents()["scheduling"]
    message = document["components"]["schemas"]["ProgramPublished"]
    message["properties"]["template"]["items"] = {"$ref": "#/$defs/TemplateBlock"}
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document))
    result = subprocess.run(["node", str(validator), str(broken)], capture_output=True, text=True, timeout=120)
    [report] = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1
    assert any("#/$defs/TemplateBlock" in error for error in report["errors"]), report


def test_documents_describe_the_contract() -> None:
    docs = documents()
    restricted = docs["notifications"]["channels"]["PatientContactChanged"]
    assert restricted["address"] == "iop.restricted.intake.patient_contact_changed.{site_id}"
    assert "notifications" in restricted["description"]
    for document in docs.values():
        assert document["servers"]["embedded"]["protocol"] == "nats"
        assert document["components"]["securitySchemes"]["natsUser"]["type"] == "userPassword"
        for message in document["components"]["messages"].values():
            assert message["headers"]["required"] == ["Nats-Msg-Id"]
        assert "$defs" not in json.dumps(document)
    assert set(docs["intake"]["operations"]) >= {"publishPatientEnrolled", "consumeProgramPublished"}
