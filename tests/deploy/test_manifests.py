"""deploy/k8s/ checked offline: core kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the RayCluster and ServiceMonitors against their CRDs' OpenAPI
v3 schemas (vendored in schemas/, jsonschema, unknown fields refused), and what no schema
sees: names that must exist, flags the real CLI must accept, ports that must agree."""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_manifests import (
    DEPLOY,
    NAMESPACE,
    REPO,
    SCHEMAS,
    applied_docs,
    container_named,
    container_ports,
    containers,
    flag_values,
    head_container,
    head_template,
    of_kind,
    one,
    pod_templates,
    scission_argvs,
    scission_up_argv,
    secret_examples,
)

from scission.cluster.cli import build_parser

KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"RayCluster": "ray.io_rayclusters.yaml",
                "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml"}
VENDORED_BLOBS = {"ray.io_rayclusters.yaml": "ff0be58ada3bd457605eff1f258c16df21e61e21",
                  "monitoring.coreos.com_servicemonitors.yaml":
                      "f5736255990a0e152851fadb55f84d6fd0f91d87"}


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server prunes them silently (and
    kubectl's strict field validation refuses them); jsonschema would accept them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    with (SCHEMAS / CUSTOM_KINDS[kind]).open(encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    assert crd["spec"]["names"]["kind"] == kind
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, f"{kind}: CRD group {crd['spec']['group']}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by the vendored CRD"
    schema = _strict(served[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def k8s_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_vendored_crds_are_the_recorded_upstream_files():
    """The schemas are KubeRay v1.7.0's and prometheus-operator v0.93.0's CRDs byte for byte
    (git blob hashes as recorded in schemas/README.md)."""
    readme = (SCHEMAS / "README.md").read_text()
    for name, blob in VENDORED_BLOBS.items():
        data = (SCHEMAS / name).read_bytes()
        got = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git hash-object
        assert got == blob, f"{name} changed: {got}"
        assert blob in readme, f"{name}'s blob is not recorded in schemas/README.md"


def test_core_kinds_validate_against_the_kubernetes_schemas():
    """Every core object in deploy/k8s/ and every Secret in secrets.example.yaml is valid for
    Kubernetes 1.33 with unknown fields refused; every namespaced one is in `scission`."""
    checked = []
    docs = [*applied_docs(), *(("secrets.example.yaml", d) for d in secret_examples().values())]
    for name, doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        k8s_validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']}"
        checked.append(doc["kind"])
    assert sorted(set(checked)) == ["Namespace", "Secret", "Service", "StatefulSet"]


def test_custom_resources_validate_against_their_crds():
    """The RayCluster matches KubeRay v1.7.0's ray.io/v1 schema and the ServiceMonitors
    prometheus-operator v0.93.0's, unknown fields refused; their metadata is a valid
    ObjectMeta and their pod templates valid Kubernetes 1.33 PodTemplates."""
    customs = [d for _, d in applied_docs() if d["kind"] in CUSTOM_KINDS]
    assert sorted(d["kind"] for d in customs) == ["RayCluster", "ServiceMonitor",
                                                  "ServiceMonitor"]
    for doc in customs:
        assert crd_errors(doc) == [], doc["metadata"]["name"]
        assert doc["metadata"]["namespace"] == NAMESPACE
        k8s_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]})
    for _, template in pod_templates():
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": "t", "namespace": NAMESPACE}, "template": template})


@pytest.mark.parametrize("path, value, message", [
    (("spec", "workerGroupSpec"), [], "Additional properties"),  # typo of workerGroupSpecs
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type 'string'"),
    (("spec", "workerGroupSpecs", 0, "groupName"), None, "is not of type 'string'"),
])
def test_crd_validation_refuses_broken_rayclusters(path, value, message):
    """The CRD check is not vacuous: an unknown field, a number where Ray's start params take
    strings, a null group name are each reported."""
    doc = one("RayCluster")
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = crd_errors(doc)
    assert len(errors) == 1 and message in errors[0], errors


def test_core_validation_refuses_a_broken_service():
    """kubernetes-validate in strict mode reports an unknown field and a bad port type."""
    service = one("Service", "scission-router")
    service["spec"]["port"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError, match="Additional properties"):
        k8s_validate(service)
    service = one("Service", "scission-router")
    service["spec"]["ports"][0]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(service)


