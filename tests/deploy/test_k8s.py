"""deploy/k8s: plain YAML, a kustomize base and a production overlay, rendered here by
tests/deploy/kustomize.py and validated against the Kubernetes schemas
(kubernetes-validate, strict), then checked structurally. The NATS cluster's config is run
through `nats-server -t` with the accounts and users of iopnet/natsd.py."""

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from iopnet.natsd import PASSWORD_ENV, accounts_block, nats_server_binary
from tests.deploy.conftest import REPO
from tests.deploy.kustomize import render

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
SERVICES = {"intake": 8001, "scheduling": 8002, "notifications": 8003}
CONSOLE_PORT = 8000
RENDERED = {name: render(K8S / path) for name, path in (("base", "base"), ("production", "overlays/production"))}
SECRET_WORDS = re.compile(r"password|secret|token|key|credential", re.I)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_every_manifest_is_valid_against_the_kubernetes_schema(variant: str) -> None:
    docs = RENDERED[variant]
    assert len(docs) >= 20
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "no resource twice"
    assert all(d["metadata"].get("namespace") == "iopnet" for d in docs if d["kind"] != "Namespace")


def test_the_validator_refuses_a_broken_manifest() -> None:
    deployment = _one(RENDERED["base"], "Deployment", "intake")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    unknown = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", sorted(RENDERED))
