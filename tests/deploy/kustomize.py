"""A small kustomize renderer for the subset k8s/ uses, so the manifests are checked without a binary.

kustomize (and `kubectl kustomize`) is in no registry we can rely on; where kubectl is installed, the
tests compare this renderer's output with it, object by object. Supported: `resources` (files and
folders with a kustomization), `components` (folders holding a `kind: Component`, whose resources are added and
whose patches apply to everything so far, before the including kustomization's own patches), `namespace`,
`labels` (metadata only), `images`, `replicas`, and `patches`, either strategic-merge (by kind and name, or a
`target`) or JSON 6902 (with a `target`).
Anything else in a kustomization, and any merge this module does not know how to do faithfully,
raises NotImplementedError instead of rendering something kustomize would not.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
}
COMPONENT_FIELDS = {"apiVersion", "kind", "resources", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "APIService",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "CustomResourceDefinition",
    "IngressClass",
    "RuntimeClass",
}
# Lists that a strategic merge patch merges item by item, and the key that identifies an item
# (the patchMergeKey of the Kubernetes API for these fields).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# Lists of objects without a merge key in the API: a patch replaces them whole.
REPLACED_LISTS = {"tolerations", "args", "command", "accessModes", "topologySpreadConstraints", "metrics"}
POD_SPEC_PATHS = (
    ("spec",),
    ("spec", "template", "spec"),
    ("spec", "jobTemplate", "spec", "template", "spec"),
)
SCALABLE_KINDS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file."""
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` produces (in resource order)."""
    kustomization = _read_kustomization(folder)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise NotImplementedError(f"{folder}: kustomization fields {sorted(unknown)} are not supported here")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for entry in kustomization.get("components", []):
        objects = _add_component(objects, (folder / entry).resolve())
    _check_unique(objects, folder)
    for patch in kustomization.get("patches", []):
        _apply_patch(objects, patch, folder)
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
            # As kustomize does: ServiceAccount subjects of role bindings follow the namespace too.
            if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                for subject in obj.get("subjects", []):
                    if subject.get("kind") == "ServiceAccount":
                        subject["namespace"] = kustomization["namespace"]
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise NotImplementedError(f"{folder}: labels with includeSelectors/includeTemplates")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for image in kustomization.get("images", []):
        _set_image(objects, image)
    for replica in kustomization.get("replicas", []):
        matches = [o for o in objects if o["kind"] in SCALABLE_KINDS and o["metadata"]["name"] == replica["name"]]
        if not matches:
            raise ValueError(f"{folder}: replicas for {replica['name']!r} match no workload")
        for obj in matches:
            obj["spec"]["replicas"] = replica["count"]
    return objects


def _add_component(objects: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """`objects` with a Component's resources added and its patches applied to them all (kustomize's order)."""
    component = _read_kustomization(folder)
    if component.get("kind") != "Component":
        raise ValueError(f"{folder} is listed under components but is a {component.get('kind')}")
    unknown = set(component) - COMPONENT_FIELDS
    if unknown:
        raise NotImplementedError(f"{folder}: component fields {sorted(unknown)} are not supported here")
    objects = list(objects)
    for entry in component.get("resources", []):
        path = (folder / entry).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    _check_unique(objects, folder)
    for patch in component.get("patches", []):
        _apply_patch(objects, patch, folder)
    return objects


def _read_kustomization(folder: Path) -> dict[str, Any]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text()) or {}
    raise FileNotFoundError(f"{folder} has no kustomization.yaml")


def _check_unique(objects: list[dict[str, Any]], folder: Path) -> None:
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            raise ValueError(f"{folder}: {key} is defined twice")
        seen.add(key)


def _targets(objects: list[dict[str, Any]], target: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = set(target) - {"kind", "name", "group", "version"}
    if unknown:
        raise NotImplementedError(f"patch target selectors {sorted(unknown)}")
    found = []
    for obj in objects:
        group, _, version = obj["apiVersion"].rpartition("/")
        if "kind" in target and obj["kind"] != target["kind"]:
            continue
        if "name" in target and obj["metadata"]["name"] != target["name"]:
            continue
        if "group" in target and group != target["group"]:
            continue
        if "version" in target and version != target["version"]:
            continue
        found.append(obj)
    return found


def _apply_patch(objects: list[dict[str, Any]], entry: dict[str, Any], folder: Path) -> None:
    text = (folder / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    target = entry.get("target")
    if isinstance(patch, list):
        if target is None:
            raise ValueError(f"{folder}: a JSON 6902 patch needs a target")
        matches = _targets(objects, target)
        if not matches:
            raise ValueError(f"{folder}: patch target {target} matches nothing")
        for obj in matches:
            for operation in patch:
                _json6902(obj, operation)
        return
    if target is None:
        target = {"kind": patch["kind"], "name": patch["metadata"]["name"]}
    matches = _targets(objects, target)
    if not matches:
        raise ValueError(f"{folder}: strategic merge patch for {target} matches nothing")
    for obj in matches:
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        merged = strategic_merge(obj, body)
        if "metadata" in patch:
            extra = {k: v for k, v in patch["metadata"].items() if k not in ("name", "namespace")}
            merged["metadata"] = strategic_merge(merged["metadata"], extra)
        obj.clear()
        obj.update(merged)


def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Merge `patch` into `target` the way a Kubernetes strategic merge patch does, for known fields."""
    if isinstance(patch, dict):
        if any(key.startswith("$") for key in patch):
            raise NotImplementedError(f"patch directives {[k for k in patch if k.startswith('$')]}")
        if not isinstance(target, dict):
            return copy.deepcopy(patch)
        merged = copy.deepcopy(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list):
        if not isinstance(target, list) or all(not isinstance(item, dict) for item in patch):
            return copy.deepcopy(patch)
        if field in REPLACED_LISTS:
            return copy.deepcopy(patch)
        key = MERGE_KEYS.get(field)
        if key is None:
            raise NotImplementedError(f"strategic merge of the list {field!r}: merge key unknown here")
        # Items named in the patch come first, in the patch's order, then the target's others (kyaml).
        by_key = {item[key]: item for item in target}
        merged = [strategic_merge(by_key.get(item[key], {}), item) for item in patch]
        named = {item[key] for item in patch}
        return merged + [copy.deepcopy(item) for item in target if item[key] not in named]
    return patch


def _json6902(obj: dict[str, Any], operation: dict[str, Any]) -> None:
    op = operation["op"]
    parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].lstrip("/").split("/")]
    parent = obj
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        elif op == "remove":
            del parent[index]
        else:
            raise NotImplementedError(f"JSON patch op {op!r}")
        return
    if op in ("add", "replace"):
        if op == "replace" and last not in parent:
            raise KeyError(f"JSON patch replace of missing {operation['path']}")
        parent[last] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[last]
    else:
        raise NotImplementedError(f"JSON patch op {op!r}")


def split_image(reference: str) -> tuple[str, str]:
    """("name", ":tag" or "@digest" or "") of an image reference (a registry port is not a tag)."""
    if "@" in reference:
        name, _, digest = reference.partition("@")
        return name, "@" + digest
    slash = reference.rfind("/")
    colon = reference.rfind(":")
    if colon > slash:
        return reference[:colon], reference[colon:]
    return reference, ""


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload (Deployment, StatefulSet, Job, CronJob, Pod)."""
    specs = []
    for path in POD_SPEC_PATHS:
        node: Any = obj
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and "containers" in node:
            specs.append(node)
    return specs


def _set_image(objects: list[dict[str, Any]], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise NotImplementedError(f"image fields {sorted(unknown)}")
    for obj in objects:
        for spec in pod_specs(obj):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                name, suffix = split_image(container["image"])
                if name != image["name"]:
                    continue
                if "digest" in image:
                    suffix = "@" + image["digest"]
                elif "newTag" in image:
                    suffix = ":" + str(image["newTag"])
                container["image"] = image.get("newName", name) + suffix
