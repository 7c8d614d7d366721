"""Loads deploy/'s manifests for the tests: documents by kind and name, the pod templates
with their containers, and the ``scission up`` command line the head container runs."""

from __future__ import annotations

import copy
import functools
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECRETS_EXAMPLE = DEPLOY / "secrets.example.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
NAMESPACE = "scission"

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


@functools.cache
def _applied() -> tuple[tuple[str, Doc], ...]:
    return tuple((p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in _load(p))


def applied_docs() -> list[tuple[str, Doc]]:
    """(file name, document) of every object in deploy/k8s/ (the apply sequence); copies."""
    return [(name, copy.deepcopy(doc)) for name, doc in _applied()]


def secret_examples() -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in _load(SECRETS_EXAMPLE)}


def one(kind: str, name: str | None = None) -> Doc:
    found = [d for _, d in applied_docs()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, got {len(found)}"
    return found[0]


def of_kind(kind: str) -> list[Doc]:
    return [d for _, d in applied_docs() if d["kind"] == kind]


def pod_templates() -> Iterator[tuple[str, Doc]]:
    """(where, pod template) of every workload: StatefulSet/Deployment and RayCluster groups."""
    for _, doc in applied_docs():
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet"):
            yield name, doc["spec"]["template"]
        elif doc["kind"] == "RayCluster":
            yield f"{name} head", doc["spec"]["headGroupSpec"]["template"]
            for group in doc["spec"].get("workerGroupSpecs", []):
                yield f"{name} group {group['groupName']}", group["template"]


def containers(template: Doc) -> list[Doc]:
    """Init containers (sidecars included) then containers."""
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def head_template() -> Doc:
    return one("RayCluster")["spec"]["headGroupSpec"]["template"]


def head_container() -> Doc:
    return head_template()["spec"]["containers"][0]  # KubeRay: the Ray container is the first


def container_named(template: Doc, name: str) -> Doc:
    found = [c for c in containers(template) if c["name"] == name]
    assert len(found) == 1, f"no single container {name!r}"
    return found[0]


def scission_argvs() -> list[list[str]]:
    """The arguments after ``scission`` of each ``scission`` command in the head container's
    script, in order (``["status", ...]``, ``["up", ...]``), cut at the first shell word
    (a redirection, ``;``)."""
    script = "\n".join(head_container()["args"]).replace("\\\n", " ")
    found = []
    for line in script.splitlines():
        words = shlex.split(line)
        if "scission" not in words:
            continue
        argv = []
        for word in words[words.index("scission") + 1:]:
            if word.startswith(">") or ">&" in word or ";" in word:
                break
            argv.append(word)
        found.append(argv)
    return found


def scission_up_argv() -> list[str]:
    """The arguments after ``scission`` of the head container's ``scission up`` line."""
    ups = [argv for argv in scission_argvs() if argv[:1] == ["up"]]
    assert len(ups) == 1, f"the head container runs {len(ups)} `scission up` commands"
    return ups[0]


def flag_values(argv: list[str]) -> dict[str, str]:
    """``--flag=value`` / ``--flag value`` pairs of a container's argv (bare flags -> '')."""
    values: dict[str, str] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("--"):
            if "=" in word:
                key, value = word.split("=", 1)
                values[key] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values[word] = argv[i + 1]
                i += 1
            else:
                values[word] = ""
        i += 1
    return values


def container_ports(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def make_certs(out: Path) -> Path:
    """Runs ``deploy/make_certs.py --out out`` as an operator would; returns ``out``."""
    subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    return out