@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_deployment(variant: str, service: str) -> None:
    docs = RENDERED[variant]
    deployment = _one(docs, "Deployment", service)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["iopnet", "serve", service]
    assert container["ports"] == [{"name": "http", "containerPort": SERVICES[service]}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    resources = container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"} and set(resources["limits"]) == {"cpu", "memory"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert (
        deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # Configuration from its ConfigMap, secrets as files from its Secret.
    assert container["envFrom"] == [{"configMapRef": {"name": f"iopnet-{service}"}}]
    config = _one(docs, "ConfigMap", f"iopnet-{service}")["data"]
    assert config["IOPNET_NATS_URL"] == f"nats://{service}@nats:4222"
    assert config[f"IOPNET_{service.upper()}_DATABASE_URL"] == f"postgresql+asyncpg://{service}@postgres:5432/{service}"
    for key, value in config.items():
        assert not SECRET_WORDS.search(key) and not re.search(r"://[^/@\s]*:[^/@\s]*@", value), key
    secret = _one(docs, "Secret", f"iopnet-{service}")
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == f"iopnet-{service}"
    assert mounts["secrets"] == {"name": "secrets", "mountPath": "/run/secrets/iopnet", "readOnly": True}
    files = {e["name"]: e["value"] for e in container["env"]}
    assert all(name.endswith("_FILE") for name in files)
    assert {value.removeprefix("/run/secrets/iopnet/") for value in files.values()} == set(secret["stringData"])
    assert files["IOPNET_JWT_SECRET_FILE"] == "/run/secrets/iopnet/jwt_secret"

    # Probed through a Service; a PodDisruptionBudget and an autoscaler for it.
    assert _one(docs, "Service", service)["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pdb = _one(docs, "PodDisruptionBudget", service)
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"] and pdb["spec"]["minAvailable"] >= 1
    hpa = _one(docs, "HorizontalPodAutoscaler", service)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": service}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert pdb["spec"]["minAvailable"] < hpa["minReplicas"], "a drain can always evict one pod"


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_notifications_safety_lane_has_pods_of_its_own(variant: str) -> None:
    """notifications-safety: the notifications pod spec (image, command, ConfigMap, Secret,
    probes, lockdown) with IOPNET_LANES=safety over the ConfigMap's routine, its own
    labels (the notifications Service, budget and autoscaler do not count it), a budget."""
    docs = RENDERED[variant]
    routine, safety = _one(docs, "Deployment", "notifications"), _one(docs, "Deployment", "notifications-safety")
    assert _one(docs, "ConfigMap", "iopnet-notifications")["data"]["IOPNET_LANES"] == "routine"
    (container,) = safety["spec"]["template"]["spec"]["containers"]
    (routine_container,) = routine["spec"]["template"]["spec"]["containers"]
    env = container["env"]
    assert env[0] == {"name": "IOPNET_LANES", "value": "safety"} and env[1:] == routine_container["env"]
    assert container | {"env": None, "resources": None} == routine_container | {"env": None, "resources": None}
    pod, routine_pod = safety["spec"]["template"]["spec"], routine["spec"]["template"]["spec"]
    assert pod["volumes"] == routine_pod["volumes"] and pod["securityContext"] == routine_pod["securityContext"]
    labels = {"app.kubernetes.io/name": "notifications-safety"}
    assert safety["spec"]["selector"]["matchLabels"] == labels and safety["spec"]["replicas"] >= 2
    assert _one(docs, "Service", "notifications")["spec"]["selector"] == {"app.kubernetes.io/name": "notifications"}
    assert _one(docs, "PodDisruptionBudget", "notifications-safety")["spec"]["selector"]["matchLabels"] == labels


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_pods_doing_routine_work_only_have_less_cpu_weight_than_those_carrying_safety_work(variant: str) -> None:
    """A container's CPU request is its weight when a node's cores are all busy (the cgroup
    counterpart of the niceness `iopnet run` gives its routine-only processes)."""
    docs = RENDERED[variant]

    def cpu_request(name: str) -> float:
        (container,) = _one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        request = container["resources"]["requests"]["cpu"]
        return float(request[:-1]) / 1000 if request.endswith("m") else float(request)

    routine, safety = ("scheduling", "notifications"), ("intake", "notifications-safety")
    assert max(cpu_request(name) for name in routine) < min(cpu_request(name) for name in safety)


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_secrets_are_templates_without_values(variant: str) -> None:
    secrets = [d for d in RENDERED[variant] if d["kind"] == "Secret"]
    expected = {f"iopnet-{s}" for s in SERVICES} | {"iopnet-console", "nats-passwords"}
    assert {s["metadata"]["name"] for s in secrets} == expected
    for secret in secrets:
        assert "data" not in secret
        assert secret["stringData"] and all(value == "" for value in secret["stringData"].values())


def test_the_production_overlay_sets_the_image_and_scales() -> None:
    for service in [*SERVICES, "console"]:
        (container,) = _one(RENDERED["production"], "Deployment", service)["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example.org/iopnet:0.1.0"
        (base,) = _one(RENDERED["base"], "Deployment", service)["spec"]["template"]["spec"]["containers"]
        assert base["image"] == "iopnet:local"
    assert _one(RENDERED["production"], "HorizontalPodAutoscaler", "intake")["spec"]["maxReplicas"] == 10
    claim = _one(RENDERED["production"], "StatefulSet", "nats")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], "the patch merges, it does not drop fields"


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_nats_is_a_three_node_statefulset_behind_a_headless_service(variant: str) -> None:
    docs = RENDERED[variant]
    statefulset = _one(docs, "StatefulSet", "nats")
    service = _one(docs, "Service", "nats")
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["serviceName"] == "nats" and service["spec"]["clusterIP"] == "None"
    assert {p["port"] for p in service["spec"]["ports"]} == {4222, 6222}, "monitoring not in the Service"
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"].startswith("/healthz")
    assert container["livenessProbe"]["httpGet"]["path"].startswith("/healthz")
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["image"] == _compose_nats_image(), "one nats-server release everywhere"
    assert _one(docs, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1, "a quorum of 2 stays"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["passwords"]["secret"]["secretName"] == "nats-passwords"


def _compose_nats_image() -> str:
    match = re.search(r"^    image: (nats:\S+)$", (REPO / "docker-compose.yml").read_text(), re.M)
    assert match is not None
    return match.group(1)


def test_nats_config_jetstream_fsync_routes_and_the_same_users(tmp_path: Path) -> None:
    docs = RENDERED["base"]
    config = _one(docs, "ConfigMap", "nats-config")["data"]
    conf = config["nats.conf"]
    assert re.search(r"^\s*sync_interval: always$", conf, re.M)
    assert "store_dir: /data" in conf and "server_name: $POD_NAME" in conf
    replicas = _one(docs, "StatefulSet", "nats")["spec"]["replicas"]
    routes = re.findall(r"nats-route://(nats-\d+)\.nats:6222", conf)
    assert routes == [f"nats-{i}" for i in range(replicas)], "a route to every node"
    references = {user: f"${variable}" for user, variable in PASSWORD_ENV.items()}
    assert config["accounts.conf"].rstrip("\n") == accounts_block(references, quote_passwords=False).rstrip("\n")
    assert "include ./accounts.conf" in conf
    script = (REPO / "deploy" / "compose" / "nats-entrypoint.sh").read_text()
    assert config["nats-entrypoint.sh"] == script, "the entrypoint compose runs"

    # The rendered files, as the pod sees them, through the entrypoint and `nats-server -t`.
    etc, secrets = tmp_path / "etc", tmp_path / "secrets"
    etc.mkdir()
    secrets.mkdir()
    for name, content in config.items():
        (etc / name).write_text(content)
    for key in _one(docs, "Secret", "nats-passwords")["stringData"]:
        (secrets / key).write_text("-7x\n")
    env = {key: value for key, value in os.environ.items() if key not in PASSWORD_ENV.values()}
    env |= {
        "POD_NAME": "nats-1",
        "NATS_SECRETS_DIR": str(secrets),
        "NATS_CONFIG": str(etc / "nats.conf"),
        "PATH": f"{Path(nats_server_binary()).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    result = subprocess.run(
        ["sh", str(etc / "nats-entrypoint.sh"), "-t"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr


@pytest.mark.parametrize("variant", sorted(RENDERED))
def test_the_console_deployment(variant: str) -> None:
    """Shaped like the services (probes, limits, non-root, read-only, rolling, secrets as
    files), with what the console needs only: its NATS user, its session key, the three
    services' URLs; no JWT secret, no database, no development sign-in."""
    docs = RENDERED[variant]
    deployment = _one(docs, "Deployment", "console")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["iopnet", "serve", "console"]
    assert container["ports"] == [{"name": "http", "containerPort": CONSOLE_PORT}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert set(container["resources"]["requests"]) == set(container["resources"]["limits"]) == {"cpu", "memory"}
    intake = _one(docs, "Deployment", "intake")["spec"]["template"]["spec"]
    assert pod["securityContext"] == intake["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == intake["containers"][0]["securityContext"]
    assert (
        deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    )
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "iopnet"

    assert container["envFrom"] == [{"configMapRef": {"name": "iopnet-console"}}]
    config = _one(docs, "ConfigMap", "iopnet-console")["data"]
    assert config["IOPNET_NATS_URL"] == "nats://console@nats:4222"
    assert config["IOPNET_HTTP_HOST"] == "0.0.0.0"
    for service, port in SERVICES.items():
        assert config[f"IOPNET_{service.upper()}_URL"] == f"http://{service}:{port}"
        assert _one(docs, "Service", service)["spec"]["ports"][0]["port"] == port
    assert config["IOPNET_CONSOLE_PUBLIC_URL"].startswith("https://")
    assert not [key for key in config if "DATABASE" in key or "RESTRICTED" in key or "DEV_SIGNIN" in key]
    for key, value in config.items():
        assert not SECRET_WORDS.search(key) and not re.search(r"://[^/@\s]*:[^/@\s]*@", value), key
    files = {e["name"]: e["value"] for e in container["env"]}
    assert files == {
        "IOPNET_NATS_PASSWORD_FILE": "/run/secrets/iopnet/nats_password",
        "IOPNET_CONSOLE_SESSION_SECRET_FILE": "/run/secrets/iopnet/session_secret",
    }
    secret = _one(docs, "Secret", "iopnet-console")
    assert set(secret["stringData"]) == {"nats_password", "session_secret"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "iopnet-console"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["secrets"] == {"name": "secrets", "mountPath": "/run/secrets/iopnet", "readOnly": True}
    assert "nats_console_password" in _one(docs, "Secret", "nats-passwords")["stringData"]

    service = _one(docs, "Service", "console")["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["ports"] == [{"name": "http", "port": CONSOLE_PORT, "targetPort": "http"}]
    pdb = _one(docs, "PodDisruptionBudget", "console")["spec"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "console")["spec"]
    assert pdb["selector"] == deployment["spec"]["selector"] and pdb["minAvailable"] < hpa["minReplicas"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "console"}


def test_network_policy_lets_the_console_reach_nats_and_the_services_only() -> None:
    policy = _one(RENDERED["base"], "NetworkPolicy", "console")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "console"}}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["ingress"] == [{"ports": [{"port": CONSOLE_PORT}]}], "browsers, through the ingress controller"
    pods = {
        rule["to"][0]["podSelector"]["matchLabels"].get("app.kubernetes.io/name"): [p["port"] for p in rule["ports"]]
        for rule in policy["egress"]
        if "podSelector" in rule["to"][0] and "namespaceSelector" not in rule["to"][0]
    }
    assert pods == {"nats": [4222], **{service: [port] for service, port in SERVICES.items()}}
    others = [rule for rule in policy["egress"] if "namespaceSelector" in rule["to"][0] or "ipBlock" in rule["to"][0]]
    dns, provider = others
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {p["port"] for p in dns["ports"]} == {53}
    assert provider["ports"] == [{"port": 443}], "the OpenID Connect provider, over HTTPS only"
    # NATS admits the console among iopnet's pods (client port only).
    console_labels = _one(RENDERED["base"], "Deployment", "console")["spec"]["template"]["metadata"]["labels"]
    nats = _one(RENDERED["base"], "NetworkPolicy", "nats")["spec"]["ingress"]
    assert any(
        rule["from"][0]["podSelector"]["matchLabels"].items() <= console_labels.items()
        and rule["ports"] == [{"port": 4222}]
        for rule in nats
    )


def test_network_policy_admits_only_iopnet_to_nats() -> None:
    policy = _one(RENDERED["base"], "NetworkPolicy", "nats")["spec"]
    rules = {rule["ports"][0]["port"]: rule["from"][0]["podSelector"]["matchLabels"] for rule in policy["ingress"]}
    assert rules == {4222: {"app.kubernetes.io/part-of": "iopnet"}, 6222: {"app.kubernetes.io/name": "nats"}}
