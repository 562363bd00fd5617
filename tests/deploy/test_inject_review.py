"""The injector's logic on real AdmissionReview documents: the patch applied with jsonpatch
gives a pod that Kubernetes' schemas accept (strict), whose sidecar command line the real
CLI parser accepts; idempotent, other pods untouched, bad reviews and annotations refused."""

from __future__ import annotations

import copy
import shlex
from typing import Any

import pytest

from proxy.cli import _parser, serve_args_problem
from proxy.errors import BadRequest
from proxy.inject import InjectorSettings, mutate, parse_review
from tests.deploy.support import admission_review, apply_response, deployment_pod, validate

SETTINGS = InjectorSettings(
    image="ghcr.io/dbproxy/dbproxy:0.1.0",
    collector_url="http://dbproxy-collector.dbproxy.svc:8710",
    check_args=serve_args_problem,
)
OPT_IN = {"dbproxy.io/inject": "true"}


def inject(pod: dict[str, Any], settings: InjectorSettings = SETTINGS) -> dict[str, Any]:
    """The review answered and its patch applied; the patched pod validated strictly."""
    review = admission_review(pod)
    answer = mutate(review, settings)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == review["request"]["uid"]
    patched = apply_response(pod, answer)
    validate(patched)
    return {"answer": answer["response"], "pod": patched}


def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    found = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "dbproxy"
    ]
    assert len(found) == 1
    return found[0]


