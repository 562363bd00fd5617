"""Pure: a pod and the injector's settings → the JSONPatch that adds the dbproxy sidecar
(the annotations read, every problem and unknown annotation reported)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

ANNOTATION_PREFIX: Final = "dbproxy.io/"
CONTAINER_NAME: Final = "dbproxy"
POLICIES_VOLUME: Final = "dbproxy-policies"
TMP_VOLUME: Final = "dbproxy-tmp"
DATABASE_URL_KEY: Final = "database-url"  # keys of the service's Secret
COLLECTOR_TOKEN_KEY: Final = "collector-token"  # noqa: S105 (a key name, no secret)
SIDECAR_UID: Final = 10001  # the Dockerfile's user

INJECT: Final = ANNOTATION_PREFIX + "inject"
SERVICE: Final = ANNOTATION_PREFIX + "service"
PORT: Final = ANNOTATION_PREFIX + "port"
CPU: Final = ANNOTATION_PREFIX + "cpu"
CPU_LIMIT: Final = ANNOTATION_PREFIX + "cpu-limit"
MEMORY: Final = ANNOTATION_PREFIX + "memory"
LOG_LEVEL: Final = ANNOTATION_PREFIX + "log-level"
EXTRA_ARGS: Final = ANNOTATION_PREFIX + "extra-args"
DATABASE_SECRET: Final = ANNOTATION_PREFIX + "database-secret"
POLICIES_CONFIGMAP: Final = ANNOTATION_PREFIX + "policies-configmap"
NATIVE_SIDECAR: Final = ANNOTATION_PREFIX + "native-sidecar"
KNOWN: Final = frozenset(
    {
        INJECT,
        SERVICE,
        PORT,
        CPU,
        CPU_LIMIT,
        MEMORY,
        LOG_LEVEL,
        EXTRA_ARGS,
        DATABASE_SECRET,
        POLICIES_CONFIGMAP,
        NATIVE_SIDECAR,
    }
)

# A service name is a DNS label: it names the ConfigMap and Secret, and it satisfies the
# policy files' own pattern ([A-Za-z][A-Za-z0-9_-]{0,62}).
_SERVICE_RE: Final = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_OBJECT_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_QUANTITY_RE: Final = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
# `serve` flags the injector sets itself (or that would put a secret in the pod spec): an
# extra argument may not be one of them nor an abbreviation argparse would expand to one.
MANAGED_FLAGS: Final = (
    "--host",
    "--port",
    "--service",
    "--policies",
    "--collector",
    "--database",
    "--config",
    "--data-dir",
    "--workers",
    "--listen-fds",
    "--log-level",
    "--help",
)

ArgsCheck = Callable[[Sequence[str]], "str | None"]  # the sidecar's argv → a problem or None


@dataclass(frozen=True, slots=True)
class InjectorSettings:
    """What ``dbproxy injector`` injects with (the defaults a pod's annotations override)."""

    image: str
    collector_url: str | None = None
    pull_policy: str = "IfNotPresent"
    port: int = 8700
    cpu: str = "100m"
    memory: str = "128Mi"
    log_level: str = "info"
    native: bool = True  # an init container with restartPolicy Always (Kubernetes >= 1.29)
    policies_mount: str = "/etc/dbproxy/policies"
    configmap_prefix: str = "dbproxy-policies-"
    secret_prefix: str = "dbproxy-"  # noqa: S105 (a name prefix, no secret)
    check_args: ArgsCheck | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Options:
    """One pod's sidecar, as its annotations (and the defaults) say."""

    service: str
    port: int
    cpu: str
    cpu_limit: str | None
    memory: str
    log_level: str
    extra_args: tuple[str, ...]
    database_secret: str
    policies_configmap: str
    native: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer for one pod: patch operations (empty: leave it as it is), warnings for
    the response, and ``denied`` (a reason) when the pod opted in but cannot be served."""

    ops: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    denied: str | None = None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _names(items: object) -> set[str]:
    if not isinstance(items, list):
        return set()
    return {str(c.get("name")) for c in items if isinstance(c, Mapping)}


def plan(pod: Mapping[str, Any], settings: InjectorSettings) -> Plan:
    """The patch for ``pod`` (a Pod object of an AdmissionReview)."""
    meta = _mapping(pod.get("metadata"))
    annotations = {str(k): str(v) for k, v in _mapping(meta.get("annotations")).items()}
    warnings = [
        f"unknown annotation {key} (ignored; known: {', '.join(sorted(KNOWN))})"
        for key in sorted(annotations)
        if key.startswith(ANNOTATION_PREFIX) and key not in KNOWN
    ]
    wanted = annotations.get(INJECT, "").strip().lower()
    if wanted != "true":
        if wanted not in ("", "false"):
            warnings.append(f'{INJECT} is {wanted[:40]!r}: not injected (use "true")')
        return Plan(warnings=warnings)
    spec = _mapping(pod.get("spec"))
    if CONTAINER_NAME in _names(spec.get("containers")) | _names(spec.get("initContainers")):
        return Plan(warnings=warnings)  # injected already (or by hand): idempotent
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels")).items()}
    problems: list[str] = []
    opts = read_options(annotations, labels, settings, problems)
    if opts is not None:
        taken = _names(spec.get("volumes")) & {POLICIES_VOLUME, TMP_VOLUME}
        problems.extend(f"the pod already has a volume named {name!r}" for name in sorted(taken))
        if settings.check_args is not None:
            problem = settings.check_args(sidecar_args(opts, settings))
            if problem:
                problems.append(f"the sidecar's arguments are not valid: {problem}")
    if problems or opts is None:
        return Plan(
            warnings=warnings, denied="dbproxy sidecar not injected: " + "; ".join(problems)
        )
    warnings.extend(_port_clashes(spec, opts.port))
    return Plan(ops=patch_ops(spec, opts, settings), warnings=warnings)


def _port_clashes(spec: Mapping[str, Any], port: int) -> list[str]:
    for c in spec.get("containers") or ():
        for p in _mapping(c).get("ports") or ():
            if _mapping(p).get("containerPort") == port:
                return [
                    f"container {_mapping(c).get('name')!r} declares port {port}, the sidecar's "
                    f"port: set {PORT} to another one"
                ]
    return []


def read_options(
    annotations: Mapping[str, str],
    labels: Mapping[str, str],
    settings: InjectorSettings,
    problems: list[str],
) -> Options | None:
    """The sidecar's options; None (with ``problems`` filled) when they cannot be had."""
    service = (
        annotations.get(SERVICE) or labels.get("app.kubernetes.io/name") or labels.get("app") or ""
    ).strip()
    if not service:
        problems.append(f"no service name: set {SERVICE} (or the label app.kubernetes.io/name)")
    elif not _SERVICE_RE.fullmatch(service):
        problems.append(
            f"service name {service[:64]!r} is not a DNS label (lowercase letters, digits, '-')"
        )
    port = _port(annotations.get(PORT), settings.port, problems)
    cpu = _quantity(annotations, CPU, settings.cpu, problems)
    cpu_limit = _quantity(annotations, CPU_LIMIT, None, problems)
    memory = _quantity(annotations, MEMORY, settings.memory, problems)
    extra = _extra_args(annotations.get(EXTRA_ARGS, ""), problems)
    secret = annotations.get(DATABASE_SECRET) or settings.secret_prefix + service
    configmap = annotations.get(POLICIES_CONFIGMAP) or settings.configmap_prefix + service
    for key, name in ((DATABASE_SECRET, secret), (POLICIES_CONFIGMAP, configmap)):
        if service and not _OBJECT_NAME_RE.fullmatch(name):
            problems.append(f"{key}: {name[:64]!r} is not a valid object name")
    native = _flag(annotations.get(NATIVE_SIDECAR), settings.native, problems)
    if problems or cpu is None or memory is None:
        return None
    return Options(
        service=service,
        port=port,
        cpu=cpu,
        cpu_limit=cpu_limit,
        memory=memory,
        log_level=(annotations.get(LOG_LEVEL) or settings.log_level).strip(),
        extra_args=extra,
        database_secret=secret,
        policies_configmap=configmap,
        native=native,
    )


def _port(raw: str | None, default: int, problems: list[str]) -> int:
    if raw is None:
        return default
    if raw.strip().isdigit() and 1024 <= int(raw) <= 65535:
        return int(raw)
    problems.append(f"{PORT} must be a port number from 1024 to 65535 (got {raw[:20]!r})")
    return default


def _quantity(
    annotations: Mapping[str, str], key: str, default: str | None, problems: list[str]
) -> str | None:
    raw = annotations.get(key)
    if raw is None:
        return default
    if _QUANTITY_RE.fullmatch(raw.strip()):
        return raw.strip()
    problems.append(f"{key} must be a Kubernetes quantity like 250m or 256Mi (got {raw[:20]!r})")
    return None


def _flag(raw: str | None, default: bool, problems: list[str]) -> bool:
    if raw is None:
        return default
    if raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    problems.append(f'{NATIVE_SIDECAR} must be "true" or "false" (got {raw[:20]!r})')
    return default


def _extra_args(raw: str, problems: list[str]) -> tuple[str, ...]:
    try:
        args = shlex.split(raw)
    except ValueError as err:
        problems.append(f"{EXTRA_ARGS} cannot be split like a shell line: {err}")
        return ()
    for arg in args:
        name = arg.split("=", 1)[0]
        if arg == "-h" or (
            name.startswith("--")
            and len(name) > 2
            and any(f.startswith(name) for f in MANAGED_FLAGS)
        ):
            problems.append(f"{EXTRA_ARGS} may not set {name[:40]} (the injector sets it)")
    return tuple(args)


def sidecar_args(opts: Options, settings: InjectorSettings) -> list[str]:
    """The sidecar's argv after the image's entry point (``dbproxy``)."""
    args = ["serve", "--host", "127.0.0.1", "--port", str(opts.port), "--service", opts.service]
    args += ["--policies", settings.policies_mount]
    if settings.collector_url:
        args += ["--collector", settings.collector_url]
    return [*args, "--log-level", opts.log_level, *opts.extra_args]


def _probe(script: str) -> list[str]:
    """An exec probe: the sidecar listens on loopback only (sidecar mode refuses anything
    else), which a kubelet's httpGet or tcpSocket probe (sent to the pod IP) cannot reach."""
    return ["python", "-c", script]


def _probes(port: int) -> dict[str, Any]:
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2).close()"
    health = (
        "import urllib.request as u; "
        f"u.urlopen('http://127.0.0.1:{port}/api/db/health', timeout=2).close()"
    )
    return {
        # the app starts once this passed (native sidecar); the database may still be down
        "startupProbe": {
            "exec": {"command": _probe(connect)},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "exec": {"command": _probe(connect)},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        # 503 while a database is unavailable: the pod leaves its Services' endpoints
        "readinessProbe": {
            "exec": {"command": _probe(health)},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
    }


def _secret_env(name: str, secret: str, key: str, *, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def sidecar_container(opts: Options, settings: InjectorSettings) -> dict[str, Any]:
    """The sidecar's container (an init container with restartPolicy Always when native)."""
    limits = {"memory": opts.memory}
    if opts.cpu_limit:
        limits["cpu"] = opts.cpu_limit
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.pull_policy,
        "args": sidecar_args(opts, settings),
        "env": [
            _secret_env(
                "DBPROXY_DATABASE_URL", opts.database_secret, DATABASE_URL_KEY, optional=False
            ),
            _secret_env(
                "DBPROXY_COLLECTOR_TOKEN", opts.database_secret, COLLECTOR_TOKEN_KEY, optional=True
            ),
        ],
        "resources": {"requests": {"cpu": opts.cpu, "memory": opts.memory}, "limits": limits},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": POLICIES_VOLUME, "mountPath": settings.policies_mount, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 (a private emptyDir)
        ],
        **_probes(opts.port),
    }
    if opts.native:
        container["restartPolicy"] = "Always"
    return container


def _volumes(opts: Options) -> list[dict[str, Any]]:
    return [
        {"name": POLICIES_VOLUME, "configMap": {"name": opts.policies_configmap}},
        {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def _insert(
    spec: Mapping[str, Any], key: str, items: list[dict[str, Any]], *, front: bool
) -> list[dict[str, Any]]:
    """Operations that put ``items`` into the array ``spec[key]``, creating it when absent
    (never a ``/-`` append onto a missing member)."""
    if not isinstance(spec.get(key), list):
        return [{"op": "add", "path": f"/spec/{key}", "value": items}]
    if front:
        return [
            {"op": "add", "path": f"/spec/{key}/{i}", "value": item} for i, item in enumerate(items)
        ]
    return [{"op": "add", "path": f"/spec/{key}/-", "value": item} for item in items]


def patch_ops(
    spec: Mapping[str, Any], opts: Options, settings: InjectorSettings
) -> list[dict[str, Any]]:
    """The JSONPatch: the sidecar first among the init containers (so it starts before
    the other init containers and the app), or last among the containers (fallback)."""
    container = sidecar_container(opts, settings)
    if opts.native:
        ops = _insert(spec, "initContainers", [container], front=True)
    else:
        ops = _insert(spec, "containers", [container], front=False)
    return ops + _insert(spec, "volumes", _volumes(opts), front=False)
