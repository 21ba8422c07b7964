"""deploy/nats: the three-node cluster's configs are what iopnet/natsd.py generates (the
same accounts block as deploy/nats.conf), JetStream fsyncs every write on every node, the
routes name all three, and each node's config passes `nats-server -t` through the compose
entrypoint (passwords from files)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from iopnet.natsd import (
    CLUSTER_NODES,
    PASSWORD_ENV,
    deployed_accounts_block,
    deployed_cluster_node,
    nats_server_binary,
)
from tests.deploy.conftest import REPO

CLUSTER = REPO / "deploy" / "nats"


def test_the_files_are_generated_and_current() -> None:
    accounts = (CLUSTER / "accounts.conf").read_text()
    assert accounts.endswith(deployed_accounts_block()), "run `make schemas`"
    single = (REPO / "deploy" / "nats.conf").read_text()
    assert single.endswith(deployed_accounts_block()), "the single node has the same users"
    for name in CLUSTER_NODES:
        assert (CLUSTER / f"{name}.conf").read_text() == deployed_cluster_node(name), "run `make schemas`"


@pytest.mark.parametrize("name", CLUSTER_NODES)
def test_each_node_fsyncs_routes_to_all_and_includes_the_accounts(name: str) -> None:
    conf = (CLUSTER / f"{name}.conf").read_text()
    assert re.search(r"^  sync_interval: always$", conf, re.M)
    assert f"server_name: {name}\n" in conf
    assert re.findall(r"nats-route://(nats-\d):6222", conf) == list(CLUSTER_NODES)
    assert "no_advertise: true" in conf, "clients list every node, with their credentials"
    assert "http: 127.0.0.1:8222" in conf, "monitoring on loopback only"
    assert conf.rstrip().endswith("include ./accounts.conf")


@pytest.mark.parametrize("name", CLUSTER_NODES)
def test_each_node_config_is_valid_with_passwords_from_files(tmp_path: Path, name: str) -> None:
    etc, secrets = tmp_path / "etc", tmp_path / "secrets"
    shutil.copytree(CLUSTER, etc)
    secrets.mkdir()
    for user in PASSWORD_ENV:
        (secrets / f"nats_{user.replace('-', '_')}_password").write_text("-7x\n")
    env = {key: value for key, value in os.environ.items() if key not in PASSWORD_ENV.values()}
    env |= {
        "NATS_SECRETS_DIR": str(secrets),
        "NATS_CONFIG": str(etc / f"{name}.conf"),
        "PATH": f"{Path(nats_server_binary()).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    script = REPO / "deploy" / "compose" / "nats-entrypoint.sh"
    result = subprocess.run(["sh", str(script), "-t"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr
