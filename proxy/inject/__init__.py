"""The sidecar injector's logic: AdmissionReview in, AdmissionReview (with a JSONPatch) out."""

from proxy.inject.patch import ANNOTATION_PREFIX, CONTAINER_NAME, InjectorSettings, Plan, plan
from proxy.inject.review import AdmissionRequest, mutate, parse_review, review_response

__all__ = [
    "ANNOTATION_PREFIX",
    "CONTAINER_NAME",
    "AdmissionRequest",
    "InjectorSettings",
    "Plan",
    "mutate",
    "parse_review",
    "plan",
    "review_response",
]
