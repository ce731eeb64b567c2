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
import http.server
import itertools
import json
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from extauthz.config import parse_config
from tests.conftest import SigningKey, claims
from tests.e2e.test_envoy_examples import walk
from tests.integration.faulty_idp import FaultyIdp
from tests.integration.serverproc import ExtauthzProcess, closed_port, extauthz_env, free_port
from tests.integration.test_tls import Authority
from tests.policies import orders
from tests.redis_server import (  # noqa: F401 (the tls_redis_server fixture)
    RedisServer,
    tls_redis_server_fixture,
)
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "extauthz"
RELEASE, NAMESPACE = "extauthz", "extauthz"  # as the Envoy and Istio examples assume
# The chart's sample policy (values.yaml `config`).
DEFAULT_CONFIG: dict[str, Any] = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["config"]

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

    @property
    def test_pod(self) -> Manifest:
        """The `helm test` hook's Pod."""
        [pod] = [
            m for m in self.all("Pod")
            if m["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
        ]  # fmt: skip
        return pod

    def policy(self) -> Any:
        """The extauthz config the chart's ConfigMap serves."""
        return yaml.safe_load(self.one("ConfigMap")["data"]["config.yaml"])


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

# TLS from a Secret you manage, with client certificates required (mTLS).
TLS_SECRET: dict[str, Any] = {
    "tls": {"enabled": True, "existingSecret": "extauthz-serving", "requireClientCert": True}
}
# TLS from cert-manager, the callers' CA in another Secret.
TLS_CERT_MANAGER: dict[str, Any] = {
    "tls": {
        "enabled": True,
        "certManager": {
            "enabled": True,
            "issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"},
            "extraDnsNames": ["extauthz.internal.example.com"],
        },
        "requireClientCert": True,
        "clientCaSecret": "gateway-client-ca",
    },
    "helmTest": {"clientCertSecret": "extauthz-test-client"},
}
GATEWAY_PRINCIPALS = [
    "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
    "cluster.local/ns/shop/sa/orders",
]
ISTIO: dict[str, Any] = {"istio": {"enabled": True, "principals": GATEWAY_PRINCIPALS}}
# Envoy's HTTP ext_authz protocol beside gRPC, on its default port.
HTTP_WIRE: dict[str, Any] = {"httpWire": {"enabled": True}}
# A fleet sharing its introspection answers through a Valkey over TLS, its CA in a Secret; the
# egress restricted, with the rule to Valkey's pods.
VALKEY_PODS: dict[str, Any] = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cache"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "valkey"}},
}
SHARED_CACHE: dict[str, Any] = {
    "sharedCache": {
        "enabled": True,
        "uri": "rediss://extauthz@valkey.cache.svc.cluster.local:6380/0",
        "signingKeySecret": {"name": "extauthz-fleet", "key": "signing-key"},
        "passwordSecret": {"name": "valkey-users", "key": "extauthz"},
        "ca": {"secretName": "valkey-tls", "key": "ca.crt"},
        "timeoutMilliseconds": 80,
    },
    "networkPolicy": {"egress": {"enabled": True, "sharedCache": {"to": [VALKEY_PODS]}}},
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
    "no-networkpolicy": {"networkPolicy": {"enabled": False}, "helmTest": {"enabled": False}},
    "tls-secret": TLS_SECRET,
    "tls-cert-manager": TLS_CERT_MANAGER,
    "istio": ISTIO,
    "workers": {"workers": 4, "podDisruptionBudget": {"maxUnavailable": 0}},
    "http-wire": HTTP_WIRE,
    "shared-cache": SHARED_CACHE,
    "everything": {
        **EXISTING_SECRET,
        **TLS_CERT_MANAGER,
        **ISTIO,
        **HTTP_WIRE,
        **SHARED_CACHE,
        "workers": 2,
        "autoscaling": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "egress": {"enabled": True, "sharedCache": {"to": [VALKEY_PODS]}},
        },
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


# cert-manager's Certificate (cert-manager.io/v1) and Istio's security resources
# (security.istio.io/v1) are CRDs too: the fields the chart uses, as their API references define
# them, closed to typos.
def _custom_resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "namespace"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": _STRING_MAP,
                },
            },
            "spec": {"type": "object", "additionalProperties": False, **spec},
        },
    }


_STRINGS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["matchLabels"],
    "properties": {"matchLabels": _STRING_MAP},
}
_MTLS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["mode"],
    "properties": {"mode": {"enum": ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]}},
}
_CERT_MANAGER_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"}
_KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
CUSTOM_RESOURCE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": SERVICE_MONITOR_SCHEMA,
    "Certificate": _custom_resource(
        "cert-manager.io/v1",
        "Certificate",
        {
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "group": {"type": "string"},
                    },
                },
                "dnsNames": _STRINGS,
                "duration": _CERT_MANAGER_DURATION,
                "renewBefore": _CERT_MANAGER_DURATION,
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    },
                },
                "usages": {"type": "array", "items": {"enum": _KEY_USAGES}},
            },
        },
    ),
    "PeerAuthentication": _custom_resource(
        "security.istio.io/v1",
        "PeerAuthentication",
        {
            "properties": {
                "selector": _SELECTOR,
                "mtls": _MTLS,
                # map<uint32, PortMutualTLS>: the keys are port numbers.
                "portLevelMtls": {
                    "type": "object",
                    "additionalProperties": False,
                    "patternProperties": {"^[1-9][0-9]{0,4}$": _MTLS},
                },
            },
        },
    ),
    "AuthorizationPolicy": _custom_resource(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        {
            "required": ["action"],
            "properties": {
                "selector": _SELECTOR,
                "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "from": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["source"],
                                    "properties": {
                                        "source": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "principals": _STRINGS,
                                                "namespaces": _STRINGS,
                                            },
                                        }
                                    },
                                },
                            },
                            "to": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["operation"],
                                    "properties": {
                                        "operation": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                # Port numbers as strings, as the API has them.
                                                "ports": {
                                                    "type": "array",
                                                    "items": {
                                                        "type": "string",
                                                        "pattern": "^[1-9][0-9]{0,4}$",
                                                    },
                                                    "minItems": 1,
                                                },
                                                "paths": _STRINGS,
                                                "notPaths": _STRINGS,
                                            },
                                        }
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
}


def validate_manifest(manifest: Manifest, version: str) -> None:
    if manifest["kind"] in CUSTOM_RESOURCE_SCHEMAS:
        jsonschema.validate(manifest, CUSTOM_RESOURCE_SCHEMAS[manifest["kind"]])
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
    if values.get("networkPolicy", {}).get("enabled", True):  # on by default
        expected.add("NetworkPolicy")
    if values.get("helmTest", {}).get("enabled", True):  # on by default
        expected.add("Pod")
    if values.get("tls", {}).get("certManager", {}).get("enabled"):
        expected.add("Certificate")
    if values.get("istio", {}).get("enabled"):
        expected |= {"PeerAuthentication", "AuthorizationPolicy"}
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
    # The helm test Pod too, with nothing writable at all.
    if rendered.all("Pod"):
        test_pod = rendered.test_pod["spec"]
        assert test_pod["securityContext"] == pod_sc
        [check] = test_pod["containers"]
        assert check["securityContext"] == sc
        assert all(m["readOnly"] for m in check.get("volumeMounts", []))
        assert all("hostPath" not in v for v in test_pod.get("volumes", []))


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