def test_scission_up_args_parse_with_the_real_cli():
    """The head runs `scission up` with flags the real parser accepts, joining the Ray
    cluster and the external etcd over TLS with a client certificate, serving both doors with
    TLS and API keys, pools as stated."""
    args = build_parser().parse_args(scission_up_argv())
    assert args.command == "up"
    assert (args.ray_address, args.etcd_endpoints, args.host) == (
        "auto", f"scission-etcd.{NAMESPACE}.svc:2379", "0.0.0.0")
    assert (args.etcd_cacert, args.etcd_cert, args.etcd_key) == (
        "/etc/etcd-client/ca.crt", "/etc/etcd-client/tls.crt", "/etc/etcd-client/tls.key")
    assert (args.port, args.http_port, args.metrics_port, args.control_metrics_port) == (
        50051, 8000, 9400, 9401)
    assert (args.prefill, args.decode, args.encode, args.colocated) == (2, 2, 0, 0)
    assert args.tls_cert and args.tls_key and args.api_keys_file
    assert args.tls_client_ca is None and args.api_keys_env is None


def test_ports_agree_between_args_containers_services_and_monitors():
    """Each port `scission up` serves is a named container port; every Service port targets
    a named port of a pod its selector picks; each ServiceMonitor endpoint names a port of a
    Service it selects; probes use declared ports."""
    args = build_parser().parse_args(scission_up_argv())
    ports = container_ports(head_container())
    assert {"grpc": args.port, "http": args.http_port, "router-metrics": args.metrics_port,
            "control-metrics": args.control_metrics_port}.items() <= ports.items()
    templates = list(pod_templates())
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        picked = [t for _, t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert picked, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            for template in picked:
                named = {n for c in containers(template) for n in container_ports(c)}
                assert port["targetPort"] in named, (service["metadata"]["name"], port)
    for monitor in of_kind("ServiceMonitor"):
        match = monitor["spec"]["selector"]["matchLabels"]
        services = [s for s in of_kind("Service")
                    if match.items() <= s["metadata"]["labels"].items()]
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for endpoint in monitor["spec"]["endpoints"]:
            assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
                       for s in services), endpoint
    for _, template in templates:
        for c in containers(template):
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = c.get(probe, {}).get("httpGet")
                if action:
                    assert action["port"] in container_ports(c), (c["name"], probe)