def test_opted_in_pod_gets_a_native_sidecar_first_among_init_containers() -> None:
    pod = deployment_pod(OPT_IN, init_containers=True)
    out = inject(pod)
    assert out["answer"]["allowed"] is True
    assert out["answer"]["patchType"] == "JSONPatch"
    spec = out["pod"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["dbproxy", "migrate"]
    assert [c["name"] for c in spec["containers"]] == ["app"]
    side = spec["initContainers"][0]
    assert side["restartPolicy"] == "Always"
    assert side["image"] == SETTINGS.image
    # the service from app.kubernetes.io/name; the real parser accepts the command line
    args = _parser().parse_args(side["args"])
    assert (args.command, args.service, args.host, args.port) == (
        "serve",
        "users",
        "127.0.0.1",
        8700,
    )
    assert args.policies == "/etc/dbproxy/policies"
    assert args.collector == SETTINGS.collector_url
    assert args.database is None  # the URL comes from the Secret, never the pod spec
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in side["env"]}
    assert env["DBPROXY_DATABASE_URL"] == {"name": "dbproxy-users", "key": "database-url"}
    assert env["DBPROXY_COLLECTOR_TOKEN"]["optional"] is True
    assert all("value" not in e for e in side["env"])
    ctx = side["securityContext"]
    assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
    assert "/api/db/health" in " ".join(side["readinessProbe"]["exec"]["command"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dbproxy-policies"]["configMap"] == {"name": "dbproxy-policies-users"}
    assert "kube-api-access-x7k2p" in volumes  # kept
    mounts = {m["name"]: m for m in side["volumeMounts"]}
    assert mounts["dbproxy-policies"]["readOnly"] is True
    assert "warnings" not in out["answer"]


def test_absent_arrays_are_created_not_appended_to() -> None:
    pod = deployment_pod(OPT_IN, volumes=False, init_containers=False)
    assert "volumes" not in pod["spec"] and "initContainers" not in pod["spec"]
    out = inject(pod)
    paths = {op["path"] for op in _ops(out["answer"])}
    assert paths == {"/spec/initContainers", "/spec/volumes"}
    assert [v["name"] for v in out["pod"]["spec"]["volumes"]] == ["dbproxy-policies", "dbproxy-tmp"]


def _ops(response: dict[str, Any]) -> list[dict[str, Any]]:
    import base64
    import json

    return json.loads(base64.b64decode(response["patch"]))  # type: ignore[no-any-return]


def test_annotations_set_service_port_resources_log_level_and_extra_args() -> None:
    pod = deployment_pod(
        {
            **OPT_IN,
            "dbproxy.io/service": "billing",
            "dbproxy.io/port": "9700",
            "dbproxy.io/cpu": "250m",
            "dbproxy.io/cpu-limit": "1",
            "dbproxy.io/memory": "256Mi",
            "dbproxy.io/log-level": "debug",
            "dbproxy.io/extra-args": "--no-coalesce --max-connections 512 --redis redis://r:6379/0",
            "dbproxy.io/database-secret": "billing-db",
        }
    )
    side = sidecar(inject(pod)["pod"])
    args = _parser().parse_args(side["args"])
    assert (args.service, args.port, args.log_level) == ("billing", 9700, "DEBUG")
    assert args.coalesce is False and args.max_connections == 512
    assert args.redis == "redis://r:6379/0"
    assert side["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert "9700" in side["readinessProbe"]["exec"]["command"][2]
    assert side["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "billing-db"


def test_service_falls_back_to_the_app_label() -> None:
    pod = deployment_pod(OPT_IN, labels={"app": "analytics"})
    assert _parser().parse_args(sidecar(inject(pod)["pod"])["args"]).service == "analytics"


def test_fallback_for_older_clusters_is_a_regular_container() -> None:
    by_annotation = inject(deployment_pod({**OPT_IN, "dbproxy.io/native-sidecar": "false"}))
    by_flag = inject(deployment_pod(OPT_IN), InjectorSettings(image="dbproxy:1", native=False))
    for out in (by_annotation, by_flag):
        spec = out["pod"]["spec"]
        assert "initContainers" not in spec
        assert [c["name"] for c in spec["containers"]] == ["app", "dbproxy"]
        assert "restartPolicy" not in spec["containers"][1]
    # and a pod may opt back in to the native sidecar where the flag turned it off
    back = inject(
        deployment_pod({**OPT_IN, "dbproxy.io/native-sidecar": "true"}),
        InjectorSettings(image="dbproxy:1", native=False),
    )
    assert back["pod"]["spec"]["initContainers"][0]["restartPolicy"] == "Always"


def test_injecting_twice_changes_nothing_the_second_time() -> None:
    once = inject(deployment_pod(OPT_IN))["pod"]
    again = inject(once)
    assert again["answer"]["allowed"] is True
    assert "patch" not in again["answer"]
    assert again["pod"] == once


@pytest.mark.parametrize(
    "annotations",
    [{}, {"dbproxy.io/inject": "false"}, {"other.io/inject": "true"}],
)
def test_pods_that_do_not_opt_in_are_untouched(annotations: dict[str, str]) -> None:
    pod = deployment_pod(annotations)
    out = inject(pod)
    assert out["answer"]["allowed"] is True
    assert "patch" not in out["answer"] and "patchType" not in out["answer"]
    assert out["pod"] == pod


def test_unknown_dbproxy_annotations_are_warnings() -> None:
    pod = deployment_pod({**OPT_IN, "dbproxy.io/servcie": "users", "dbproxy.io/replicas": "2"})
    out = inject(pod)
    assert out["answer"]["allowed"] is True and "patch" in out["answer"]
    warnings = out["answer"]["warnings"]
    assert len(warnings) == 2
    assert any("dbproxy.io/servcie" in w for w in warnings)
    assert any("dbproxy.io/replicas" in w for w in warnings)
    maybe = inject(deployment_pod({"dbproxy.io/inject": "yes"}))["answer"]
    assert "patch" not in maybe and "not injected" in maybe["warnings"][0]


@pytest.mark.parametrize(
    ("annotations", "labels", "needle"),
    [
        ({"dbproxy.io/port": "http"}, None, "dbproxy.io/port"),
        ({"dbproxy.io/port": "80"}, None, "dbproxy.io/port"),
        ({"dbproxy.io/memory": "lots"}, None, "dbproxy.io/memory"),
        ({"dbproxy.io/service": "Billing_Svc"}, None, "not a DNS label"),
        ({}, {"tier": "web"}, "no service name"),
        ({"dbproxy.io/extra-args": "--database postgresql://u:p@h/db"}, None, "--database"),
        ({"dbproxy.io/extra-args": "--datab=postgresql://h/db"}, None, "--datab"),
        ({"dbproxy.io/extra-args": "--service other"}, None, "--service"),
        ({"dbproxy.io/extra-args": "--no-such-flag"}, None, "unrecognized arguments"),
        ({"dbproxy.io/extra-args": "--workers"}, None, "--workers"),
        ({"dbproxy.io/extra-args": "--redis-timeout soon"}, None, "invalid float"),
        ({"dbproxy.io/extra-args": "'unclosed"}, None, "shell line"),
        ({"dbproxy.io/log-level": "loud"}, None, "must be one of"),
        ({"dbproxy.io/native-sidecar": "maybe"}, None, "dbproxy.io/native-sidecar"),
    ],
)
def test_an_opt_in_that_cannot_be_served_is_denied_with_the_reason(
    annotations: dict[str, str], labels: dict[str, str] | None, needle: str
) -> None:
    pod = deployment_pod({**OPT_IN, **annotations}, labels=labels)
    response = mutate(admission_review(pod), SETTINGS)["response"]
    assert response["allowed"] is False
    assert "patch" not in response
    assert response["status"]["code"] == 400
    assert needle in response["status"]["message"]
    assert "postgresql://u:p" not in response["status"]["message"]  # no secret echoed


def test_a_port_clash_with_the_app_is_a_warning() -> None:
    out = inject(deployment_pod({**OPT_IN, "dbproxy.io/port": "8080"}))
    assert "patch" in out["answer"]
    assert any("8080" in w for w in out["answer"]["warnings"])


def test_other_kinds_and_operations_are_allowed_as_they_are() -> None:
    pod = deployment_pod(OPT_IN)
    for review in (
        admission_review(pod, operation="UPDATE"),
        admission_review(None, kind="Service"),
    ):
        response = mutate(review, SETTINGS)["response"]
        assert response == {"uid": review["request"]["uid"], "allowed": True}


def _broken(change: str) -> Any:
    review = admission_review(deployment_pod(OPT_IN))
    if change == "not-an-object":
        return [review]
    if change == "v1beta1":
        review["apiVersion"] = "admission.k8s.io/v1beta1"
    elif change == "no-request":
        del review["request"]
    elif change == "no-uid":
        del review["request"]["uid"]
    elif change == "uid-number":
        review["request"]["uid"] = 7
    elif change == "no-kind":
        del review["request"]["kind"]
    elif change == "no-object":
        review["request"]["object"] = None
    elif change == "no-spec":
        del review["request"]["object"]["spec"]
    elif change == "no-operation":
        del review["request"]["operation"]
    return review


@pytest.mark.parametrize(
    "change",
    [
        "not-an-object",
        "v1beta1",
        "no-request",
        "no-uid",
        "uid-number",
        "no-kind",
        "no-object",
        "no-spec",
        "no-operation",
    ],
)
def test_malformed_reviews_are_bad_requests(change: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_review(_broken(change))
    assert caught.value.code == "invalid_admission_review"
    assert caught.value.status == 400


def test_the_patch_never_changes_the_app_containers() -> None:
    pod = deployment_pod(OPT_IN, init_containers=True)
    before = copy.deepcopy(pod["spec"]["containers"])
    out = inject(pod)
    assert out["pod"]["spec"]["containers"] == before
    assert out["pod"]["spec"]["initContainers"][1] == pod["spec"]["initContainers"][0]
    assert all(not op["path"].startswith("/spec/containers") for op in _ops(out["answer"]))


def test_the_extra_args_quote_like_a_shell() -> None:
    pod = deployment_pod({**OPT_IN, "dbproxy.io/extra-args": shlex.join(["--idle-timeout", "30"])})
    assert _parser().parse_args(sidecar(inject(pod)["pod"])["args"]).idle_timeout == 30.0