def shutdown_of(rendered: Rendered, drain_seconds: float) -> tuple[float, float, int]:
    """The preStop sleep, --grace-seconds and terminationGracePeriodSeconds the pod runs with,
    checked against the config's ``drain_seconds`` (from the ConfigMap when the chart renders it)."""
    container, pod = rendered.container, rendered.pod
    if rendered.all("ConfigMap"):
        served = (rendered.policy().get("server") or {}).get("drainSeconds", 5)
        assert served == drain_seconds
    grace = float(container["args"][container["args"].index("--grace-seconds") + 1])
    pre_stop = float(
        container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    return pre_stop, grace, pod["terminationGracePeriodSeconds"]


GRACE_CASES = {
    # values, the config's drainSeconds, the expected terminationGracePeriodSeconds
    "defaults: 0 + 5 + 10 + margin 5": ({}, 5, 20),
    "drainSeconds from the config": (
        {"config": {**DEFAULT_CONFIG, "server": {"drainSeconds": 30}}}, 30, 45
    ),
    "a preStop sleep and a fractional drain, rounded up": (
        {"server": {"preStopSleepSeconds": 3}, "config": {**DEFAULT_CONFIG, "server": {"drainSeconds": 2.5}}},
        2.5,
        3 + 3 + 10 + 5,  # ceil(3 + 2.5 + 10) + 5
    ),
    "another margin and grace": (
        {"server": {"graceSeconds": 20, "terminationMarginSeconds": 2}}, 5, 27
    ),
    "an existing ConfigMap's drainSeconds": (
        {**MATRIX["existing-configmap"], "existingConfigMapDrainSeconds": 20}, 20, 35
    ),
    "a value given that exceeds the shutdown": ({"terminationGracePeriodSeconds": 16}, 5, 16),
}  # fmt: skip


@pytest.mark.parametrize("values,drain,expected", GRACE_CASES.values(), ids=GRACE_CASES.keys())
def test_termination_grace_covers_prestop_drain_and_grace(
    chart: helm.Chart, values: dict[str, Any], drain: float, expected: int
) -> None:
    """terminationGracePeriodSeconds > preStop sleep + the config's drainSeconds + graceSeconds:
    after SIGTERM extauthz answers for drainSeconds while NOT_SERVING, then lets checks in flight
    finish within graceSeconds; the kubelet's SIGKILL comes after all of it (and the margin)."""
    pre_stop, grace, termination = shutdown_of(render(chart, values), drain)
    assert termination == expected
    assert termination > pre_stop + drain + grace


def test_no_prestop_sleep_by_default(default: Rendered) -> None:
    """extauthz drains by itself (NOT_SERVING while still answering), so the chart adds no preStop
    sleep unless asked: during one, extauthz would still report SERVING."""
    assert "lifecycle" not in default.container


def test_termination_grace_too_short_is_refused(chart: helm.Chart) -> None:
    """A terminationGracePeriodSeconds that does not exceed preStop + drain + grace fails the
    render, naming the sum."""
    with pytest.raises(helm.HelmRenderError, match=r"0 \+ 5 \+ 10 = 15"):
        chart.render({"terminationGracePeriodSeconds": 15}, name=RELEASE, namespace=NAMESPACE)
    drained = {"config": {**DEFAULT_CONFIG, "server": {"drainSeconds": 60}}}
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(
            {**drained, "terminationGracePeriodSeconds": 60}, name=RELEASE, namespace=NAMESPACE
        )


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


HELM_TEST_PEER = {
    "podSelector": {
        "matchLabels": {
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": "helm-test",
        }
    }
}


def ingress_by_port(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each ingress rule by the ports it opens (the check ports share one rule); every rule names
    its peers (a rule without `from` would admit any source), and no port is in two rules."""
    rules: dict[str, dict[str, Any]] = {}
    for rule in policy["ingress"]:
        assert rule["ports"] and rule["from"], rule
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            assert port["port"] not in rules, port
            rules[port["port"]] = rule
    return rules


def test_networkpolicy_is_on_by_default_and_restricts_the_ports(default: Rendered) -> None:
    """Without values, ingress to the pods is the gRPC port from the release namespace's pods
    labelled as the gateway (and the helm test Pod), the admin port from Prometheus in
    `monitoring`; nothing else. Egress stays open (the IdPs)."""
    policy = default.one("NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"]
        == default.one("Deployment")["spec"]["selector"]["matchLabels"]
    )
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy
    by_port = ingress_by_port(policy)
    assert set(by_port) == {"grpc", "admin"}
    gateway = {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}
    assert by_port["grpc"]["from"] == [gateway, HELM_TEST_PEER]
    # A podSelector alone selects pods in the policy's own namespace: the release namespace.
    assert "namespaceSelector" not in by_port["grpc"]["from"][0]
    assert by_port["admin"]["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    # The helm test Pod carries the labels the policy admits, and is no extauthz pod.
    test_labels = default.test_pod["metadata"]["labels"]
    assert HELM_TEST_PEER["podSelector"]["matchLabels"].items() <= test_labels.items()
    assert not policy["podSelector"]["matchLabels"].items() <= test_labels.items()


def test_networkpolicy_admits_the_named_peers(chart: helm.Chart) -> None:
    """Ingress only to the grpc and admin ports from the given peers; egress DNS + the rules."""
    rendered = render(chart, MATRIX["networkpolicy"])
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    by_port = ingress_by_port(policy)
    assert set(by_port) == {"grpc", "admin"}
    values = MATRIX["networkpolicy"]["networkPolicy"]
    assert by_port["grpc"]["from"] == [*values["grpcFrom"], HELM_TEST_PEER]
    assert by_port["admin"]["from"] == values["adminFrom"]
    assert {p["port"] for p in policy["egress"][0]["ports"]} == {53}
    assert policy["egress"][1:] == values["egress"]["rules"]


def test_networkpolicy_without_scrapers_closes_the_admin_port(chart: helm.Chart) -> None:
    """adminFrom empty: no rule for the admin port, so no pod reaches it (the kubelet's probes
    come from the node, which NetworkPolicies let through)."""
    rendered = render(chart, {"networkPolicy": {"adminFrom": []}, "helmTest": {"enabled": False}})
    by_port = ingress_by_port(rendered.one("NetworkPolicy")["spec"])
    assert set(by_port) == {"grpc"}
    assert HELM_TEST_PEER not in by_port["grpc"]["from"]


def test_networkpolicy_refuses_no_callers(chart: helm.Chart) -> None:
    """An empty grpcFrom would let nothing call extauthz: the render says so."""
    with pytest.raises(helm.HelmRenderError, match=r"networkPolicy\.grpcFrom is empty"):
        chart.render({"networkPolicy": {"grpcFrom": []}}, name=RELEASE, namespace=NAMESPACE)
    off = render(chart, {"networkPolicy": {"enabled": False, "grpcFrom": []}})
    assert off.all("NetworkPolicy") == []


# ---------------------------------------------------------------------------------------------
# The policy ConfigMap
# ---------------------------------------------------------------------------------------------


def policy_of(rendered: Rendered) -> Any:
    return rendered.policy()


def as_served(policy: dict[str, Any]) -> dict[str, Any]:
    """A user's policy as the chart serves it: Helm merges maps with the defaults, so the sample's
    one `server` setting (denyStatusOnIdpFailure: 503) applies unless the policy sets it."""
    served = copy.deepcopy(policy)
    served["server"] = {**DEFAULT_CONFIG["server"], **(policy.get("server") or {})}
    return served


@pytest.mark.parametrize(
    "name", ["default", "existing-secret", "tls-secret", "shared-cache", "everything"]
)
def test_configmap_holds_a_valid_policy(chart: helm.Chart, name: str) -> None:
    """The ConfigMap's config.yaml passes extauthz's own config validator."""
    rendered = render(chart, MATRIX[name])
    config = parse_config(policy_of(rendered), source="configmap")
    expected = as_served(MATRIX[name].get("config") or DEFAULT_CONFIG)
    if MATRIX[name].get("tls", {}).get("enabled"):
        expected["server"]["tls"] = {
            "certFile": "/etc/extauthz/tls/tls.crt",
            "keyFile": "/etc/extauthz/tls/tls.key",
            "clientCaFile": "/etc/extauthz/tls/ca.crt",
        }
        assert config.server.tls is not None
    if MATRIX[name].get("sharedCache", {}).get("enabled"):
        expected["server"]["sharedCache"] = SHARED_CACHE_SETTINGS
        assert config.server.shared_cache is not None
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
# TLS on the gRPC port
# ---------------------------------------------------------------------------------------------

TLS_DIR = "/etc/extauthz/tls"


def projected_files(rendered: Rendered, volume_name: str) -> dict[str, tuple[str, str]]:
    """Each file a projected volume lists, by its path in the container: (source kind, source
    name:key)."""
    [mount] = [m for m in rendered.container["volumeMounts"] if m["name"] == volume_name]
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == volume_name]
    files: dict[str, tuple[str, str]] = {}
    for source in volume["projected"]["sources"]:
        [(kind, spec)] = source.items()
        for item in spec.get("items", []):
            path = f"{mount['mountPath']}/{item['path']}"
            files[path] = (kind, f"{spec['name']}:{item['key']}")
    return files


def mounted_files(rendered: Rendered) -> dict[str, tuple[str, str]]:
    """Each file of the config volume, by its path in the container: (source kind, source
    name:key). The volume is mounted whole at /etc/extauthz."""
    [mount] = [m for m in rendered.container["volumeMounts"] if m["name"] == "config"]
    assert mount == {"name": "config", "mountPath": "/etc/extauthz", "readOnly": True}
    return projected_files(rendered, "config")


def assert_no_subpath(manifest: Manifest) -> None:
    """No mount anywhere uses subPath: a subPath mount never sees a renewed file."""
    for node in walk(manifest):
        assert "subPath" not in node and "subPathExpr" not in node, node


def test_tls_from_an_existing_secret(chart: helm.Chart) -> None:
    """tls.existingSecret: its tls.crt, tls.key and ca.crt are projected under /etc/extauthz/tls
    in the one directory volume with the config (read-only, never subPath, so a rotated Secret
    reaches the files), and the served config's server.tls names exactly those files."""
    rendered = render(chart, TLS_SECRET)
    files = mounted_files(rendered)
    assert files == {
        f"{TLS_DIR}/tls.crt": ("secret", "extauthz-serving:tls.crt"),
        f"{TLS_DIR}/tls.key": ("secret", "extauthz-serving:tls.key"),
        f"{TLS_DIR}/ca.crt": ("secret", "extauthz-serving:ca.crt"),
    }
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == "config"]
    config_source = volume["projected"]["sources"][0]["configMap"]
    assert config_source == {"name": rendered.one("ConfigMap")["metadata"]["name"]}  # every key
    tls = rendered.policy()["server"]["tls"]
    assert tls == {
        "certFile": f"{TLS_DIR}/tls.crt",
        "keyFile": f"{TLS_DIR}/tls.key",
        "clientCaFile": f"{TLS_DIR}/ca.crt",
    }
    assert set(tls.values()) == set(files)
    key_item = next(
        item
        for source in volume["projected"]["sources"]
        for item in source.get("secret", {}).get("items", [])
        if item["key"] == "tls.key"
    )
    assert key_item["mode"] == 0o440  # the key: owner and the pod's fsGroup only
    assert_no_subpath(rendered.one("Deployment"))
    assert rendered.all("Certificate") == [] and rendered.all("Secret") == []


def test_tls_without_client_certificates_serves_no_client_ca(chart: helm.Chart) -> None:
    """Without requireClientCert neither ca.crt nor clientCaFile: any caller may connect."""
    rendered = render(chart, {"tls": {"enabled": True, "existingSecret": "extauthz-serving"}})
    assert set(mounted_files(rendered)) == {f"{TLS_DIR}/tls.crt", f"{TLS_DIR}/tls.key"}
    assert rendered.policy()["server"]["tls"] == {
        "certFile": f"{TLS_DIR}/tls.crt",
        "keyFile": f"{TLS_DIR}/tls.key",
    }


def test_tls_from_cert_manager(chart: helm.Chart) -> None:
    """tls.certManager: a Certificate for every name of the Services (ClusterIP and headless,
    short to fully qualified) from the configured issuer, into the Secret the pods mount; the
    callers' CA from clientCaSecret."""
    rendered = render(chart, TLS_CERT_MANAGER)
    certificate = rendered.one("Certificate")["spec"]
    assert certificate["issuerRef"] == {
        "name": "internal-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    services = [s["metadata"]["name"] for s in rendered.all("Service")]
    assert sorted(services) == [RELEASE, f"{RELEASE}-headless"]
    names = set(certificate["dnsNames"])
    for service in services:
        assert {
            service,
            f"{service}.{NAMESPACE}",
            f"{service}.{NAMESPACE}.svc",
            f"{service}.{NAMESPACE}.svc.cluster.local",
        } <= names
    assert "extauthz.internal.example.com" in names
    assert certificate["privateKey"]["rotationPolicy"] == "Always"
    assert {"server auth", "client auth"} <= set(certificate["usages"])
    secret = certificate["secretName"]
    assert mounted_files(rendered) == {
        f"{TLS_DIR}/tls.crt": ("secret", f"{secret}:tls.crt"),
        f"{TLS_DIR}/tls.key": ("secret", f"{secret}:tls.key"),
        f"{TLS_DIR}/ca.crt": ("secret", "gateway-client-ca:ca.crt"),
    }
    assert rendered.policy()["server"]["tls"]["clientCaFile"] == f"{TLS_DIR}/ca.crt"
    assert_no_subpath(rendered.one("Deployment"))
    # The NOTES name the TLS Secret and the server name for the caller's transport_socket.
    assert secret in rendered.notes and "transport_socket" in rendered.notes


def test_tls_with_an_existing_configmap(chart: helm.Chart) -> None:
    """With existingConfigMap the chart cannot write server.tls, but mounts the files where the
    values document them, beside that ConfigMap's keys."""
    rendered = render(chart, {**MATRIX["existing-configmap"], **TLS_SECRET})
    assert rendered.all("ConfigMap") == []
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == "config"]
    assert volume["projected"]["sources"][0] == {"configMap": {"name": "orders-policy"}}
    assert set(mounted_files(rendered)) == {
        f"{TLS_DIR}/tls.crt",
        f"{TLS_DIR}/tls.key",
        f"{TLS_DIR}/ca.crt",
    }
    assert rendered.container["args"][:3] == ["serve", "--config", "/etc/extauthz/policy.yaml"]


def test_tls_probes_ask_the_admin_port(chart: helm.Chart) -> None:
    """The kubelet's gRPC probes cannot speak TLS: with TLS on, the probes are HTTP on the
    admin port (/readyz for startup and readiness, /healthz for liveness)."""
    container = render(chart, TLS_SECRET).container
    assert_http_probes(container)


def assert_http_probes(container: dict[str, Any]) -> None:
    paths = {
        probe: (container[probe]["httpGet"]["path"], container[probe]["httpGet"]["port"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": ("/readyz", "admin"),
        "livenessProbe": ("/healthz", "admin"),
        "readinessProbe": ("/readyz", "admin"),
    }
    assert all("grpc" not in container[probe] for probe in paths)


TLS_MISTAKES = {
    "no source": ({"tls": {"enabled": True}}, "exactly one of"),
    "two sources": (
        {"tls": {**TLS_CERT_MANAGER["tls"], "existingSecret": "extauthz-serving"}},
        "exactly one of",
    ),
    "no issuer": (
        {"tls": {"enabled": True, "certManager": {"enabled": True}}},
        "issuerRef.name",
    ),
    "server.tls in config": (
        {**TLS_SECRET, "config": {**DEFAULT_CONFIG, "server": {"tls": {"certFile": "/a", "keyFile": "/b"}}}},
        "config.server.tls",
    ),
    "TLS settings while off": ({"tls": {"existingSecret": "extauthz-serving"}}, "tls.enabled"),
}  # fmt: skip


@pytest.mark.parametrize("values,message", TLS_MISTAKES.values(), ids=TLS_MISTAKES.keys())
def test_tls_settings_that_cannot_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------------------
# Istio
# ---------------------------------------------------------------------------------------------


def test_istio_strict_mtls_and_an_allow_policy_for_the_gateways(chart: helm.Chart) -> None:
    """istio.enabled: STRICT PeerAuthentication on extauthz's pods (the admin port PERMISSIVE for
    a Prometheus outside the mesh), and an ALLOW AuthorizationPolicy: the gRPC port for the
    gateways' principals (and the helm test Pod's ServiceAccount), the admin port to be reached
    as the NetworkPolicy allows."""
    rendered = render(chart, ISTIO)
    selector = rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    peer = rendered.one("PeerAuthentication")["spec"]
    assert peer["selector"]["matchLabels"] == selector
    assert peer["mtls"] == {"mode": "STRICT"}
    assert peer["portLevelMtls"] == {"9090": {"mode": "PERMISSIVE"}}

    policy = rendered.one("AuthorizationPolicy")["spec"]
    assert policy["selector"]["matchLabels"] == selector
    assert policy["action"] == "ALLOW"
    grpc_rule, admin_rule = policy["rules"]
    service_account = rendered.test_pod["spec"]["serviceAccountName"]
    [source] = grpc_rule["from"]
    assert source["source"]["principals"] == [
        *GATEWAY_PRINCIPALS,
        f"cluster.local/ns/{NAMESPACE}/sa/{service_account}",
    ]
    assert grpc_rule["to"] == [{"operation": {"ports": ["9001"]}}]
    assert admin_rule == {"to": [{"operation": {"ports": ["9090"]}}]}
    # Every port the pod serves is covered by exactly one rule; nothing else is allowed.
    container_ports = {str(p["containerPort"]) for p in rendered.container["ports"]}
    assert container_ports == {"9001", "9090"}
    # The helm test Pod gets a sidecar (STRICT refuses plain text) that lets it complete.
    test_pod = rendered.test_pod
    assert test_pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["EXTAUTHZ_TEST_ISTIO_QUIT"] == "true"


def test_istio_admin_port_strict(chart: helm.Chart) -> None:
    rendered = render(chart, {"istio": {"enabled": True, "adminPortMtls": "STRICT"}})
    assert "portLevelMtls" not in rendered.one("PeerAuthentication")["spec"]


def test_istio_needs_principals(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"istio\.principals is empty"):
        chart.render(
            {"istio": {"enabled": True, "principals": []}}, name=RELEASE, namespace=NAMESPACE
        )
    with pytest.raises(helm.HelmValuesError, match="principals"):
        chart.render(
            {"istio": {"enabled": True, "principals": ["istio-ingressgateway"]}},
            name=RELEASE, namespace=NAMESPACE,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The HTTP wire (httpWire)
# ---------------------------------------------------------------------------------------------


def http_wire(port: Any) -> dict[str, Any]:
    """The HTTP wire on, on ``port``."""
    return {"httpWire": {"enabled": True, "port": port}}


def http_wire_ports(rendered: Rendered) -> list[tuple[str, Any]]:
    """Every place the rendered chart names the HTTP wire's port: (where, the entry)."""
    found: list[tuple[str, Any]] = []
    args = rendered.container["args"]
    if "--http-listen" in args:
        found.append(("args", args[args.index("--http-listen") + 1]))
    found += [("container", p) for p in rendered.container["ports"] if p["name"] == "http-authz"]
    for service in rendered.all("Service"):
        name = service["metadata"]["name"]
        found += [(name, p) for p in service["spec"]["ports"] if p["name"] == "http-authz"]
    for policy in rendered.all("NetworkPolicy"):
        found += [
            ("NetworkPolicy", port)
            for rule in policy["spec"]["ingress"]
            for port in rule["ports"]
            if port["port"] == "http-authz"
        ]
    return found


def test_http_wire_is_off_by_default(chart: helm.Chart, default: Rendered) -> None:
    """Without httpWire.enabled nothing of the HTTP wire is rendered: no --http-listen, no port
    on the container, the Services or the NetworkPolicy, no Istio rule, no hook target."""
    assert chart.values["httpWire"] == {"enabled": False, "port": 9002}
    assert http_wire_ports(default) == []
    assert "--http-listen" not in default.container["args"]
    assert all("9002" not in json.dumps(m) for m in default.manifests if m["kind"] != "Pod")
    env = {e["name"] for e in default.test_pod["spec"]["containers"][0]["env"]}
    assert "EXTAUTHZ_TEST_HTTP_TARGET" not in env
    istio = render(chart, ISTIO).one("AuthorizationPolicy")["spec"]["rules"][0]
    assert istio["to"] == [{"operation": {"ports": ["9001"]}}]


@pytest.mark.parametrize("port", [9002, 8443])
def test_http_wire_serves_its_port(chart: helm.Chart, port: int) -> None:
    """httpWire.enabled: `serve --http-listen 0.0.0.0:<port>` beside --listen, a container port
    `http-authz`, and that port (appProtocol http) on the ClusterIP and the headless Service,
    which keeps the admin port off (one scrape per pod)."""
    values = http_wire(port)
    rendered = render(chart, values)
    args = rendered.container["args"]
    assert args.count("--http-listen") == 1
    assert args[args.index("--http-listen") + 1] == f"0.0.0.0:{port}"
    assert args[args.index("--listen") + 1] == "0.0.0.0:9001"  # gRPC stays on
    ports = {p["name"]: p["containerPort"] for p in rendered.container["ports"]}
    assert ports == {"grpc": 9001, "admin": 9090, "http-authz": port}
    expected = {
        "name": "http-authz",
        "port": port,
        "targetPort": "http-authz",
        "protocol": "TCP",
        "appProtocol": "http",
    }
    service = rendered.one("Service", RELEASE)
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "admin", "http-authz"]
    assert service["spec"]["ports"][2] == expected
    headless = rendered.one("Service", f"{RELEASE}-headless")
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc", "http-authz"]
    assert headless["spec"]["ports"][1] == expected


def test_http_wire_admits_the_grpc_callers(chart: helm.Chart) -> None:
    """The NetworkPolicy opens the HTTP wire's port to exactly the gRPC port's callers (one rule
    for both, so they cannot drift apart), the helm test Pod included; admin is unchanged."""
    for values in (HTTP_WIRE, {**MATRIX["networkpolicy"], **HTTP_WIRE}):
        rendered = render(chart, values)
        by_port = ingress_by_port(rendered.one("NetworkPolicy")["spec"])
        assert set(by_port) == {"grpc", "http-authz", "admin"}
        assert by_port["http-authz"] is by_port["grpc"]
        callers = values.get("networkPolicy", {}).get("grpcFrom") or [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}
        ]
        assert by_port["http-authz"]["from"] == [*callers, HELM_TEST_PEER]
        # The named port resolves to the container's.
        assert "http-authz" in {p["name"] for p in rendered.container["ports"]}


def test_http_wire_probes_are_unchanged(chart: helm.Chart, default: Rendered) -> None:
    """No probe of the HTTP wire: extauthz opens both listeners before it reports ready (and
    exits when it cannot open one), so gRPC health, or /readyz, covers both."""
    for values, base in ((HTTP_WIRE, default), ({**TLS_SECRET, **HTTP_WIRE}, None)):
        container = render(chart, values).container
        baseline = (base or render(chart, TLS_SECRET)).container
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe] == baseline[probe], probe
        assert "http-authz" not in json.dumps(
            [container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
        )


def test_http_wire_under_tls_serves_the_same_certificate(chart: helm.Chart) -> None:
    """With tls.enabled the one server.tls (the mounted Secret, client CA included) applies to
    both listeners: nothing more is mounted or configured for the HTTP wire, and its Service
    port says https. The certificate's names are the Services', whichever port is dialled."""
    plain = render(chart, TLS_SECRET)
    both = render(chart, {**TLS_SECRET, **HTTP_WIRE})
    assert both.policy() == plain.policy()
    assert both.policy()["server"]["tls"]["clientCaFile"] == f"{TLS_DIR}/ca.crt"
    assert mounted_files(both) == mounted_files(plain)
    for service in both.all("Service"):
        [http] = [p for p in service["spec"]["ports"] if p["name"] == "http-authz"]
        assert http["appProtocol"] == "https"
    managed = render(chart, {**TLS_CERT_MANAGER, **HTTP_WIRE}).one("Certificate")["spec"]
    assert managed == render(chart, TLS_CERT_MANAGER).one("Certificate")["spec"]


def test_http_wire_under_istio_is_for_the_principals(chart: helm.Chart) -> None:
    """istio.enabled: the ALLOW rule of the gateways' principals covers the HTTP wire's port
    with the gRPC one, STRICT mTLS covers it (no port-level exception), and every container
    port is in exactly one rule."""
    rendered = render(chart, {**ISTIO, **HTTP_WIRE})
    grpc_rule, admin_rule = rendered.one("AuthorizationPolicy")["spec"]["rules"]
    assert grpc_rule["to"] == [{"operation": {"ports": ["9001", "9002"]}}]
    assert (
        grpc_rule["from"]
        == render(chart, ISTIO).one("AuthorizationPolicy")["spec"]["rules"][0]["from"]
    )
    assert admin_rule == {"to": [{"operation": {"ports": ["9090"]}}]}
    covered = [
        port
        for rule in (grpc_rule, admin_rule)
        for to in rule["to"]
        for port in to["operation"]["ports"]
    ]
    assert sorted(covered) == sorted(str(p["containerPort"]) for p in rendered.container["ports"])
    peer = rendered.one("PeerAuthentication")["spec"]
    assert peer["mtls"] == {"mode": "STRICT"} and set(peer["portLevelMtls"]) == {"9090"}


def test_http_wire_in_the_helm_test(chart: helm.Chart) -> None:
    """The hook also asks the HTTP wire, through the Service, on its port."""
    [container] = render(chart, HTTP_WIRE).test_pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EXTAUTHZ_TEST_HTTP_TARGET"] == f"{RELEASE}.{NAMESPACE}.svc.cluster.local:9002"


HTTP_WIRE_MISTAKES = {
    "the gRPC port": (http_wire(9001), "is also ports.grpc"),
    "the admin port": (http_wire(9090), "is also ports.admin"),
    "--http-listen in extraArgs": (
        {"server": {"extraArgs": ["--http-listen=0.0.0.0:9002"]}},
        "`httpWire.enabled`",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "values,message", HTTP_WIRE_MISTAKES.values(), ids=HTTP_WIRE_MISTAKES.keys()
)
def test_http_wire_settings_that_cannot_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    """A port taken by another listener would stop extauthz at start; --http-listen by hand
    would leave the port closed in the Services, the NetworkPolicy and Istio's policy."""
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    # A clash with a port the wire does not open is no clash.
    render(chart, {"httpWire": {"port": 9001}})


@pytest.mark.parametrize(
    "values,key",
    [
        ({"httpWire": {"enable": True}}, "enable"),
        ({"httpWire": {"enabled": "yes"}}, "enabled"),
        (http_wire(0), "port"),
        (http_wire(65536), "port"),
        (http_wire("9002"), "port"),
    ],
    ids=["typo", "not a boolean", "port 0", "port too high", "port as a string"],
)
def test_http_wire_schema(chart: helm.Chart, values: dict[str, Any], key: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(key)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ---------------------------------------------------------------------------------------------
# Disruptions, workers, tracing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget,expected",
    [
        ({}, {"maxUnavailable": 1}),
        ({"maxUnavailable": 0}, {"maxUnavailable": 0}),
        ({"maxUnavailable": "0%"}, {"maxUnavailable": "0%"}),
        ({"maxUnavailable": 2}, {"maxUnavailable": 2}),
        ({"minAvailable": 0}, {"minAvailable": 0}),
        ({"minAvailable": "50%"}, {"minAvailable": "50%"}),
    ],
    ids=str,
)
def test_pdb_keeps_the_budget_as_given(
    chart: helm.Chart, budget: dict[str, Any], expected: dict[str, Any]
) -> None:
    """maxUnavailable: 0 stays 0 (a `default` would have made it 1); minAvailable replaces it."""
    spec = render(chart, {"podDisruptionBudget": budget}).one("PodDisruptionBudget")["spec"]
    assert {k: spec[k] for k in ("maxUnavailable", "minAvailable") if k in spec} == expected


def memory_mi(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2])


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers_scale_memory(chart: helm.Chart, workers: int) -> None:
    """`workers` runs `serve --workers N` and sizes memory as base + N x perWorker."""
    rendered = render(chart, {"workers": workers})
    args, resources = rendered.container["args"], rendered.container["resources"]
    assert args[args.index("--workers") + 1] == str(workers)
    assert args.count("--workers") == 1
    assert memory_mi(resources["requests"]["memory"]) == 64 + workers * 64
    assert memory_mi(resources["limits"]["memory"]) == 128 + workers * 128
    assert resources["requests"]["cpu"] == "100m"
    if workers > 1:  # the supervisor's /readyz waits for every worker; gRPC reaches just one
        assert_http_probes(rendered.container)
    else:
        assert "grpc" in rendered.container["readinessProbe"]


def test_workers_memory_from_values(chart: helm.Chart) -> None:
    memory = {
        "request": {"base": "100Mi", "perWorker": "50Mi"},
        "limit": {"base": "200Mi", "perWorker": "150Mi"},
    }
    resources = render(chart, {"workers": 3, "memory": memory}).container["resources"]
    assert (resources["requests"]["memory"], resources["limits"]["memory"]) == ("250Mi", "650Mi")


WORKER_MISTAKES = {
    "memory in resources": ({"resources": {"requests": {"memory": "1Gi"}}}, "memory.request"),
    "--workers in extraArgs": ({"server": {"extraArgs": ["--workers", "4"]}}, "`workers`"),
    "limit below request": (
        {"memory": {"request": {"base": "64Mi", "perWorker": "64Mi"}, "limit": {"base": "32Mi", "perWorker": "64Mi"}}},
        "memory.limit.base",
    ),
}  # fmt: skip


@pytest.mark.parametrize("values,message", WORKER_MISTAKES.values(), ids=WORKER_MISTAKES.keys())
def test_workers_settings_that_would_not_follow_are_refused(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_otel_values_become_the_standard_variables(chart: helm.Chart, default: Rendered) -> None:
    """otel.*: OTEL_EXPORTER_OTLP_ENDPOINT and _PROTOCOL, the sampler (parentbased_*, so extauthz
    follows the sampling decision Envoy's traceparent carries), the service name and resource
    attributes; without an endpoint no exporter is configured."""
    env = {e["name"]: e for e in render(chart, EXISTING_SECRET).container["env"]}
    otel = EXISTING_SECRET["otel"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == otel["endpoint"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "grpc"
    assert env["OTEL_TRACES_SAMPLER"]["value"] == otel["sampler"]
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == otel["samplerArg"]
    assert env["OTEL_SERVICE_NAME"]["value"] == "extauthz"
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(",")
    assert attributes[:2] == ["k8s.namespace.name=$(POD_NAMESPACE)", "k8s.pod.name=$(POD_NAME)"]
    assert "deployment.environment=production" in attributes
    plain = {e["name"]: e for e in default.container["env"]}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in plain
    assert plain["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_always_on"


# ---------------------------------------------------------------------------------------------
# `helm test`
# ---------------------------------------------------------------------------------------------


def test_helm_test_hook_pod(default: Rendered) -> None:
    """A test hook Pod, removed once it passes, running files/helm_test.py in the release's own
    image (so it is pinned with it) against the Service's gRPC port, as locked down as extauthz."""
    pod = default.test_pod
    annotations = pod["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "test"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] > 0
    assert spec["automountServiceAccountToken"] is False
    [container] = spec["containers"]
    assert container["image"] == default.container["image"]
    assert container["command"] == [
        "python",
        "-c",
        (CHART_DIR / "files" / "helm_test.py").read_text(),
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = default.one("Service", RELEASE)
    assert env["EXTAUTHZ_TEST_TARGET"] == f"{RELEASE}.{NAMESPACE}.svc.cluster.local:9001"
    assert service["spec"]["ports"][0]["port"] == 9001
    assert (env["EXTAUTHZ_TEST_HOST"], env["EXTAUTHZ_TEST_PATH"]) == (
        "helm-test.invalid",
        "/extauthz-helm-test",
    )
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert "volumeMounts" not in container  # nothing to write, nothing to read without TLS
    # Not an extauthz pod: the Services, the PDB and the NetworkPolicy do not select it.
    selector = default.one("Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= pod["metadata"]["labels"].items()


def test_helm_test_hook_with_tls_mounts_the_secrets(chart: helm.Chart) -> None:
    """With TLS the hook trusts the serving Secret's CA and, under requireClientCert, presents a
    client certificate: the serving one, or helmTest.clientCertSecret's."""
    for values, client_secret in (
        (TLS_SECRET, "extauthz-serving"),
        (TLS_CERT_MANAGER, "extauthz-test-client"),
    ):
        rendered = render(chart, values)
        pod = rendered.test_pod["spec"]
        [container] = pod["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"]}
        serving = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"][0]
        serving_secret = serving["projected"]["sources"][1]["secret"]["name"]
        assert volumes[mounts[env["EXTAUTHZ_TEST_TLS_DIR"]]["name"]] == serving_secret
        assert volumes[mounts[env["EXTAUTHZ_TEST_CLIENT_DIR"]]["name"]] == client_secret
        assert all(m["readOnly"] for m in mounts.values())
        assert_no_subpath(rendered.test_pod)


def run_hook(
    rendered: Rendered, target: str, mounts: dict[str, Path], **env: str | None
) -> subprocess.CompletedProcess[str]:
    """The hook Pod's command, here: its environment (``env`` overriding, None removing), the
    target replaced and its mount paths mapped to ``mounts``."""
    [container] = rendered.test_pod["spec"]["containers"]
    program, flag, script = container["command"]
    assert (program, flag) == ("python", "-c")
    pod_env: dict[str, str | None] = {e["name"]: e["value"] for e in container["env"]}
    pod_env["EXTAUTHZ_TEST_TARGET"] = target
    for name, value in pod_env.items():
        if value in mounts:
            pod_env[name] = str(mounts[value])
    pod_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", script],
        env=extauthz_env({k: v for k, v in pod_env.items() if v is not None}),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# The rendered chart, extauthz, the hook's mounts, and the HTTP wire's address for the hook.
MtlsServer = tuple[Rendered, ExtauthzProcess, dict[str, Path], str]


@pytest.fixture(scope="module")
def mtls_server(
    chart: helm.Chart, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MtlsServer]:
    """extauthz serving the chart's own ConfigMap config under tls.existingSecret with
    requireClientCert, its Secret's files laid out as the pod mounts them, on both wires (the
    HTTP one as the chart's container args open it, on a free loopback port); the hook's
    mounts."""
    rendered = render(chart, {**TLS_SECRET, **HTTP_WIRE})
    root = tmp_path_factory.mktemp("pod")
    authority = Authority("extauthz-helm-test CA")
    # cert-manager's Certificate carries both usages when requireClientCert: the hook presents
    # the serving certificate as its client certificate.
    issued = authority.issue("extauthz", server=True, client=True)
    secret = root / "secret"
    issued.write(secret, "tls")
    authority.write(secret, "ca")
    tls_dir = root / "etc" / "extauthz" / "tls"
    tls_dir.parent.mkdir(parents=True)
    shutil.copytree(secret, tls_dir)
    policy = rendered.policy()
    policy["server"]["tls"] = {
        key: str(root / path.lstrip("/")) for key, path in policy["server"]["tls"].items()
    }
    assert all(Path(path).is_file() for path in policy["server"]["tls"].values())
    [container] = rendered.test_pod["spec"]["containers"]
    mounts = {m["mountPath"]: secret for m in container["volumeMounts"]}
    args = rendered.container["args"]
    assert args[args.index("--http-listen") + 1] == "0.0.0.0:9002"
    http_port = free_port()
    http_listen = ["--http-listen", f"127.0.0.1:{http_port}"]
    with ExtauthzProcess(policy, root / "extauthz", args=http_listen) as server:
        # `helm test` runs on a rolled-out release: the pod is ready (its warm start is over).
        wait_until(lambda: ready(server), timeout=30, what="extauthz /readyz 200")
        yield rendered, server, mounts, f"localhost:{http_port}"


def ready(server: ExtauthzProcess) -> bool:
    try:
        return server.admin("readyz")[0] == 200
    except OSError:  # urllib's HTTPError for a 503 included
        return False


def test_helm_test_hook_passes_against_the_chart_config_over_mtls(
    mtls_server: MtlsServer,
) -> None:
    """files/helm_test.py, with the hook Pod's environment and mounts, against a real extauthz
    serving the chart's rendered config over mTLS: SERVING, and the anonymous check denied
    (no_matching_policy: no deployment covers helm-test.invalid), on the gRPC wire and, with the
    same client certificate, on the HTTP wire."""
    rendered, server, mounts, http_target = mtls_server
    result = run_hook(
        rendered, f"localhost:{server.port}", mounts, EXTAUTHZ_TEST_HTTP_TARGET=http_target
    )
    assert result.returncode == 0, result.stdout + result.stderr
    grpc_line, http_line = result.stdout.splitlines()
    assert grpc_line.startswith("ok: ") and "denied with 403" in grpc_line
    assert http_line == (
        f"ok: HTTP wire {http_target}: GET helm-test.invalid/extauthz-helm-test without"
        " credentials denied with 403 (no_matching_policy)"
    )
    accesses = wait_until(
        lambda: [
            line for line in server.events("access") if line["path"] == "/extauthz-helm-test"
        ][:2] if len(server.events("access")) >= 2 else None,
        timeout=10, what="the hook's two checks in extauthz's access log",
    )  # fmt: skip
    assert len(accesses) == 2
    for access in accesses:
        assert (access["decision"], access["reason"]) == ("deny", "no_matching_policy")
        assert access["requestId"].startswith("helm-test-")
    assert accesses[0]["requestId"] != accesses[1]["requestId"]


def test_helm_test_hook_fails_without_a_client_certificate(mtls_server: MtlsServer) -> None:
    """The same hook without its client certificate cannot get past extauthz's handshake: it
    fails, saying so."""
    rendered, server, mounts, http_target = mtls_server
    result = run_hook(
        rendered, f"localhost:{server.port}", mounts,
        EXTAUTHZ_TEST_CLIENT_DIR=None, EXTAUTHZ_TEST_HTTP_TARGET=http_target,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("failed: ") and "UNAVAILABLE" in result.stderr


def test_helm_test_hook_fails_when_the_check_is_allowed(
    default: Rendered, rsa_key: SigningKey, tmp_path: Path
) -> None:
    """A policy that lets the hook's request through anonymously fails the test: it would let
    any unauthenticated request through too."""
    open_door = {
        "name": "open",
        "hosts": ["helm-test.invalid"],
        "pathPrefix": "/",
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "isAnonymousAccessAllowed": True,
            "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]},
        },
    }
    policy = default.policy()
    policy["deployments"].append(open_door)
    with ExtauthzProcess(policy, tmp_path) as server:
        wait_until(lambda: ready(server), timeout=30, what="extauthz /readyz 200")
        result = run_hook(default, f"127.0.0.1:{server.port}", {})
    assert result.returncode == 1
    assert "without credentials was allowed" in result.stderr


class _NotExtauthz(http.server.BaseHTTPRequestHandler):
    """A proxy's own refusal: 403 without extauthz's x-extauthz-reason."""

    def do_GET(self) -> None:
        self.send_response(403)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_helm_test_hook_fails_when_the_http_wire_is_not_extauthz(
    chart: helm.Chart, default: Rendered, tmp_path: Path
) -> None:
    """With httpWire on, the gRPC half passing is not enough: the HTTP wire closed, or a 403
    that extauthz did not write (an Istio RBAC denial, say), fails the hook, naming the wire."""
    rendered = render(chart, HTTP_WIRE)
    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotExtauthz)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        with ExtauthzProcess(default.policy(), tmp_path) as server:
            wait_until(lambda: ready(server), timeout=30, what="extauthz /readyz 200")
            grpc_target = f"127.0.0.1:{server.port}"
            closed = run_hook(
                rendered, grpc_target, {}, EXTAUTHZ_TEST_HTTP_TARGET=f"127.0.0.1:{closed_port()}"
            )
            forged = run_hook(
                rendered, grpc_target, {},
                EXTAUTHZ_TEST_HTTP_TARGET=f"127.0.0.1:{impostor.server_address[1]}",
            )  # fmt: skip
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert closed.returncode == 1 and closed.stdout.startswith("ok: ")  # gRPC passed
    assert closed.stderr.startswith("failed: HTTP wire 127.0.0.1:")
    assert "ConnectionRefusedError" in closed.stderr
    assert forged.returncode == 1
    assert "answered 403 without x-extauthz-reason, not by extauthz" in forged.stderr


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
# The shared cache (sharedCache)
# ---------------------------------------------------------------------------------------------

SHARED_DIR = "/var/run/secrets/extauthz-shared-cache"
# The config's server.sharedCache that SHARED_CACHE renders.
SHARED_CACHE_SETTINGS: dict[str, Any] = {
    "uri": "rediss://extauthz@valkey.cache.svc.cluster.local:6380/0",
    "signingKeyFile": f"{SHARED_DIR}/signing-key",
    "passwordFile": f"{SHARED_DIR}/password",
    "caFile": f"{SHARED_DIR}/ca.crt",
    "timeoutMilliseconds": 80,
}


def shared_cache(**settings: Any) -> dict[str, Any]:
    """sharedCache values: on, a uri and a signing key Secret, and ``settings`` over them."""
    base = {"enabled": True, "uri": "redis://redis.cache:6379/0"}
    return {"sharedCache": {**base, "signingKeySecret": {"name": "fleet"}, **settings}}


def shared_egress(rendered: Rendered) -> list[dict[str, Any]]:
    """The NetworkPolicy's egress rules other than DNS."""
    egress = rendered.one("NetworkPolicy")["spec"].get("egress", [])
    return [rule for rule in egress if {p["port"] for p in rule["ports"]} != {53}]


def test_shared_cache_is_off_by_default(default: Rendered) -> None:
    """Without values: no server.sharedCache, no volume, no annotation, no egress rule."""
    assert "sharedCache" not in default.policy()["server"]
    assert {v["name"] for v in default.pod["volumes"]} == {"config", "tmp"}
    annotations = default.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/shared-cache" not in annotations
    assert "egress" not in default.one("NetworkPolicy")["spec"]


def test_shared_cache_files_and_config(chart: helm.Chart) -> None:
    """The signing key, the password and the CA are projected read-only from their Secrets into
    one directory (key and password readable by the pod's fsGroup only, never subPath), and the
    served config's server.sharedCache names exactly those files, beside the rest of `server`."""
    rendered = render(chart, SHARED_CACHE)
    files = projected_files(rendered, "shared-cache")
    assert files == {
        f"{SHARED_DIR}/signing-key": ("secret", "extauthz-fleet:signing-key"),
        f"{SHARED_DIR}/password": ("secret", "valkey-users:extauthz"),
        f"{SHARED_DIR}/ca.crt": ("secret", "valkey-tls:ca.crt"),
    }
    [mount] = [m for m in rendered.container["volumeMounts"] if m["name"] == "shared-cache"]
    assert mount == {"name": "shared-cache", "mountPath": SHARED_DIR, "readOnly": True}
    [volume] = [v for v in rendered.pod["volumes"] if v["name"] == "shared-cache"]
    modes = {
        item["path"]: item.get("mode")
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    assert modes == {"signing-key": 0o440, "password": 0o440, "ca.crt": None}
    assert_no_subpath(rendered.one("Deployment"))
    server = rendered.policy()["server"]
    assert server == {"denyStatusOnIdpFailure": 503, "sharedCache": SHARED_CACHE_SETTINGS}
    settings = parse_config(rendered.policy()).server.shared_cache
    assert settings is not None and settings.timeout_seconds == 0.08
    assert {settings.signing_key_file, settings.password_file, settings.ca_file} == set(files)
    assert rendered.all("Secret") == []


def test_shared_cache_without_password_with_a_ca_configmap(chart: helm.Chart) -> None:
    """No passwordSecret: no password file, no passwordFile; the CA may come from a ConfigMap."""
    values = shared_cache(
        uri="rediss://valkey.cache:6379", ca={"configMapName": "valkey-ca", "key": "ca.pem"}
    )
    rendered = render(chart, values)
    assert projected_files(rendered, "shared-cache") == {
        f"{SHARED_DIR}/signing-key": ("secret", "fleet:signing-key"),
        f"{SHARED_DIR}/ca.crt": ("configMap", "valkey-ca:ca.pem"),
    }
    assert rendered.policy()["server"]["sharedCache"] == {
        "uri": "rediss://valkey.cache:6379",
        "signingKeyFile": f"{SHARED_DIR}/signing-key",
        "caFile": f"{SHARED_DIR}/ca.crt",
        "timeoutMilliseconds": 50,
    }


def test_shared_cache_with_an_existing_configmap_mounts_the_files(chart: helm.Chart) -> None:
    """existingConfigMap: the chart cannot write server.sharedCache, but mounts the files where
    that config is to name them."""
    rendered = render(chart, {**MATRIX["existing-configmap"], **SHARED_CACHE})
    assert rendered.all("ConfigMap") == []
    assert set(projected_files(rendered, "shared-cache")) == {
        SHARED_CACHE_SETTINGS[key] for key in ("signingKeyFile", "passwordFile", "caFile")
    }


@pytest.mark.parametrize(
    "uri,port",
    [
        ("rediss://extauthz@valkey.cache.svc.cluster.local:6380/0", 6380),
        ("redis://redis.cache", 6379),
        ("redis://redis.cache/2", 6379),
        ("redis://user@redis.cache:7000", 7000),
        ("redis://[fd00::7]:6390/0", 6390),
        ("redis://[fd00::7]", 6379),
    ],
)
def test_networkpolicy_egress_to_the_shared_cache(chart: helm.Chart, uri: str, port: int) -> None:
    """With egress restricted, one rule opens the uri's port (6379 when it names none) to the
    peers given, after DNS and the user's rules."""
    values = with_value("sharedCache.uri", uri, SHARED_CACHE)
    if uri.startswith("redis://"):  # no TLS, no CA
        del values["sharedCache"]["ca"]
    rules = MATRIX["networkpolicy"]["networkPolicy"]["egress"]["rules"]
    values["networkPolicy"]["egress"]["rules"] = rules
    egress = render(chart, values).one("NetworkPolicy")["spec"]["egress"]
    assert egress[1:] == [
        *values["networkPolicy"]["egress"]["rules"],
        {"ports": [{"port": port, "protocol": "TCP"}], "to": [VALKEY_PODS]},
    ]


def test_networkpolicy_egress_port_may_be_given(chart: helm.Chart) -> None:
    """A Service forwarding 6379 to the pods' 16379: the policy must name the pods' port."""
    cidr = [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    values = {
        **shared_cache(),
        "networkPolicy": {"egress": {"enabled": True, "sharedCache": {"to": cidr, "port": 16379}}},
    }
    assert shared_egress(render(chart, values)) == [
        {"ports": [{"port": 16379, "protocol": "TCP"}], "to": cidr}
    ]


def test_networkpolicy_open_egress_needs_no_rule(chart: helm.Chart) -> None:
    """Egress not restricted (the default): no egress rule, none needed."""
    policy = render(chart, shared_cache()).one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and "egress" not in policy


SHARED_CACHE_MISTAKES = {
    "no uri": (shared_cache(uri=""), r"sharedCache\.enabled needs sharedCache\.uri"),
    "no signing key": (
        shared_cache(signingKeySecret={"name": ""}),
        r"needs sharedCache\.signingKeySecret\.name: an existing Secret",
    ),
    "password in the uri": (
        shared_cache(uri="redis://extauthz:hunter2@redis.cache:6379"),
        r"sharedCache\.uri holds a password: .* sharedCache\.passwordSecret",
    ),
    "CA for plain redis": (
        shared_cache(ca={"secretName": "redis-tls"}),
        r"sharedCache\.ca needs a rediss:// sharedCache\.uri",
    ),
    "two CA sources": (
        shared_cache(uri="rediss://r:6379", ca={"secretName": "a", "configMapName": "b"}),
        r"sharedCache\.ca: set secretName or configMapName, not both",
    ),
    "config.server.sharedCache as well": (
        {
            **shared_cache(),
            "config": {
                **DEFAULT_CONFIG,
                "server": {"sharedCache": {"uri": "redis://r", "signingKeyEnv": "KEY"}},
            },
        },
        r"sharedCache\.enabled sets config\.server\.sharedCache itself",
    ),
    "restricted egress without the peers": (
        {**shared_cache(), "networkPolicy": {"egress": {"enabled": True}}},
        r"needs networkPolicy\.egress\.sharedCache\.to",
    ),
    "settings while off": (
        {"sharedCache": {"uri": "redis://r:6379", "signingKeySecret": {"name": "fleet"}}},
        r"take effect with sharedCache\.enabled: true",
    ),
}


@pytest.mark.parametrize(
    "values,message", SHARED_CACHE_MISTAKES.values(), ids=SHARED_CACHE_MISTAKES.keys()
)
def test_shared_cache_settings_that_cannot_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    "values,key",
    [
        (shared_cache(signingKey="c2VjcmV0"), "signingKey"),
        (shared_cache(password="hunter2"), "password"),
        (shared_cache(uri="https://redis.cache"), "uri"),
        (shared_cache(timeoutMilliseconds=0), "timeoutMilliseconds"),
        (shared_cache(timeoutMilliseconds=5001), "timeoutMilliseconds"),
        (shared_cache(passwordSecret={"name": "p", "value": "hunter2"}), "value"),
        (with_value("networkPolicy.egress.sharedCache.port", 70000, shared_cache()), "port"),
    ],
    ids=[
        "secret data: signing key", "secret data: password", "not redis", "timeout 0",
        "timeout too long", "secret data in passwordSecret", "port too high",
    ],
)  # fmt: skip
def test_shared_cache_schema(chart: helm.Chart, values: dict[str, Any], key: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(key)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_shared_cache_sources_roll_the_pods(chart: helm.Chart) -> None:
    """extauthz reads the key, password and CA at start only, so the pod template carries their
    sources: with `helm install` / `upgrade` each with its resourceVersion (a rotated Secret rolls
    the pods); offline, as here, where `lookup` finds nothing, without one. Names, never data."""

    def annotation(values: dict[str, Any]) -> str:
        metadata = render(chart, values).one("Deployment")["spec"]["template"]["metadata"]
        value: str = metadata["annotations"]["checksum/shared-cache"]
        return value

    sources = "Secret/extauthz-fleet@,Secret/valkey-users@,Secret/valkey-tls@"
    assert annotation(SHARED_CACHE) == hashlib.sha256(sources.encode()).hexdigest()
    in_a_configmap = with_value("sharedCache.ca", {"configMapName": "valkey-ca"}, SHARED_CACHE)
    sources = "Secret/extauthz-fleet@,Secret/valkey-users@,ConfigMap/valkey-ca@"
    assert annotation(in_a_configmap) == hashlib.sha256(sources.encode()).hexdigest()
    # One Secret holding both: listed once.
    one_secret = with_value("sharedCache.passwordSecret.name", "extauthz-fleet", SHARED_CACHE)
    sources = "Secret/extauthz-fleet@,Secret/valkey-tls@"
    assert annotation(one_secret) == hashlib.sha256(sources.encode()).hexdigest()


def test_notes_describe_the_shared_cache(chart: helm.Chart, default: Rendered) -> None:
    """NOTES.txt names the server and the Secrets, and how to restart after a rotation; with an
    HPA and no shared cache, what scaling out costs the IdP."""
    notes = render(chart, {**SHARED_CACHE, "autoscaling": {"enabled": True}}).notes
    assert f"Shared cache (server.sharedCache): {SHARED_CACHE_SETTINGS['uri']}" in notes
    assert "once per fleet, not once\nper replica (nor once more per replica the HPA adds)" in notes
    assert "signing key : Secret extauthz-fleet, key signing-key" in notes
    assert "password    : Secret valkey-users, key extauthz" in notes
    assert "CA          : Secret valkey-tls, key ca.crt" in notes
    assert f"kubectl -n {NAMESPACE} rollout restart deployment/{RELEASE}" in notes
    assert "Autoscaling:" not in notes
    scaling = render(chart, {"autoscaling": {"enabled": True}}).notes
    assert "a replica the HPA adds asks the\nIdP again" in scaling
    assert "Shared cache" not in scaling and "Shared cache" not in default.notes


# A fleet as the chart deploys it, against a real Redis over TLS and a real IdP.
CLIENT_ID = "orders-gateway"


def lay_out_mounts(
    rendered: Rendered, root: Path, volumes: set[str], objects: dict[tuple[str, str], Any]
) -> None:
    """The files of the pod's ``volumes`` under ``root``, as the kubelet projects them from
    ``objects``, the data of the Secrets and ConfigMaps by (kind, name): a key the chart names
    that is not there is a KeyError, as it is a failed mount in the cluster."""
    by_name = {v["name"]: v for v in rendered.pod["volumes"]}
    for mount in rendered.container["volumeMounts"]:
        if mount["name"] not in volumes:
            continue
        volume = by_name[mount["name"]]
        if "projected" in volume:
            sources = volume["projected"]["sources"]
        else:  # a volume of one Secret or ConfigMap
            sources = [{k: v for k, v in volume.items() if k in ("secret", "configMap")}]
        for source in sources:
            [(kind, spec)] = source.items()
            name = spec.get("name") or spec["secretName"]
            data = objects[(kind, name)]
            for item in spec.get("items") or [{"key": key, "path": key} for key in data]:
                path = root / mount["mountPath"].lstrip("/") / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(data[item["key"]])


def rooted(policy: Any, root: Path) -> Any:
    """``policy`` with every ``...File`` path under ``root`` (where lay_out_mounts put them)."""
    if isinstance(policy, dict):
        return {
            key: str(root / value.lstrip("/"))
            if key.endswith("File") and isinstance(value, str)
            else rooted(value, root)
            for key, value in policy.items()
        }
    if isinstance(policy, list):
        return [rooted(item, root) for item in policy]
    return policy


def test_the_chart_fleet_shares_its_introspections(
    chart: helm.Chart, tls_redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two replicas of `extauthz serve`, each with the chart's rendered config and the files its
    pod mounts (signing key, password and CA from their Secrets, the client secret from its own),
    against a real redis-server over TLS and a real IdP: each token is introspected once for the
    fleet, Redis holds one HMAC'd key per token, and no log line holds a secret."""
    assert tls_redis_server.cert is not None
    signing_key, client_secret = secrets.token_hex(32), secrets.token_urlsafe(16)
    objects: dict[tuple[str, str], Any] = {
        ("secret", "extauthz-fleet"): {"signing-key": signing_key + "\n"},
        ("secret", "valkey-users"): {"extauthz": tls_redis_server.password},
        ("secret", "valkey-tls"): {"ca.crt": tls_redis_server.cert.read_text()},
        ("secret", "idp-clients"): {"orders": client_secret},
    }
    with FaultyIdp(clients={CLIENT_ID: client_secret}, tls=False) as idp:
        introspection = {
            "type": "REMOTE_INTROSPECTION",
            "uri": idp.introspection("/introspect"),
            "clientDetails": {
                "clientId": CLIENT_ID,
                "clientSecretFile": "/var/run/secrets/extauthz/orders",
            },
        }
        values = {
            **SHARED_CACHE,
            "config": {"deployments": [orders(introspection)]},
            "clientSecrets": {"existingSecret": "idp-clients"},
        }
        rendered = render(chart, values)
        replicas = []
        for name in ("a", "b"):
            root = tmp_path / name
            lay_out_mounts(rendered, root, {"shared-cache", "client-secrets"}, objects)
            policy = rooted(rendered.policy(), root)
            # The Service's name in the cluster, this machine's server here; a loaded machine
            # gets more time than the chart's 80 ms.
            policy["server"]["sharedCache"]["uri"] = tls_redis_server.uri
            policy["server"]["sharedCache"]["timeoutMilliseconds"] = 500
            replicas.append(ExtauthzProcess(policy, root))
        a, b = replicas
        with a, b:
            tokens = [idp.issue(claims(sub=f"user-{i}")) for i in range(3)]
            for token in tokens:
                assert a.check(token, path="/orders/1").allowed
            stored = wait_until(
                lambda: (keys := tls_redis_server.client().keys("*")) and len(keys) == 3 and keys,
                timeout=5, what="three entries in Redis",
            )  # fmt: skip
            for token in tokens:
                checked = b.check(token, path="/orders/1")
                assert checked.allowed
                assert b.line(checked.request_id, "access")["idpCalls"] == 0
            assert idp.count("/introspect") == len(tokens)
            assert all(k.startswith(b"extauthz:v1:introspection:") for k in stored)
            assert json.loads(b.admin("readyz")[1])["sharedCache"]["available"] is True
            logs = a.text() + b.text()
        for secret in (signing_key, tls_redis_server.password, client_secret, *tokens):
            assert secret not in logs


# ---------------------------------------------------------------------------------------------
# helm lint, NOTES.txt and the Istio / Envoy examples that point at the chart
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "tls-secret", "istio", "everything"])
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
    declared = {p["name"]: p for p in mesh["meshConfig"]["extensionProviders"]}
    providers = {
        name: p["envoyExtAuthzGrpc"] for name, p in declared.items() if "envoyExtAuthzGrpc" in p
    }
    assert set(providers) == {"extauthz", "extauthz-external"}
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
        assert policy["spec"]["provider"]["name"] in declared
        # Everything but the probes is checked: no positive `paths`, which other spellings of
        # the same path (//orders/7, /orders%2F7, /ORDERS/7) would not match.
        operations = [to["operation"] for rule in policy["spec"]["rules"] for to in rule["to"]]
        assert all("paths" not in op and op["notPaths"] for op in operations), policy
        assert all({"from", "when"}.isdisjoint(rule) for rule in policy["spec"]["rules"])

    # The mesh merges slashes at least, and its README names the setting the file sets.
    normalization = mesh["meshConfig"]["pathNormalization"]["normalization"]
    assert normalization in {"MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"}
    readme = (istio / "README.md").read_text()
    assert f"**Paths: `meshConfig.pathNormalization.normalization: {normalization}`**" in readme

    [entry] = load_all(istio / "service-entry.yaml")
    assert (entry["apiVersion"], entry["kind"]) == ("networking.istio.io/v1", "ServiceEntry")
    namespace, _, host = providers["extauthz-external"]["service"].rpartition("/")
    assert host in entry["spec"]["hosts"] and namespace == entry["metadata"]["namespace"]
    assert {(p["number"], p["protocol"]) for p in entry["spec"]["ports"]} == {(grpc_port, "GRPC")}


# The fields of Istio's MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationHttpProvider.
ISTIO_HTTP_PROVIDER_FIELDS = {
    "service", "port", "timeout", "pathPrefix", "failOpen", "statusOnError",
    "includeHeadersInCheck", "includeRequestHeadersInCheck", "includeAdditionalHeadersInCheck",
    "includeRequestBodyInCheck", "headersToUpstreamOnAllow", "headersToDownstreamOnDeny",
    "headersToDownstreamOnAllow",
}  # fmt: skip
# What a denial carries to the client besides its status and body (docs/decisions.md).
DENIAL_HEADERS = ["www-authenticate", "x-extauthz-reason", "x-request-id", "content-type"]


def shipped_policies() -> list[dict[str, Any]]:
    """examples/demo.yaml and the chart's sample policy."""
    return [yaml.safe_load((REPO / "examples" / "demo.yaml").read_text()), DEFAULT_CONFIG]


def http_provider() -> dict[str, Any]:
    [mesh] = load_all(REPO / "envoy" / "istio" / "mesh-config.yaml")
    [provider] = [
        p["envoyExtAuthzHttp"]
        for p in mesh["meshConfig"]["extensionProviders"]
        if p["name"] == "extauthz-http"
    ]
    assert isinstance(provider, dict)
    return provider


def test_istio_http_provider_points_at_the_http_wire(chart: helm.Chart) -> None:
    """mesh-config.yaml's extauthz-http: the chart's Service on its http-authz port, failing
    closed like the gRPC providers; the check carries what extauthz reads (never a client's
    x-extauthz-*), an allow passes the shipped policies' identity headers (those
    envoy/http-wire.yaml lets through), a denial its headers, and a fixed header names a
    deployment of those policies."""
    provider = http_provider()
    assert set(provider) <= ISTIO_HTTP_PROVIDER_FIELDS
    # extauthz matches the client's path as it comes, and decides on the head alone.
    assert {"pathPrefix", "includeRequestBodyInCheck", "includeHeadersInCheck"}.isdisjoint(provider)
    rendered = render(chart, HTTP_WIRE)
    service = rendered.one("Service", RELEASE)
    [port] = [p for p in service["spec"]["ports"] if p["name"] == "http-authz"]
    assert provider["service"] == f"{RELEASE}.{NAMESPACE}.svc.cluster.local"
    assert provider["port"] == port["port"] == rendered.container["ports"][2]["containerPort"]
    [mesh] = load_all(REPO / "envoy" / "istio" / "mesh-config.yaml")
    grpc = mesh["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    assert {k: provider[k] for k in ("timeout", "failOpen", "statusOnError")} == {
        "timeout": grpc["timeout"], "failOpen": False, "statusOnError": "503"
    }  # fmt: skip

    forwarded = provider["includeRequestHeadersInCheck"]
    assert forwarded == ["authorization", "x-request-id", "traceparent", "tracestate"]
    assert not [h for h in forwarded if h.lower().startswith("x-extauthz-")]
    policies = shipped_policies()
    token_headers = {
        d["authentication"].get("tokenHeader", "Authorization").lower()
        for config in policies
        for d in config["deployments"]
    }
    assert token_headers <= set(forwarded)

    identity = {name for config in policies for d in config["deployments"] for name in d.get("headersFromClaims") or {}}  # fmt: skip
    assert (
        set(provider["headersToUpstreamOnAllow"]) == identity == {"x-auth-subject", "x-auth-tenant"}
    )
    envoy = yaml.safe_load((REPO / "envoy" / "http-wire.yaml").read_text())
    allowed = {
        pattern["exact"]
        for node in walk(envoy)
        for pattern in node.get("allowed_upstream_headers", {}).get("patterns", [])
    }
    assert allowed == identity
    assert provider["headersToDownstreamOnDeny"] == DENIAL_HEADERS

    # The deployment is named by Istio's fixed check header, which exists on this provider.
    assert provider["includeAdditionalHeadersInCheck"] == {"x-extauthz-deployment": "orders"}
    for config in policies:
        assert "orders" in {d["name"] for d in config["deployments"]}
    readme = (REPO / "envoy" / "istio" / "README.md").read_text()
    assert "## The HTTP wire: `extauthz-http`" in readme
    assert "includeAdditionalHeadersInCheck" in readme and "overwrites" in readme


def notes_provider(notes: str, name: str) -> dict[str, Any]:
    """The extension provider ``name`` of the NOTES' mesh config snippet."""
    snippet = notes.split("    extensionProviders:\n", 1)[1].split("\n\n", 1)[0]
    providers = yaml.safe_load(textwrap.dedent(snippet))
    [provider] = [p for p in providers if p["name"] == name]
    assert isinstance(provider, dict)
    return provider


def test_notes_print_the_http_wire(chart: helm.Chart, default: Rendered) -> None:
    """With httpWire.enabled the NOTES name the HTTP wire's address, and print the Istio
    provider for it: mesh-config.yaml's, without the fixed deployment (the snippet's policy is
    on a gateway: host and path select), its identity headers those of the release's policy."""
    assert "HTTP ext_authz" not in default.notes and "extauthz-http" not in default.notes
    notes = render(chart, HTTP_WIRE).notes
    assert f"HTTP ext_authz : {RELEASE}.{NAMESPACE}.svc.cluster.local:9002" in notes
    assert "envoy/http-wire.yaml" in notes
    printed = notes_provider(notes, "extauthz-http")["envoyExtAuthzHttp"]
    shipped = http_provider()
    expected = {k: v for k, v in shipped.items() if k != "includeAdditionalHeadersInCheck"}
    expected["headersToUpstreamOnAllow"] = ["x-auth-subject"]  # the chart's sample policy
    assert printed == expected
    policy = {"deployments": [*INTROSPECTION_POLICY["deployments"]]}
    policy["deployments"][0] = {
        **policy["deployments"][0],
        "headersFromClaims": {"X-User": "sub", "x-auth-tenant": "tenant"},
        "authentication": {**policy["deployments"][0]["authentication"], "tokenHeader": "X-Token"},
    }
    printed = notes_provider(render(chart, {**HTTP_WIRE, "config": policy}).notes, "extauthz-http")
    http = printed["envoyExtAuthzHttp"]
    assert http["headersToUpstreamOnAllow"] == ["x-auth-tenant", "x-user"]
    assert http["includeRequestHeadersInCheck"] == [
        "authorization", "x-token", "x-request-id", "traceparent", "tracestate"
    ]  # fmt: skip
    existing = render(chart, {**HTTP_WIRE, **MATRIX["existing-configmap"]}).notes
    assert (
        notes_provider(existing, "extauthz-http")["envoyExtAuthzHttp"]["headersToUpstreamOnAllow"]
        == []
    )


def test_readme_envoy_snippet_resolves_the_headless_service(default: Rendered) -> None:
    """README's "Use with Envoy" cluster is STRICT_DNS on the headless Service (one address per
    pod, so Envoy balances over them), not on the ClusterIP, which would hide the pods."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use with Envoy", 1)[1].split("## Use with Istio", 1)[0]
    essentials = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    [cluster] = [c for c in essentials["clusters"] if c["name"] == "extauthz"]
    assert cluster["type"] == "STRICT_DNS"
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    headless = default.one("Service", f"{RELEASE}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert address == {
        "address": f"{RELEASE}-headless.{NAMESPACE}.svc.cluster.local",
        "port_value": headless["spec"]["ports"][0]["port"],
    }


def test_readme_shared_cache_values_render(chart: helm.Chart) -> None:
    """README's "A fleet with a shared cache" values render as it says: the served config's
    server.sharedCache names the mounted files, the egress rule opens the URI's port to Valkey,
    and the eviction command it shows names the config where the pod has it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### A fleet with a shared cache", 1)[1].split("\n## ", 1)[0]
    values = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    rendered = render(chart, values)
    assert rendered.policy()["server"]["sharedCache"] == {
        **SHARED_CACHE_SETTINGS,
        "timeoutMilliseconds": 50,
    }
    [*_, to_valkey] = rendered.one("NetworkPolicy")["spec"]["egress"]
    assert to_valkey == {
        "ports": [{"port": 6380, "protocol": "TCP"}],
        "to": values["networkPolicy"]["egress"]["sharedCache"]["to"],
    }
    assert rendered.one("HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 20
    config_path = rendered.container["args"][rendered.container["args"].index("--config") + 1]
    assert f"extauthz evict --config {config_path} --token-file -" in section
    assert f"deploy/{RELEASE}" in section and f"-n {NAMESPACE}" in section


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


OTEL_TRACER = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"


@pytest.mark.parametrize("name", ["envoy.yaml", "front-proxy.yaml", "sidecar.yaml"])
def test_envoy_examples_trace_like_the_chart(chart: helm.Chart, name: str) -> None:
    """Every shipped Envoy config traces the same way: the OpenTelemetry tracer exporting over
    gRPC (HTTP/2) to its opentelemetry_collector cluster, which the front proxy finds where the
    chart's otel.endpoint example points; the chart's sampler is parent-based, so extauthz follows
    the sampling decision Envoy makes and passes in the check's traceparent."""
    document = yaml.safe_load((REPO / "envoy" / name).read_text())
    managers = [
        n for n in walk(document)
        if str(n.get("@type", "")).endswith("HttpConnectionManager")
    ]  # fmt: skip
    assert managers
    for manager in managers:
        provider = manager["tracing"]["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        config = provider["typed_config"]
        assert config["@type"] == OTEL_TRACER and config["service_name"].startswith("envoy")
        assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == "opentelemetry_collector"
    clusters = {c["name"]: c for c in document["static_resources"]["clusters"]}
    collector = clusters["opentelemetry_collector"]
    options = collector["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]
    [endpoint] = collector["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["port_value"] == 4317  # OTLP/gRPC
    if name == "front-proxy.yaml":
        values = (CHART_DIR / "values.yaml").read_text()
        example = re.search(r"e\.g\. (http://[^\s:]+):4317", values)
        assert example, "values.yaml gives an otel.endpoint example"
        service, namespace = example.group(1).removeprefix("http://").split(".")
        assert address["address"] == f"{service}.{namespace}.svc.cluster.local"
    assert chart.values["otel"]["sampler"].startswith("parentbased_")


def test_image_reference(chart: helm.Chart, default: Rendered) -> None:
    """The image defaults to the chart's appVersion; a digest pins it instead of the tag."""
    assert default.container["image"] == f"extauthz:{chart.metadata['appVersion']}"
    digest = "sha256:" + hashlib.sha256(b"extauthz").hexdigest()
    pinned = render(
        chart, {"image": {"repository": "registry.example.com/extauthz", "digest": digest}}
    )
    assert pinned.container["image"] == f"registry.example.com/extauthz@{digest}"
