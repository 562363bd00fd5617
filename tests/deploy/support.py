"""What the deployment tests share: AdmissionReview documents of real pods, a CA and a
server certificate made at test time, and strict Kubernetes schema validation."""

from __future__ import annotations

import base64
import copy
import datetime
import ipaddress
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

K8S_VERSION = "1.31"  # native sidecars are on by default since 1.29

ROOT = Path(__file__).resolve().parents[2]


def validate(obj: dict[str, Any]) -> None:
    """Strict validation against the Kubernetes schemas (unknown fields are errors)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def deployment_pod(
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    *,
    volumes: bool = True,
    init_containers: bool = False,
) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it and the API server hands it to webhooks: no name
    yet (generateName), the service-account token volume already added."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "users-7d9c6b5f8-",
            "namespace": "apps",
            "labels": {"app.kubernetes.io/name": "users", "pod-template-hash": "7d9c6b5f8"},
            "annotations": annotations or {},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "users-7d9c6b5f8",
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/users:2.4.1",
                    "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                    "env": [{"name": "DBPROXY_URL", "value": "http://127.0.0.1:8700"}],
                    "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
        },
    }
    if labels is not None:
        pod["metadata"]["labels"] = labels
    if volumes:
        pod["spec"]["volumes"] = [
            {
                "name": "kube-api-access-x7k2p",
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                    ],
                },
            }
        ]
        pod["spec"]["containers"][0]["volumeMounts"] = [
            {
                "name": "kube-api-access-x7k2p",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ]
    if init_containers:
        pod["spec"]["initContainers"] = [
            {"name": "migrate", "image": "registry.example/users:2.4.1", "args": ["migrate"]}
        ]
    return pod


def admission_review(
    pod: dict[str, Any] | None, *, operation: str = "CREATE", kind: str = "Pod"
) -> dict[str, Any]:
    """An AdmissionReview v1 as the API server sends it."""
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": kind},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "apps",
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": str(uuid.uuid4()),
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def apply_response(pod: dict[str, Any], review: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it after this webhook's answer."""
    response = review["response"]
    if "patch" not in response:
        return copy.deepcopy(pod)
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops, in_place=False)  # type: ignore[no-any-return]


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_certificates(directory: Path, common: str = "localhost") -> Certificates:
    """A CA and a server certificate it signed (for localhost and 127.0.0.1), as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = _key(), _key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("dbproxy-injector-test-ca"))
        .issuer_name(_name("dbproxy-injector-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(common), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = Certificates(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out
