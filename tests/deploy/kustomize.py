"""A small renderer for the kustomize subset deploy/k8s uses, so the manifests are
checked here without kubectl or a cluster: `resources` (files and directories with a
kustomization.yaml), `namespace`, `images` (newName/newTag/digest) and `patches` with a
`path` (strategic-merge style: mappings merged, lists of named items merged by `name`,
other lists replaced). `kubectl kustomize deploy/k8s/overlays/production` renders the same."""

from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [d for d in documents if _key(d) == _key(change)]
        assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} resources"
        merged = merge(targets[0], change)
        documents[documents.index(targets[0])] = merged
    for image in kustomization.get("images", []):
        for container in _containers(documents):
            if _image_name(container["image"]) == image["name"]:
                name = image.get("newName", image["name"])
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                else:
                    container["image"] = f"{name}:{image.get('newTag', 'latest')}"
    if "namespace" in kustomization:
        for doc in documents:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    return documents


def merge(base: Any, change: Any) -> Any:
    if isinstance(base, dict) and isinstance(change, dict):
        out = dict(base)
        for key, value in change.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(change, list) and all(_named(x) for x in base + change):
        out = list(base)
        names = [item["name"] for item in out]
        for item in change:
            if item["name"] in names:
                out[names.index(item["name"])] = merge(out[names.index(item["name"])], item)
            else:
                out.append(item)
        return out
    if isinstance(base, list) and isinstance(change, list) and all(_named_claim(x) for x in base + change):
        out = list(base)
        names = [item["metadata"]["name"] for item in out]
        for item in change:
            index = names.index(item["metadata"]["name"])
            out[index] = merge(out[index], item)
        return out
    return change


def _named(item: Any) -> bool:
    return isinstance(item, dict) and "name" in item


def _named_claim(item: Any) -> bool:
    return isinstance(item, dict) and "name" in item.get("metadata", {})


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _image_name(image: str) -> str:
    image = image.split("@", 1)[0]
    head, _, tail = image.rpartition(":")
    return head if head and "/" not in tail else image


def _containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for doc in documents:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        out += spec.get("containers", []) + spec.get("initContainers", [])
    return out
