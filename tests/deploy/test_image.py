"""The image recipe (no Docker engine here): the Dockerfile parses, runs as a non-root user
from a slim base with ``dbproxy`` as entry point, copies only what .dockerignore lets in;
and what it copies installs in a fresh venv whose ``dbproxy`` entry point runs."""

from __future__ import annotations

import fnmatch
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from proxy.inject.patch import SIDECAR_UID
from tests.deploy.support import ROOT
from tests.deploy.test_chart import pod_specs, render

DOCKERFILE = ROOT / "Dockerfile"


def parsed() -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))


def instructions(kind: str) -> list[str]:
    return [i["value"] for i in parsed().structure if i["instruction"] == kind]


def ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in patterns)


def copied_sources() -> list[str]:
    """What the build context must provide (COPY without --from)."""
    sources = []
    for value in instructions("COPY"):
        if value.startswith("--from"):
            continue
        *paths, _dest = value.split()
        sources.extend(paths)
    return sources


def test_the_dockerfile_parses_into_a_slim_non_root_image() -> None:
    bases = instructions("FROM")
    assert len(bases) == 2
    assert all("slim" in base for base in bases)
    assert parsed().baseimage.startswith("python:3.12-slim")
    (user,) = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can check it
    # the uid the chart and the injected sidecar run as
    assert int(uid) == 10001
    assert int(uid) == SIDECAR_UID
    for _, spec in pod_specs(render()):
        assert spec["securityContext"]["runAsUser"] == int(uid)
    assert instructions("ENTRYPOINT") == ['["dbproxy"]']
    assert any("pip install ." in run for run in instructions("RUN"))


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    sources = copied_sources()
    assert set(sources) == {"pyproject.toml", "README.md", "proxy"}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source), source
    for heavy in (".venv", ".git", "tests", "benchmarks"):
        assert ignored(heavy), heavy


def test_the_chart_image_tag_is_the_package_version() -> None:
    chart = yaml.safe_load((ROOT / "deploy/helm/dbproxy/Chart.yaml").read_text())
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version  # image.tag defaults to the appVersion


@pytest.mark.e2e
def test_what_the_image_copies_installs_and_its_entry_point_runs(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for source in copied_sources():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, context / source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    entry = venv / "bin" / "dbproxy"
    out = subprocess.run([str(entry), "--help"], capture_output=True, text=True, check=True)
    assert "{serve,policy,collector,migrate,injector}" in out.stdout
    check = subprocess.run(
        [str(entry), "policy", "check", str(ROOT / "policies")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    injector = subprocess.run(
        [str(entry), "injector", "--help"], capture_output=True, text=True, check=True
    )
    assert "--sidecar-image" in injector.stdout
