"""The chart, with Helm's own engine (helm-python-sdk, no helm binary): strict lint, and every
rendered object validated strictly against Kubernetes' schemas, for the default values and a
full example; the webhook, TLS, probes, security contexts and policies checked."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from proxy.cli import _parser
from proxy.inject import InjectorSettings
from proxy.policy import check_directory
from tests.deploy.support import K8S_VERSION, ROOT, validate

CHART = ROOT / "deploy" / "helm" / "dbproxy"
FULL = ROOT / "deploy" / "helm" / "examples" / "full-values.yaml"
RELEASE, NAMESPACE = "dbproxy", "dbproxy"
# Custom resources kubernetes-validate has no schema for (cert-manager, Prometheus operator)
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def full_values() -> dict[str, Any]:
    return yaml.safe_load(FULL.read_text())  # type: ignore[no-any-return]


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt aside)."""
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    with helm_python.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return manifests[f"{CHART.name}/templates/NOTES.txt"]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)}"
    return found[0]


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in by_kind(objects, "Deployment"):
        yield o["metadata"]["name"], o["spec"]["template"]["spec"]


VALUE_SETS = {"default": None, "full": "full"}


@pytest.fixture(params=sorted(VALUE_SETS))
def values(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    return full_values() if request.param == "full" else None


def test_lint_is_clean_in_strict_mode(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(
        CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}.0"
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_rendered_object_validates_strictly(values: dict[str, Any] | None) -> None:
    objects = render(values)
    assert objects
    custom = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            custom.append(obj)
            continue
        validate(obj)
    for obj in custom:  # no schema here: at least a name, a namespace and a spec
        assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == NAMESPACE
        assert isinstance(obj["spec"], dict) and obj["spec"]
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "MutatingWebhookConfiguration",
        "ConfigMap",
    } <= kinds


def test_defaults_render_collector_injector_generated_tls_and_dashboard() -> None:
    objects = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("ConfigMap", "dbproxy-dashboard"),
        ("Deployment", "dbproxy-collector"),
        ("Deployment", "dbproxy-injector"),
        ("MutatingWebhookConfiguration", "dbproxy-injector"),
        ("PodDisruptionBudget", "dbproxy-injector"),  # 2 replicas: keep one during drains
        ("Secret", "dbproxy-injector-tls"),
        ("Service", "dbproxy-collector"),
        ("Service", "dbproxy-injector"),
        ("ServiceAccount", "dbproxy-collector"),
        ("ServiceAccount", "dbproxy-injector"),
    ]


def test_the_webhook_registration() -> None:
    (config,) = by_kind(render(), "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Ignore"
    assert 1 <= hook["timeoutSeconds"] <= 10
    (rule,) = hook["rules"]
    assert rule["operations"] == ["CREATE"] and rule["resources"] == ["pods"]
    assert rule["apiGroups"] == [""] and rule["apiVersions"] == ["v1"]
    service = hook["clientConfig"]["service"]
    assert (service["name"], service["namespace"], service["path"]) == (
        "dbproxy-injector",
        NAMESPACE,
        "/mutate",
    )
    (ns_rule,) = hook["namespaceSelector"]["matchExpressions"]
    assert ns_rule["key"] == "kubernetes.io/metadata.name" and ns_rule["operator"] == "NotIn"
    assert set(ns_rule["values"]) == {"kube-system", NAMESPACE}
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "dbproxy.io/component", "operator": "DoesNotExist"}
    ]
    # the chart's own pods carry that label, so the webhook never sees them
    for deployment in by_kind(render(), "Deployment"):
        assert "dbproxy.io/component" in deployment["spec"]["template"]["metadata"]["labels"]