def test_public_service_exposes_the_doors_and_no_metrics():
    """scission-router carries gRPC and HTTP only; the plaintext /metrics ports are in the
    ClusterIP Service scission-metrics, which the ServiceMonitor scrapes."""
    doors = {p["name"]: p["port"] for p in one("Service", "scission-router")["spec"]["ports"]}
    assert doors == {"grpc": 50051, "http": 8000}
    metrics = one("Service", "scission-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert {p["name"] for p in metrics["spec"]["ports"]} == {"router-metrics", "control-metrics"}


def _mounted_files(template: dict, container: dict) -> dict[str, tuple[str, str]]:
    """Mounted path -> (Secret name, key) of the container's Secret volumes."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")  # else a PVC template's
        if secret is None:
            continue
        assert "items" in secret, f"volume {mount['name']}: list the keys it needs"
        for item in secret["items"]:
            files[posixpath.join(mount["mountPath"], item["path"])] = (
                secret["secretName"], item["key"])
    return files


def _file_args(container: dict) -> list[str]:
    words = [*container.get("command", []), *container.get("args", [])]
    if container == head_container():
        words += [w for argv in scission_argvs() for w in argv]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        words += container.get(probe, {}).get("exec", {}).get("command", [])
    return [w for w in (*flag_values(words).values(), *words) if re.match(r"^/etc/", w)]


def test_every_secret_file_an_arg_names_is_mounted_from_a_known_secret():
    """Each /etc/... path in a command, `scission up` flag or probe is a key of a mounted
    Secret volume, and every Secret volume names a Secret and keys of secrets.example.yaml."""
    examples = secret_examples()
    for where, template in pod_templates():
        for c in containers(template):
            files = _mounted_files(template, c)
            for path in _file_args(c):
                assert path in files, f"{where} {c['name']}: {path} is not mounted"
            for secret, key in files.values():
                assert secret in examples, f"{where}: Secret {secret} not in secrets.example"
                assert key in examples[secret]["stringData"], f"{secret} has no key {key}"
    used = {s for _, t in pod_templates() for c in containers(t)
            for s, _ in _mounted_files(t, c).values()}
    assert used == set(examples), "secrets.example.yaml lists a Secret nothing mounts"


def test_router_files_are_on_every_ray_pod():
    """Ray may place the router on any node, so every RayCluster pod mounts the TLS and
    API-key files `scission up` names, at the same paths."""
    args = build_parser().parse_args(scission_up_argv())
    needed = {args.tls_cert, args.tls_key, args.api_keys_file}
    for where, template in pod_templates():
        if "RayCluster" in where:
            ray_container = template["spec"]["containers"][0]
            assert needed <= _mounted_files(template, ray_container).keys(), where


def test_etcd_is_tls_with_client_certificates_and_scission_dials_its_service():
    """etcd serves clients and peers only over TLS with client-certificate auth; `scission
    up` dials the etcd client Service's client port with the CA, certificate and key of the
    Secret scission-etcd-client-tls, mounted on the head only (the actors get the PEMs through
    Ray); the head first waits for etcd with `scission status` and the same etcd flags; no
    Ray pod runs a sidecar."""
    etcd = flag_values(container_named(one("StatefulSet", "scission-etcd")["spec"]["template"],
                                       "etcd")["args"])
    assert "--client-cert-auth" in etcd and "--peer-client-cert-auth" in etcd
    for key in ("--listen-client-urls", "--advertise-client-urls", "--listen-peer-urls",
                "--initial-advertise-peer-urls"):
        assert etcd[key].startswith("https://"), key
    members = etcd["--initial-cluster"].split(",")
    assert len(members) == one("StatefulSet", "scission-etcd")["spec"]["replicas"]
    args = build_parser().parse_args(scission_up_argv())
    client_service = one("Service", "scission-etcd")
    host, port = args.etcd_endpoints.rsplit(":", 1)
    assert host == f"{client_service['metadata']['name']}.{NAMESPACE}.svc"
    client_port = next(p for p in client_service["spec"]["ports"] if p["port"] == int(port))
    assert client_port["name"] == "client"
    files = _mounted_files(head_template(), head_container())
    assert [files[f] for f in (args.etcd_cacert, args.etcd_cert, args.etcd_key)] == [
        ("scission-etcd-client-tls", k) for k in ("ca.crt", "tls.crt", "tls.key")]
    status, up = scission_argvs()
    assert status[0] == "status" and up[0] == "up"
    wait = build_parser().parse_args(status)
    for flag in ("etcd_endpoints", "etcd_cacert", "etcd_cert", "etcd_key"):
        assert getattr(wait, flag) == getattr(args, flag), flag
    for where, template in pod_templates():
        if "RayCluster" not in where:
            continue
        assert "initContainers" not in template["spec"], where
        if "head" not in where:
            mounted = {s for c in containers(template)
                       for s, _ in _mounted_files(template, c).values()}
            assert "scission-etcd-client-tls" not in mounted, where


def test_every_container_has_requests_limits_and_probes():
    """Each container states CPU and memory requests and limits; etcd and the router head
    have readiness and liveness probes (the head a startup probe too); the gRPC readiness
    probe checks scission.v1.Generation, which the router serves without an API key."""
    for where, template in pod_templates():
        for c in containers(template):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][bound].keys(), (where, c["name"])
    etcd = container_named(one("StatefulSet", "scission-etcd")["spec"]["template"], "etcd")
    head = head_container()
    for c in (etcd, head):
        assert "readinessProbe" in c and "livenessProbe" in c, c["name"]
    assert "startupProbe" in head
    probe = flag_values(head["readinessProbe"]["exec"]["command"])
    assert probe["--service"] == "scission.v1.Generation"
    assert probe["--addr"].endswith(f":{container_ports(head)['grpc']}")
    assert (DEPLOY / "grpc_health_probe.py").is_file()  # the image has deploy/
    assert head_template()["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"


def test_readme_creates_the_secrets_the_manifests_use():
    """deploy/README.md's `kubectl create secret` commands create exactly the Secrets of
    secrets.example.yaml, each from a folder `make_certs.py` writes with the same keys."""
    text = (DEPLOY / "README.md").read_text()
    created = re.findall(r"kubectl -n scission create secret generic (\S+)\s+--from-file=(\S+)",
                         text)
    assert sorted(name for name, _ in created) == sorted(secret_examples())
    for name, source in created:
        assert source.rstrip("/").endswith(name), (name, source)


def test_apply_sequence_in_readme_covers_every_manifest():
    """The README's `kubectl apply -f` lines apply every file of deploy/k8s/, namespace first,
    and never the Secret examples."""
    text = (DEPLOY / "README.md").read_text()
    applied = re.findall(r"kubectl apply -f (deploy/\S+)", text)
    files = sorted(f"deploy/k8s/{p.name}" for p in (REPO / "deploy" / "k8s").glob("*.yaml"))
    assert sorted(applied) == files
    assert applied[0] == "deploy/k8s/namespace.yaml"
    assert "secrets.example.yaml" not in " ".join(applied)


def test_image_holds_the_deploy_scripts_and_no_secrets():
    """The image copies the repository (so /opt/scission/deploy/ has the readiness probe
    the manifests run) and its BuildKit ignore file keeps the virtualenv, git history,
    certificates and keys out; it exposes the ports `scission up` serves."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /opt/scission" in dockerfile and "COPY . ." in dockerfile
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".git", ".venv", "certs", "*.key", "*.pem"} <= ignored
    args = build_parser().parse_args(scission_up_argv())
    exposed = re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()
    assert {str(p) for p in (args.port, args.http_port, args.metrics_port,
                             args.control_metrics_port)} <= set(exposed)
