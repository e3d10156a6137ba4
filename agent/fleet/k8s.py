"""A plan as Kubernetes manifests for K3s or KubeEdge fleets.

Per board that hosts anything: a ConfigMap holding its agent config (``agent.toml``) and a
Deployment of one replica pinned to that node. Why per-node Deployments and not one DaemonSet:
every board runs a *different* config (the plan gives each its own applications), and a DaemonSet
mounts one ConfigMap on all its pods. The node is chosen by ``nodeSelector`` on both the node's
name (``kubernetes.io/hostname``, which is the board's device id in the plan) and its board kind
(the label ``edge-agent.io/board-kind``, which an operator puts on each node: ``kubectl label node
NAME edge-agent.io/board-kind=KIND``), so a pod never lands on a board of another kind.

Resources: CPU requested as the board kind says (``cpu_request`` / ``cpu_limit``), memory
requested as the plan's predicted footprint; an accelerator is asked for through its device
plugin's extended resource (``device_resource`` of the kind: NVIDIA's device plugin on Jetson
advertises ``nvidia.com/gpu``; an Edge TPU plugin's name is whatever that fleet's plugin
advertises, so it is set in the profile, not guessed here). With ``kubeedge=True`` the pods also
tolerate the ``node-role.kubernetes.io/edge`` taint and select edge nodes, as KubeEdge's
edge nodes carry that role.

The output is YAML written by :func:`to_yaml` (block style, every string value double-quoted:
JSON string syntax, valid YAML), so no YAML library is needed on the machine that plans.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["KIND_LABEL", "APP_LABEL", "board_manifests", "to_yaml", "k8s_name"]

KIND_LABEL = "edge-agent.io/board-kind"
APP_LABEL = "app.kubernetes.io/name"
CONFIG_DIR = "/etc/edge-agent"


def k8s_name(text: str) -> str:
    """A DNS-1123 label from ``text``: lower case, [a-z0-9-], at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return name[:63].rstrip("-") or "board"


def board_manifests(board_name: str, kind_name: str, config_toml: str, *, namespace: str = "edge-agent",
                    image: str = "edge-agent:latest", cpu_request: str = "1", cpu_limit: str | None = None,
                    memory_mb: float = 256.0, device_resource: str | None = None,
                    kubeedge: bool = False) -> list[dict[str, Any]]:
    """The ConfigMap and the Deployment of one board (see the module docstring)."""
    name = f"edge-agent-{k8s_name(board_name)}"
    labels = {APP_LABEL: "edge-agent", "edge-agent.io/board": k8s_name(board_name), KIND_LABEL: kind_name}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {"agent.toml": config_toml},
    }
    memory = f"{int(math.ceil(memory_mb))}Mi"
    requests: dict[str, str] = {"cpu": cpu_request, "memory": memory}
    limits: dict[str, str] = {"memory": memory}
    if cpu_limit:
        limits["cpu"] = cpu_limit
    if device_resource:
        # Extended resources are requested through limits (requests default to them, and must equal).
        limits[device_resource] = "1"
        requests[device_resource] = "1"
    selector = {"kubernetes.io/hostname": board_name, KIND_LABEL: kind_name}
    if kubeedge:
        selector["node-role.kubernetes.io/edge"] = ""
    pod_spec: dict[str, Any] = {
        "nodeSelector": selector,
        "containers": [{
            "name": "agent",
            "image": image,
            "args": ["run", "--config", f"{CONFIG_DIR}/agent.toml"],
            "resources": {"requests": requests, "limits": limits},
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
        }],
        "volumes": [{"name": "config", "configMap": {"name": name}}],
    }
    if kubeedge:
        pod_spec["tolerations"] = [{"key": "node-role.kubernetes.io/edge", "operator": "Exists",
                                    "effect": "NoSchedule"}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            # One board, one agent: the old pod stops before the new one starts (it holds the device).
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {APP_LABEL: "edge-agent", "edge-agent.io/board": k8s_name(board_name)}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return [config_map, deployment]


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


_PLAIN_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-/]*$")


def _yaml_key(key: Any) -> str:
    text = str(key)
    return text if _PLAIN_KEY.match(text) else json.dumps(text)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{_yaml_key(key)}:")
                out += _yaml_lines(item, indent + 2)
            else:
                empty = "{}" if isinstance(item, dict) else "[]"
                out.append(f"{pad}{_yaml_key(key)}: {empty if isinstance(item, (dict, list)) else _yaml_scalar(item)}")
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            inner = _yaml_lines(item, indent + 2)
            first = inner[0].lstrip()
            out.append(f"{pad}- {first}")
            out += inner[1:]
        return out
    return [pad + _yaml_scalar(value)]


def to_yaml(documents: list[dict[str, Any]]) -> str:
    """Several documents as one YAML stream (``---`` between them)."""
    return "".join("---\n" + "\n".join(_yaml_lines(doc, 0)) + "\n" for doc in documents)
