"""Pure: an ``admission.k8s.io/v1`` AdmissionReview checked and answered (uid, allowed,
base64 JSONPatch, warnings); a malformed review is a BadRequest."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from proxy.errors import BadRequest
from proxy.inject.patch import InjectorSettings, Plan, plan

API_VERSION: Final = "admission.k8s.io/v1"
_CODE: Final = "invalid_admission_review"
_MAX_WARNINGS: Final = 20  # the API server keeps warnings short
_MAX_WARNING_CHARS: Final = 240


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """The parts of ``request`` the injector looks at."""

    uid: str
    kind: str  # request.kind.kind: "Pod" for the pods the webhook is registered for
    operation: str
    namespace: str
    obj: Mapping[str, Any]


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code=_CODE)


def parse_review(data: object) -> AdmissionRequest:
    """The request of an AdmissionReview v1, or BadRequest naming what is wrong."""
    if not isinstance(data, Mapping):
        raise _bad("the body must be an AdmissionReview object")
    if data.get("apiVersion") != API_VERSION or data.get("kind") != "AdmissionReview":
        raise _bad(f"expected apiVersion {API_VERSION} and kind AdmissionReview")
    request = data.get("request")
    if not isinstance(request, Mapping):
        raise _bad("request is required and must be an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > 128:
        raise _bad("request.uid is required and must be a non-empty string")
    kind = request.get("kind")
    if not isinstance(kind, Mapping) or not isinstance(kind.get("kind"), str):
        raise _bad("request.kind must be an object with a kind")
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise _bad("request.operation must be a string")
    obj = request.get("object")
    pod_create = kind["kind"] == "Pod" and operation == "CREATE"
    if pod_create and not (isinstance(obj, Mapping) and isinstance(obj.get("spec"), Mapping)):
        raise _bad("request.object must be a Pod with a spec")
    namespace = request.get("namespace")
    return AdmissionRequest(
        uid=uid,
        kind=kind["kind"],
        operation=operation,
        namespace=namespace if isinstance(namespace, str) else "",
        obj=obj if isinstance(obj, Mapping) else {},
    )


def review_response(uid: str, answer: Plan | None = None) -> dict[str, Any]:
    """The AdmissionReview answering ``uid``: allowed unless ``answer`` denies; the patch
    (when there are operations) as base64 JSONPatch."""
    answer = answer or Plan()
    response: dict[str, Any] = {"uid": uid, "allowed": answer.denied is None}
    if answer.denied is not None:
        response["status"] = {"code": 400, "reason": "BadRequest", "message": answer.denied}
    elif answer.ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(answer.ops)).decode("ascii")
    if answer.warnings:
        response["warnings"] = [w[:_MAX_WARNING_CHARS] for w in answer.warnings[:_MAX_WARNINGS]]
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def mutate(data: object, settings: InjectorSettings) -> dict[str, Any]:
    """One review answered: pods being created get the sidecar when they opt in; any other
    request is allowed as it is."""
    request = parse_review(data)
    if request.kind != "Pod" or request.operation != "CREATE":
        return review_response(request.uid)
    return review_response(request.uid, plan(request.obj, settings))
