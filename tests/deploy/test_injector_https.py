"""The real ``dbproxy injector`` process over HTTPS (a CA and certificate made at test time):
reviews answered with a patch that applies and validates, 400s in the error envelope,
plain HTTP and untrusted clients refused, a renewed certificate picked up."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import _parser
from tests.deploy.support import (
    Certificates,
    admission_review,
    apply_response,
    deployment_pod,
    make_certificates,
    validate,
)

pytestmark = pytest.mark.e2e

IMAGE = "ghcr.io/dbproxy/dbproxy:0.1.0"


def port_in_range(low: int = 18400, high: int = 18499) -> int:
    """A free port of this suite's range."""
    for port in range(low, high + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in the range")


@dataclass
class Injector:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    certs: Certificates

    def context(self, ca: Path | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(ca or self.certs.ca))

    def post(self, body: bytes, ca: Path | None = None) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url + "/mutate",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.context(ca)) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture
def injector(tmp_path: Path) -> Iterator[Injector]:
    certs = make_certificates(tmp_path)
    port = port_in_range()
    log = tmp_path / "injector.log"
    cmd = [
        sys.executable,
        "-m",
        "proxy.cli",
        "injector",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tls-cert",
        str(certs.cert),
        "--tls-key",
        str(certs.key),
        "--sidecar-image",
        IMAGE,
        "--collector",
        "http://dbproxy-collector.dbproxy.svc:8710",
        "--cert-reload-interval",
        "0.2",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Injector(f"https://127.0.0.1:{port}", proc, log, certs)
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(
                server.url + "/healthz", timeout=1, context=server.context()
            ) as r:
                assert json.loads(r.read()) == {"status": "ok"}
                break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    yield server
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_review_over_https_gets_a_patch_that_applies_and_validates(injector: Injector) -> None:
    pod = deployment_pod({"dbproxy.io/inject": "true", "dbproxy.io/service": "billing"})
    review = admission_review(pod)
    status, answer = injector.post(json.dumps(review).encode())
    assert status == 200
    assert answer["response"]["uid"] == review["request"]["uid"]
    assert answer["response"]["allowed"] is True
    patched = apply_response(pod, answer)
    validate(patched)
    side = patched["spec"]["initContainers"][0]
    assert side["image"] == IMAGE
    args = _parser().parse_args(side["args"])
    assert (args.service, args.collector) == (
        "billing",
        "http://dbproxy-collector.dbproxy.svc:8710",
    )


def test_a_denied_opt_in_is_a_200_review_that_says_why(injector: Injector) -> None:
    pod = deployment_pod({"dbproxy.io/inject": "true", "dbproxy.io/extra-args": "--bogus"})
    status, answer = injector.post(json.dumps(admission_review(pod)).encode())
    assert status == 200
    assert answer["response"]["allowed"] is False
    assert "unrecognized arguments: --bogus" in answer["response"]["status"]["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "missing_body"),
        (
            json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
            "invalid_admission_review",
        ),
        (json.dumps({"kind": "Pod"}).encode(), "invalid_admission_review"),
    ],
)
def test_malformed_reviews_are_400_in_the_envelope(
    injector: Injector, body: bytes, code: str
) -> None:
    status, answer = injector.post(body)
    assert status == 400
    assert answer["error"]["code"] == code
    assert answer["error"]["request_id"]


def test_plain_http_and_untrusted_clients_get_nothing(injector: Injector, tmp_path: Path) -> None:
    plain = injector.url.replace("https://", "http://") + "/healthz"
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)) as caught:
        urllib.request.urlopen(plain, timeout=3).read()
    assert not isinstance(caught.value, urllib.error.HTTPError)
    (tmp_path / "other").mkdir()
    other = make_certificates(tmp_path / "other")
    with pytest.raises(urllib.error.URLError) as refused:
        injector.post(b"{}", ca=other.ca)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_a_renewed_certificate_is_served_without_a_restart(
    injector: Injector, tmp_path: Path
) -> None:
    renewed_dir = tmp_path / "renewed"
    renewed_dir.mkdir()
    renewed = make_certificates(renewed_dir)
    # as the kubelet updates a mounted Secret: new files swapped in under the same names
    for source, target in ((renewed.key, injector.certs.key), (renewed.cert, injector.certs.cert)):
        tmp = target.with_suffix(".new")
        tmp.write_bytes(source.read_bytes())
        tmp.replace(target)
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _ = injector.post(b"{}", ca=renewed.ca)
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline, injector.log.read_text()
            time.sleep(0.1)
    assert status == 400  # served, with the new certificate
    assert "certificate reloaded" in injector.log.read_text()


def test_unreadable_certificates_stop_the_injector_with_the_reason(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    mismatched = make_certificates(other)
    for cert, key in ((tmp_path / "missing.crt", certs.key), (certs.cert, mismatched.key)):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "injector",
                "--port",
                str(port_in_range()),
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--sidecar-image",
                IMAGE,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert "cannot load --tls-cert/--tls-key" in done.stderr