def test_the_full_example_webhook_takes_its_values() -> None:
    objects = render(full_values())
    (config,) = by_kind(objects, "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 3
    names, extra = hook["namespaceSelector"]["matchExpressions"]
    assert set(names["values"]) == {"kube-system", NAMESPACE, "monitoring", "cert-manager"}
    assert extra == {"key": "dbproxy-injection", "operator": "In", "values": ["enabled"]}
    # cert-manager: no chart-made Secret, the CA injected from the Certificate
    assert "caBundle" not in hook["clientConfig"]
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/dbproxy-injector"
    )
    assert not by_kind(objects, "Secret")
    cert = one(objects, "Certificate", "dbproxy-injector")
    assert cert["spec"]["secretName"] == "dbproxy-injector-tls"
    assert f"dbproxy-injector.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "platform-ca", "kind": "ClusterIssuer"}
    assert not by_kind(objects, "Issuer")  # an issuer of the cluster's was named
    own = render({"injector": {"tls": {"certManager": {"enabled": True}}}})
    assert one(own, "Issuer", "dbproxy-injector-selfsigned")["spec"] == {"selfSigned": {}}


def test_the_generated_certificate_is_signed_by_the_registered_ca() -> None:
    objects = render()
    secret = one(objects, "Secret", "dbproxy-injector-tls")
    (config,) = by_kind(objects, "MutatingWebhookConfiguration")
    ca_pem = base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"])
    assert base64.b64decode(secret["data"]["ca.crt"]) == ca_pem
    ca = x509.load_pem_x509_certificate(ca_pem)
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    assert cert.issuer == ca.subject
    key = ca.public_key()
    assert isinstance(key, rsa.RSAPublicKey)  # Helm's genCA makes RSA keys
    assert cert.signature_hash_algorithm is not None
    key.verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"dbproxy-injector.{NAMESPACE}.svc" in names.get_values_for_type(x509.DNSName)
    assert secret["type"] == "kubernetes.io/tls"


def test_every_container_has_probes_and_a_non_root_read_only_context(
    values: dict[str, Any] | None,
) -> None:
    for name, spec in pod_specs(render(values)):
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] != 0, name
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert probe in container, (name, probe)
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["requests"]


def test_process_arguments_parse_with_the_real_cli(values: dict[str, Any] | None) -> None:
    objects = render(values)
    collector = one(objects, "Deployment", "dbproxy-collector")["spec"]["template"]["spec"]
    injector = one(objects, "Deployment", "dbproxy-injector")["spec"]["template"]["spec"]
    c_args = _parser().parse_args(collector["containers"][0]["args"])
    i_args = _parser().parse_args(injector["containers"][0]["args"])
    assert (c_args.command, c_args.host, c_args.port) == ("collector", "0.0.0.0", 8710)
    assert c_args.database is None  # from the Secret, never in the spec
    env = collector["containers"][0]["env"][0]
    assert env["name"] == "DBPROXY_DATABASE_URL" and "secretKeyRef" in env["valueFrom"]
    assert i_args.command == "injector"
    assert i_args.collector == f"http://dbproxy-collector.{NAMESPACE}.svc:8710"
    image = injector["containers"][0]["image"]
    assert i_args.sidecar_image == image  # the sidecar runs the chart's image
    assert image.endswith(":0.1.0")  # the tag: values, else the chart's appVersion
    # the certificate files are where the TLS Secret is mounted
    mount = {m["name"]: m["mountPath"] for m in injector["containers"][0]["volumeMounts"]}
    assert (
        i_args.tls_cert == mount["tls"] + "/tls.crt" and i_args.tls_key == mount["tls"] + "/tls.key"
    )
    service = one(objects, "Service", "dbproxy-injector")
    assert service["spec"]["ports"][0]["port"] == 443


def test_policies_one_configmap_per_service_and_namespace_from_set_file(tmp_path: Path) -> None:
    values = helm_python.parse_set_file(
        f"policies.users.content={ROOT / 'policies' / 'users.yaml'},"
        f"policies.billing.content={ROOT / 'policies' / 'billing.yaml'}"
    )
    values["policies"]["users"]["namespaces"] = ["apps", "apps-staging"]
    values["policies"]["billing"]["namespaces"] = ["payments"]
    maps = [
        o
        for o in render(values)
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("dbproxy.io/service")
    ]
    placed = sorted((m["metadata"]["namespace"], m["metadata"]["name"]) for m in maps)
    prefix = InjectorSettings(image="x").configmap_prefix  # the name the injector mounts
    assert placed == [
        ("apps", prefix + "users"),
        ("apps-staging", prefix + "users"),
        ("payments", prefix + "billing"),
    ]
    for m in maps:
        service = m["metadata"]["labels"]["dbproxy.io/service"]
        ((key, content),) = m["data"].items()
        assert key == f"{service}.yaml"
        assert content == (ROOT / "policies" / key).read_text()
        directory = tmp_path / m["metadata"]["namespace"] / service
        directory.mkdir(parents=True)
        (directory / key).write_text(content)
        ok, report = check_directory(str(directory))  # what the sidecar will load
        assert ok, report


