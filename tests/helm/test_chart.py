"""The Helm chart, rendered by Helm's own engine and checked against Kubernetes' own schemas.

``helm_python`` (PyPI ``helm-python-sdk``) binds Helm v4's Go SDK: rendering, values-schema
validation and ``helm lint`` here are exactly what ``helm install`` / ``helm lint`` do, with no
cluster. ``kubernetes_validate`` holds the OpenAPI schemas of each Kubernetes release; every
rendered manifest is validated strictly (unknown fields are errors) against the oldest release the
chart supports (Chart.yaml ``kubeVersion``) and the newest one the package knows.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from extauthz.config import parse_config

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "extauthz"
RELEASE, NAMESPACE = "extauthz", "extauthz"  # as the Envoy and Istio examples assume

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


class Rendered:
    """One `helm template`: the manifests by kind, and NOTES.txt."""

    def __init__(self, files: dict[str, str]) -> None:
        self.notes = next((text for name, text in files.items() if name.endswith("NOTES.txt")), "")
        self.manifests: list[Manifest] = [
            doc
            for name, text in sorted(files.items())
            if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def kinds(self) -> list[str]:
        return sorted(m["kind"] for m in self.manifests)

    def all(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert [c["name"] for c in containers] == ["extauthz"]
        return dict(containers[0])


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Rendered:
    return Rendered(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))


# A policy that needs client secrets: one from a mounted Secret file, one from the environment.
INTROSPECTION_POLICY: dict[str, Any] = {
    "server": {"denyStatusOnIdpFailure": 503},
    "deployments": [
        {
            "name": "orders",
            "hosts": ["api.example.com"],
            "pathPrefix": "/orders",
            "authentication": {
                "type": "TOKEN_AUTHENTICATION",
                "validationPolicy": {
                    "type": "REMOTE_INTROSPECTION",
                    "uri": "https://idp.example.com/oauth2/v1/introspect",
                    "clientDetails": {
                        "clientId": "orders-gateway",
                        "clientSecretFile": "/var/run/secrets/extauthz/orders",
                    },
                },
            },
        },
        {
            "name": "billing",
            "pathPrefix": "/billing",
            "authentication": {
                "type": "TOKEN_AUTHENTICATION",
                "validationPolicy": {
                    "type": "REMOTE_DISCOVERY",
                    "uri": "https://idp.example.com/.well-known/openid-configuration",
                    "clientDetails": {
                        "clientId": "billing-gateway",
                        "clientSecretEnv": "BILLING_CLIENT_SECRET",
                        "authMethod": "client_secret_post",
                    },
                },
            },
        },
    ],
}

EXISTING_SECRET: dict[str, Any] = {
    "config": INTROSPECTION_POLICY,
    "clientSecrets": {
        "existingSecret": "idp-clients",
        "env": [{"name": "BILLING_CLIENT_SECRET", "secretName": "idp-clients", "key": "billing"}],
    },
    "otel": {
        "endpoint": "http://otel-collector.observability:4317",
        "headersSecret": {"name": "otel-auth", "key": "headers"},
        "sampler": "parentbased_traceidratio",
        "samplerArg": "0.25",
        "resourceAttributes": {"deployment.environment": "production"},
    },
}

MATRIX: dict[str, dict[str, Any]] = {
    "default": {},
    "hpa": {
        "autoscaling": {
            "enabled": True,
            "minReplicas": 3,
            "maxReplicas": 12,
            "targetMemoryUtilizationPercentage": 80,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        }
    },
    "servicemonitor": {
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "metricRelabelings": [
                {"action": "drop", "regex": "python_gc_.*", "sourceLabels": ["__name__"]}
            ],
        }
    },
    "networkpolicy": {
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "istio-system"}
                    }
                }
            ],
            "adminFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
            "egress": {
                "enabled": True,
                "rules": [
                    {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443}]}
                ],
            },
        }
    },
    "existing-configmap": {
        "existingConfigMap": "orders-policy",
        "existingConfigMapKey": "policy.yaml",
    },
    "existing-secret": EXISTING_SECRET,
    "everything": {
        **EXISTING_SECRET,
        "autoscaling": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {"enabled": True, "egress": {"enabled": True}},
        "podDisruptionBudget": {"minAvailable": "50%"},
        "service": {"trafficDistribution": "PreferClose"},
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "system-cluster-critical",
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "auth", "effect": "NoSchedule"}
        ],
        "configFiles": {
            "idp-ca.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
        },
    },
}


@pytest.fixture(scope="module", params=sorted(MATRIX), ids=sorted(MATRIX))
def case(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict[str, Any], Rendered]:
    name: str = request.param
    return name, MATRIX[name], render(chart, MATRIX[name])


@pytest.fixture(scope="module")
def default(chart: helm.Chart) -> Rendered:
    return render(chart)


# ---------------------------------------------------------------------------------------------
# Kubernetes schemas
# ---------------------------------------------------------------------------------------------


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart declares support for, and the newest one known."""
    declared = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    oldest = re.search(r">=\s*v?(\d+\.\d+)", declared)
    assert oldest, f"Chart.yaml kubeVersion {declared!r} has no lower bound"
    return [oldest.group(1), kubernetes_validate.latest_version()]


# ServiceMonitor is a Prometheus Operator CRD, which kubernetes-validate does not know: check it
# against the fields of monitoring.coreos.com/v1 the chart uses, closed to typos like the others.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}  # Prometheus duration
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": _STRING_MAP,
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": {"type": "object"}},
                            "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
    },
}


def validate_manifest(manifest: Manifest, version: str) -> None:
    if manifest["kind"] == "ServiceMonitor":
        jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", kube_versions())
def test_every_manifest_is_valid_kubernetes(
    case: tuple[str, dict[str, Any], Rendered], version: str
) -> None:
    """Each rendered object passes the strict schema of that Kubernetes release."""
    _, _, rendered = case
    assert rendered.manifests
    for manifest in rendered.manifests:
        try:
            validate_manifest(manifest, version)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            pytest.fail(
                f"{manifest['kind']} {manifest['metadata']['name']}: {where}: {exc.message}"
            )


def test_matrix_renders_the_expected_objects(case: tuple[str, dict[str, Any], Rendered]) -> None:
    """Optional objects appear exactly when their option is on."""
    name, values, rendered = case
    expected = {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    if not values.get("existingConfigMap"):
        expected.add("ConfigMap")
    if values.get("autoscaling", {}).get("enabled"):
        expected.add("HorizontalPodAutoscaler")
    if values.get("serviceMonitor", {}).get("enabled"):
        expected.add("ServiceMonitor")
    if values.get("networkPolicy", {}).get("enabled"):
        expected.add("NetworkPolicy")
    assert set(rendered.kinds()) == expected, name
    assert len(rendered.all("Service")) == 2  # the ClusterIP and the -headless one
    for manifest in rendered.manifests:
        assert manifest["metadata"].get("namespace") == NAMESPACE
        assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# ---------------------------------------------------------------------------------------------
# The pod
# ---------------------------------------------------------------------------------------------


def test_pod_runs_locked_down(case: tuple[str, dict[str, Any], Rendered]) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, seccomp."""
    _, _, rendered = case
    pod, container = rendered.pod, rendered.container
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    assert all("hostPath" not in v for v in pod["volumes"])
    # The only writable place is a small emptyDir at /tmp.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    writable = [path for path, m in mounts.items() if not m.get("readOnly")]
    assert writable == ["/tmp"]


def test_probes_are_native_grpc_health_checks(default: Rendered) -> None:
    """Startup, liveness and readiness probe grpc.health.v1.Health on the gRPC port."""
    container = default.container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 9001, "admin": 9090}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container[probe]
        assert set(spec) & {"httpGet", "exec", "tcpSocket"} == set(), probe
        assert spec["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == ""
    assert container["startupProbe"]["grpc"]["service"] == ""


def test_container_serves_the_mounted_policy(default: Rendered) -> None:
    """`extauthz serve` reads the ConfigMap from a directory mount (so updates arrive)."""
    container, pod = default.container, default.pod
    args = container["args"]
    assert args[:3] == ["serve", "--config", "/etc/extauthz/config.yaml"]
    assert args[args.index("--listen") + 1] == "0.0.0.0:9001"
    assert args[args.index("--admin-listen") + 1] == "0.0.0.0:9090"
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_mount == {"name": "config", "mountPath": "/etc/extauthz", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == default.one("ConfigMap")["metadata"]["name"]
    assert "items" not in volume["configMap"]


def test_termination_grace_covers_prestop_and_drain(default: Rendered) -> None:
    """The kubelet waits longer than preStop sleep + the server's drain before SIGKILL."""
    container, pod = default.container, default.pod
    grace = float(container["args"][container["args"].index("--grace-seconds") + 1])
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def test_topology_spread_selects_the_chart_pods(default: Rendered) -> None:
    """Spread constraints without a labelSelector get the Deployment's own selector."""
    selector = default.one("Deployment")["spec"]["selector"]["matchLabels"]
    constraints = default.pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert all(c["labelSelector"]["matchLabels"] == selector for c in constraints)


def test_hpa_owns_the_replica_count(chart: helm.Chart) -> None:
    """With autoscaling on, the Deployment leaves `replicas` to the HPA it targets."""
    rendered = render(chart, MATRIX["hpa"])
    deployment, hpa = rendered.one("Deployment"), rendered.one("HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert render(chart).one("Deployment")["spec"]["replicas"] == 2


# ---------------------------------------------------------------------------------------------
# Services, monitoring, network policy
# ---------------------------------------------------------------------------------------------


def test_service_ports_are_named_for_grpc(default: Rendered) -> None:
    """Port `grpc` (appProtocol grpc, for Istio) and port `admin`; the headless one is gRPC only."""
    selector = default.one("Deployment")["spec"]["selector"]["matchLabels"]
    service = default.one("Service", RELEASE)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 9001 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["grpc"]["targetPort"] == "grpc"
    assert ports["admin"]["port"] == 9090 and ports["admin"]["targetPort"] == "admin"
    assert service["spec"]["selector"] == selector
    headless = default.one("Service", f"{RELEASE}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"], p["appProtocol"]) for p in headless["spec"]["ports"]] == [
        ("grpc", 9001, "grpc")
    ]
    assert headless["spec"]["selector"] == selector


def test_servicemonitor_scrapes_the_admin_port_once(chart: helm.Chart) -> None:
    """The ServiceMonitor selects the chart's Services and scrapes /metrics on `admin`, which
    only the ClusterIP Service has (so each pod is scraped once)."""
    rendered = render(chart, MATRIX["servicemonitor"])
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = [
        s for s in rendered.all("Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    assert len(selected) == 2
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("admin", "/metrics")
    assert [
        s["metadata"]["name"]
        for s in selected
        if "admin" in {p["name"] for p in s["spec"]["ports"]}
    ] == [RELEASE]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_networkpolicy_admits_the_named_peers(chart: helm.Chart) -> None:
    """Ingress only to the grpc and admin ports from the given peers; egress DNS + the rules."""
    rendered = render(chart, MATRIX["networkpolicy"])
    policy = rendered.one("NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"]
        == rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(by_port) == {"grpc", "admin"}
    values = MATRIX["networkpolicy"]["networkPolicy"]
    assert by_port["grpc"]["from"] == values["grpcFrom"]
    assert by_port["admin"]["from"] == values["adminFrom"]
    assert {p["port"] for p in policy["egress"][0]["ports"]} == {53}
    assert policy["egress"][1:] == values["egress"]["rules"]
    # Without egress restriction only Ingress is governed.
    open_egress = render(chart, {"networkPolicy": {"enabled": True}}).one("NetworkPolicy")["spec"]
    assert open_egress["policyTypes"] == ["Ingress"] and "egress" not in open_egress


# ---------------------------------------------------------------------------------------------
# The policy ConfigMap
# ---------------------------------------------------------------------------------------------


def policy_of(rendered: Rendered) -> Any:
    return yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])


def as_served(policy: dict[str, Any]) -> dict[str, Any]:
    """A user's policy as the chart serves it: Helm merges maps with the defaults, so the sample's
    one `server` setting (denyStatusOnIdpFailure: 503) applies unless the policy sets it."""
    served = copy.deepcopy(policy)
    served["server"] = {**DEFAULT_CONFIG["server"], **(policy.get("server") or {})}
    return served


@pytest.mark.parametrize("name", ["default", "existing-secret", "everything"])
def test_configmap_holds_a_valid_policy(chart: helm.Chart, name: str) -> None:
    """The ConfigMap's config.yaml passes extauthz's own config validator."""
    rendered = render(chart, MATRIX[name])
    config = parse_config(policy_of(rendered), source="configmap")
    expected = as_served(MATRIX[name].get("config") or DEFAULT_CONFIG)
    assert [d.name for d in config.deployments] == [d["name"] for d in expected["deployments"]]
    assert policy_of(rendered) == expected


@pytest.mark.parametrize(
    "path",
    [*sorted((REPO / "examples").glob("*.yaml")), REPO / "tests" / "e2e" / "policy.yaml"],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_repository_policies_fit_the_values_schema(chart: helm.Chart, path: Path) -> None:
    """The config files shipped in the repository are accepted as `config` and survive the
    round trip through values and the ConfigMap (merged with the chart's `server` default)."""
    policy = yaml.safe_load(path.read_text())
    rendered = render(chart, {"config": policy})
    assert policy_of(rendered) == as_served(policy)
    parse_config(policy_of(rendered), source=str(path))


def test_null_drops_the_sample_server_block(chart: helm.Chart) -> None:
    """`config.server: null` serves the policy exactly as written, with extauthz's own defaults."""
    policy = {"deployments": DEFAULT_CONFIG["deployments"]}
    rendered = render(chart, {"config": {**policy, "server": None}})
    assert policy_of(rendered) == policy
    assert parse_config(policy_of(rendered)).server.deny_status_on_idp_failure == 500


def test_config_change_rolls_the_pods(chart: helm.Chart, default: Rendered) -> None:
    """checksum/config follows the ConfigMap; it is absent with an existing ConfigMap or when
    rollouts on config change are off (live reload alone)."""

    def checksum(rendered: Rendered) -> str | None:
        metadata = rendered.one("Deployment")["spec"]["template"]["metadata"]
        value: str | None = metadata.get("annotations", {}).get("checksum/config")
        return value

    changed = copy.deepcopy(chart.values["config"])
    changed["server"]["logLevel"] = "DEBUG"
    first, second = checksum(default), checksum(render(chart, {"config": changed}))
    assert first and second and first != second
    assert checksum(default) == checksum(render(chart))
    assert checksum(render(chart, MATRIX["existing-configmap"])) is None
    assert checksum(render(chart, {"rolloutOnConfigChange": False})) is None


def test_existing_configmap_is_mounted_not_rendered(chart: helm.Chart) -> None:
    """existingConfigMap: no ConfigMap from the chart; the named one is served from its key."""
    rendered = render(chart, MATRIX["existing-configmap"])
    assert rendered.all("ConfigMap") == []
    volume = next(v for v in rendered.pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "orders-policy"
    assert rendered.container["args"][:3] == ["serve", "--config", "/etc/extauthz/policy.yaml"]


def test_config_files_sit_next_to_the_policy(chart: helm.Chart) -> None:
    """configFiles become further keys of the ConfigMap, so caFile: /etc/extauthz/<name> works."""
    rendered = render(chart, MATRIX["everything"])
    data = rendered.one("ConfigMap")["data"]
    assert set(data) == {"config.yaml", "idp-ca.pem"}
    assert data["idp-ca.pem"] == MATRIX["everything"]["configFiles"]["idp-ca.pem"]


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------


def test_client_secrets_come_from_the_existing_secret(chart: helm.Chart) -> None:
    """The Secret is mounted read-only where clientSecretFile points, and env secrets are
    secretKeyRefs; the chart creates no Secret."""
    rendered = render(chart, EXISTING_SECRET)
    pod, container = rendered.pod, rendered.container
    volume = next(v for v in pod["volumes"] if v["name"] == "client-secrets")
    assert volume["secret"]["secretName"] == "idp-clients"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "client-secrets")
    assert mount["readOnly"] is True
    secret_file = INTROSPECTION_POLICY["deployments"][0]["authentication"]["validationPolicy"][
        "clientDetails"
    ]["clientSecretFile"]
    assert Path(secret_file).parent == Path(mount["mountPath"])
    env = {e["name"]: e for e in container["env"]}
    assert env["BILLING_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "idp-clients",
        "key": "billing",
    }
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
        "name": "otel-auth",
        "key": "headers",
    }
    assert rendered.all("Secret") == []


def walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk_strings(value, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def test_no_secret_data_in_any_manifest(case: tuple[str, dict[str, Any], Rendered]) -> None:
    """No Secret objects, no secret-looking env var with a literal value, no inline secret in
    the policy: every secret is a reference to an existing Secret."""
    _, _, rendered = case
    assert "Secret" not in rendered.kinds()
    for env in rendered.container["env"]:
        if re.search(r"SECRET|PASSWORD|TOKEN|HEADERS|KEY", env["name"]):
            assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    if rendered.all("ConfigMap"):
        for path, text in walk_strings(policy_of(rendered)):
            assert not re.search(r"clientSecret$", path), path
            assert "PRIVATE KEY" not in text, path


# ---------------------------------------------------------------------------------------------
# values.schema.json
# ---------------------------------------------------------------------------------------------


def with_value(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Values with ``value`` set at a dotted ``path`` (numeric parts index lists)."""
    values = copy.deepcopy(base or {})
    node: Any = values
    parts = path.split(".")
    for part, following in itertools.pairwise(parts):
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict):
            node = node.setdefault(key, [] if following.isdigit() else {})
        else:
            node = node[key]
    node[parts[-1]] = value
    return values


DEFAULT_CONFIG: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["config"]

TYPOS = {
    "top-level key": ({"replicaCont": 3}, "replicaCont"),
    "nested chart key": ({"autoscaling": {"enable": True}}, "enable"),
    "security context": (
        {"securityContext": {"readOnlyRootFileSystem": True}},
        "readOnlyRootFileSystem",
    ),
    "probe setting": ({"probes": {"readiness": {"periodSecond": 5}}}, "periodSecond"),
    "policy key": (
        with_value(
            "config.deployments.0.pathPrefx", "/x", {"config": copy.deepcopy(DEFAULT_CONFIG)}
        ),
        "pathPrefx",
    ),
    "deep policy key": (
        with_value(
            "config.deployments.0.authentication.validationPolicy.additionalValidationPolicy.audience",
            ["a"],
            {"config": copy.deepcopy(DEFAULT_CONFIG)},
        ),
        "audience",
    ),
    "enum value": (
        {"config": {**DEFAULT_CONFIG, "server": {"denyStatusOnIdpFailure": 502}}},
        "denyStatusOnIdpFailure",
    ),
    "secret data in values": ({"clientSecrets": {"data": {"orders": "s3cr3t"}}}, "data"),
}


@pytest.mark.parametrize("values,key", TYPOS.values(), ids=TYPOS.keys())
def test_schema_rejects_typos(chart: helm.Chart, values: dict[str, Any], key: str) -> None:
    """An unknown or misspelt value fails the render (as `helm install` would), naming it."""
    with pytest.raises(helm.HelmValuesError, match=re.escape(key)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_refuses_an_inline_client_secret(chart: helm.Chart) -> None:
    """A clientSecret written into the policy is refused at install, before extauthz sees it."""
    policy = copy.deepcopy(INTROSPECTION_POLICY)
    details = policy["deployments"][0]["authentication"]["validationPolicy"]["clientDetails"]
    details["clientSecret"] = "s3cr3t"
    with pytest.raises(helm.HelmValuesError, match="clientSecret"):
        chart.render({"config": policy}, name=RELEASE, namespace=NAMESPACE)


def schema_objects(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from schema_objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schema_objects(value, f"{path}/{i}")


def test_every_schema_object_is_closed() -> None:
    """Every object the chart defines lists its keys and refuses others. The exception is a JWK,
    whose members are open by RFC 7517 (private members are refused by `not`)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects = {"#/definitions/policyJwk"}
    for path, node in schema_objects(schema):
        if path in open_objects:
            assert "not" in node
            continue
        assert node.get("additionalProperties") is False, path


def test_schema_knows_every_policy_key() -> None:
    """The schema's policy keys are extauthz's config keys: none missing (a valid policy would be
    refused at install), none extra (a typo would pass). clientSecret is refused on purpose."""
    from extauthz.config import _RawConfig  # the config model, as pydantic sees it

    def property_names(node: Any) -> set[str]:
        names: set[str] = set()
        if isinstance(node, dict):
            names |= set(node.get("properties", {}))
            for value in node.values():
                names |= property_names(value)
        elif isinstance(node, list):
            for value in node:
                names |= property_names(value)
        return names

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    ours = property_names(
        {k: v for k, v in schema["definitions"].items() if k.startswith("policy")}
    )
    theirs = property_names(_RawConfig.model_json_schema(by_alias=True)) - {"clientSecret"}
    assert ours == theirs


def test_render_refuses_inconsistent_settings(chart: helm.Chart) -> None:
    """Settings the schema cannot relate fail the render with the reason."""
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render({"terminationGracePeriodSeconds": 12}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match="existingConfigMap"):
        chart.render({"config": None}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"resources\.requests\.cpu"):
        chart.render(
            {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
            name=RELEASE, namespace=NAMESPACE,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helm lint, NOTES.txt and the Istio / Envoy examples that point at the chart
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "everything"])
def test_helm_lint_is_clean(name: str) -> None:
    """`helm lint` (strict: warnings count) finds nothing above info level."""
    report = helm.lint(CHART_DIR, MATRIX[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [] and report["errors"] == [], report


def test_helm_lint_reports_a_typo() -> None:
    """The lint used above does see schema violations (so its silence means something)."""
    report = helm.lint(CHART_DIR, {"replicaCont": 3}, namespace=NAMESPACE)
    assert any("replicaCont" in error for error in report["errors"]), report


def test_notes_print_the_envoy_and_istio_snippets(default: Rendered) -> None:
    """NOTES.txt names this release's Service in ready-to-paste Envoy and Istio config."""
    notes = default.notes
    host = f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    assert "envoy.filters.http.ext_authz" in notes and "failure_mode_allow: false" in notes
    assert f"address: {RELEASE}-headless.{NAMESPACE}.svc.cluster.local, port_value: 9001" in notes
    assert "envoyExtAuthzGrpc:" in notes and f"service: {host}" in notes and "port: 9001" in notes
    assert (
        'statusOnError: "503"' in notes and "status_on_error: { code: ServiceUnavailable }" in notes
    )
    assert "action: CUSTOM" in notes
    # The connection-manager hardening of every shipped Envoy config (envoy/envoy.yaml says why).
    for setting in (
        "normalize_path: true",
        "merge_slashes: true",
        "path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT",
        "headers_with_underscores_action: REJECT_REQUEST",
    ):
        assert setting in notes


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_istio_examples_point_at_the_chart(default: Rendered) -> None:
    """mesh-config.yaml names the chart's Service and gRPC port, the AuthorizationPolicies use a
    declared provider with action CUSTOM, and the external provider is the ServiceEntry's host."""
    istio = REPO / "envoy" / "istio"
    [mesh] = load_all(istio / "mesh-config.yaml")
    providers = {
        p["name"]: p["envoyExtAuthzGrpc"] for p in mesh["meshConfig"]["extensionProviders"]
    }
    service = default.one("Service", RELEASE)
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert providers["extauthz"]["service"] == f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    for provider in providers.values():
        assert provider["port"] == grpc_port
        assert provider["failOpen"] is False and provider["statusOnError"] == "503"
        assert provider["timeout"] == "3s"

    for policy in load_all(istio / "authorization-policy.yaml"):
        assert (policy["apiVersion"], policy["kind"]) == (
            "security.istio.io/v1",
            "AuthorizationPolicy",
        )
        assert policy["spec"]["action"] == "CUSTOM"
        assert policy["spec"]["provider"]["name"] in providers

    [entry] = load_all(istio / "service-entry.yaml")
    assert (entry["apiVersion"], entry["kind"]) == ("networking.istio.io/v1", "ServiceEntry")
    namespace, _, host = providers["extauthz-external"]["service"].rpartition("/")
    assert host in entry["spec"]["hosts"] and namespace == entry["metadata"]["namespace"]
    assert {(p["number"], p["protocol"]) for p in entry["spec"]["ports"]} == {(grpc_port, "GRPC")}


def test_front_proxy_points_at_the_headless_service(default: Rendered) -> None:
    """envoy/front-proxy.yaml's extauthz cluster resolves the chart's headless Service."""
    proxy = yaml.safe_load((REPO / "envoy" / "front-proxy.yaml").read_text())
    cluster = next(c for c in proxy["static_resources"]["clusters"] if c["name"] == "extauthz")
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = default.one("Service", f"{RELEASE}-headless")
    assert address["address"] == f"{headless['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert address["port_value"] == headless["spec"]["ports"][0]["port"]
    assert cluster["type"] == "STRICT_DNS"


def test_image_reference(chart: helm.Chart, default: Rendered) -> None:
    """The image defaults to the chart's appVersion; a digest pins it instead of the tag."""
    assert default.container["image"] == f"extauthz:{chart.metadata['appVersion']}"
    digest = "sha256:" + hashlib.sha256(b"extauthz").hexdigest()
    pinned = render(
        chart, {"image": {"repository": "registry.example.com/extauthz", "digest": digest}}
    )
    assert pinned.container["image"] == f"registry.example.com/extauthz@{digest}"