def test_the_dashboard_configmap_is_the_repository_dashboard() -> None:
    source = ROOT / "deploy" / "grafana" / "dbproxy-dashboard.json"
    assert (CHART / "dashboards" / "dbproxy.json").read_bytes() == source.read_bytes()
    dashboard = one(render(), "ConfigMap", "dbproxy-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["dbproxy.json"]) == json.loads(source.read_text())
    assert not [
        o for o in render({"dashboard": {"enabled": False}}) if "dashboard" in o["metadata"]["name"]
    ]


def test_the_service_monitor_scrapes_the_collector() -> None:
    objects = render(full_values())
    monitor = one(objects, "ServiceMonitor", "dbproxy-collector")
    service = one(objects, "Service", "dbproxy-collector")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not by_kind(render(), "ServiceMonitor")  # off by default


def test_collector_database_secret_made_only_when_a_url_is_given() -> None:
    url = "postgresql://collector:pw@db.example:5432/fleet"
    objects = render({"collector": {"database": {"url": url}}})
    secret = one(objects, "Secret", "dbproxy-collector-db")
    assert secret["stringData"] == {"url": url}
    env = one(objects, "Deployment", "dbproxy-collector")["spec"]["template"]["spec"]["containers"][
        0
    ]["env"][0]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "dbproxy-collector-db", "key": "url"}
    assert url not in json.dumps(one(objects, "Deployment", "dbproxy-collector"))


def test_a_single_injector_has_no_disruption_budget() -> None:
    assert not by_kind(render({"injector": {"replicas": 1}}), "PodDisruptionBudget")


def test_the_fallback_sidecar_flag_reaches_the_injector() -> None:
    objects = render({"injector": {"sidecar": {"native": False}}})
    spec = one(objects, "Deployment", "dbproxy-injector")["spec"]["template"]["spec"]
    assert _parser().parse_args(spec["containers"][0]["args"]).native is False


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"injector": {"webhook": {"failurePolicy": "Sometimes"}}}, "failurePolicy"),
        ({"injector": {"webhook": {"timeoutSeconds": 60}}}, "timeoutSeconds"),
        ({"injector": {"sidecar": {"memory": "lots"}}}, "memory"),
        ({"policies": {"Bad_Name": {"namespaces": ["a"], "content": "x"}}}, "Bad_Name"),
        ({"policies": {"users": {"content": "service: users"}}}, "namespaces"),
        ({"collector": {"database": {"url": "mysql://h/db"}}}, "url"),
        ({"replicaCount": 3}, "replicaCount"),
    ],
)
def test_the_values_schema_rejects_bad_values(bad: dict[str, Any], where: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as caught:
        render(bad)
    assert where in str(caught.value)


def test_notes_say_how_to_opt_a_workload_in() -> None:
    text = notes()
    assert 'dbproxy.io/inject: "true"' in text
    assert "dbproxy.io/service" in text
    assert "dbproxy-collector-db" in text


def test_the_chart_sidecar_defaults_are_the_injector_defaults() -> None:
    with helm_python.Chart.load(CHART) as chart:
        sidecar = chart.values["injector"]["sidecar"]
    defaults = InjectorSettings(image="x")
    assert (sidecar["port"], sidecar["cpu"], sidecar["memory"], sidecar["native"]) == (
        defaults.port,
        defaults.cpu,
        defaults.memory,
        defaults.native,
    )
    assert sidecar["logLevel"] == defaults.log_level
