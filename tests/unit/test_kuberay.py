"""deploy/kuberay/: the KubeRay manifests are valid and keep bloomray's cluster rules.

Every document of every ``deploy/kuberay/*.yaml`` is checked:

* RayCluster / RayJob / RayService against the ``openAPIV3Schema`` of the served version of
  their CRD (``../shared/kuberay-crds``, the KubeRay CRDs), strictly: an unknown field is an
  error, as with ``kubectl apply``'s default ``--validate=strict``. Other kinds (the PVC):
  apiVersion, kind and metadata.name only.
* Token auth is on, explicitly, on every Ray container (``RAY_AUTH_MODE=token``, the token in
  ``RAY_AUTH_TOKEN`` from the Secret that ``authOptions.secretName`` names, data key
  ``auth_token``), and no Ray control-plane port (dashboard / Jobs API, GCS, client) is on a
  NodePort or LoadBalancer Service.
* Clusters that serve (RayService, RayCluster) set ``bloomray.raycluster.SERVE_ENV`` (Ray
  Serve's throughput settings) on every Ray container.
* The code comes from the image: no runtime_env ``working_dir`` / ``pip`` / ..., images are the
  ``bloomray:<version>-ray2.60.0-py311[-gpu]`` builds of deploy/docker/Dockerfile (GPU pods the
  ``-gpu`` one), entrypoints are the installed ``bloomray`` CLI with a real preset.
* GPU worker groups start at 0 and autoscale; RayJobs delete their cluster when done and have a
  deadline; runs and checkpoints are on the shared PVC (or S3).
* The RayService's serveConfigV2 is the packaged Serve config (bloomray/serving/config.yaml):
  same applications, import_path and args keys, with cluster values, and valid for
  ``ServeDeploySchema`` (the schema ``serve build`` checks its own output against).

Its ``deployments:`` section (which the packaged config has not: its names depend on the models
served) is compared with what the real ``serve build`` writes for the app built with the
RayService's args in tests/integration/test_rayservice_serve_build.py: that test starts a Ray
(Ray Serve LLM reads the runtime context while it builds), so it is not a unit test.

Each check is a function returning a list of problems; ``test_each_check_can_fail`` breaks a
copy of a manifest for each one and expects a problem.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from bloomray.cli import build_parser
from bloomray.config import ConfigError, load_config, preset_names
from bloomray.raycluster import SERVE_ENV
from bloomray.serving.options import ServeOptions

ROOT = Path(__file__).parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
CRDS = Path(__file__).parents[2].parent / "shared" / "kuberay-crds"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
PACKAGED_SERVE_CONFIG = files("bloomray.serving") / "config.yaml"

RAY_VERSION = "2.60.0"
CPU_BASE = f"rayproject/ray:{RAY_VERSION}-py311"
GPU_BASE = f"{CPU_BASE}-gpu"
# registry/.../bloomray:<bloomray version>-ray2.60.0-py311[-gpu] (the Dockerfile's tags)
IMAGE_RE = re.compile(
    r"^(?:[a-z0-9.-]+(?::\d+)?/)+bloomray:\d[\w.]*-ray" + re.escape(RAY_VERSION) + r"-py311(?P<gpu>-gpu)?$"
)
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
CORE_KINDS = {"PersistentVolumeClaim", "Secret", "Service", "ConfigMap"}  # apiVersion v1
# KubeRay reads the token of authOptions.secretName from this data key.
TOKEN_SECRET_KEY = "auth_token"
EXPOSED_SERVICE_TYPES = {"NodePort", "LoadBalancer"}
RAY_CONTROL_PORTS = {8265: "dashboard / Jobs API", 6379: "GCS", 10001: "Ray client"}
# runtime_env fields that ship code or packages at start; the image already has them.
CODE_RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "py_executable"}
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
JOB_VERBS = ("pretrain", "finetune", "tune")

Doc = dict[str, Any]
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- loading -----------------------------------------------------------------------------


def load_manifest_file(path: Path) -> list[Doc]:
    """The non-empty documents of a (multi-document) YAML file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBERAY.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.cache
def all_docs() -> tuple[tuple[str, int, Doc], ...]:
    return tuple(
        (str(p.relative_to(KUBERAY)), i, d)
        for p in manifest_files()
        for i, d in enumerate(load_manifest_file(p))
    )


def doc(name: str, kind: str | None = None) -> Doc:
    """A deep copy of the first document of deploy/kuberay/NAME (of KIND)."""
    for file, _, d in all_docs():
        if file == name and (kind is None or d.get("kind") == kind):
            return copy.deepcopy(d)
    raise LookupError(f"{name}: no {kind or 'document'}")


def other_docs() -> list[Doc]:
    return [d for _, _, d in all_docs()]


def _strict(node: Any) -> Any:
    """The schema with additionalProperties: false wherever it lists properties (and does not
    keep unknown fields): the API server rejects unknown fields under strict field validation."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        isinstance(out.get("properties"), dict)
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator, for every served version of the KubeRay CRDs."""
    assert CRDS.is_dir(), f"the KubeRay CRDs are missing: {CRDS} (ray.io_rayclusters.yaml, ...)"
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)  # 60k lines: the C loader if built
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                out[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    assert {k for _, k in out} >= RAY_KINDS, f"{CRDS}: CRDs for {sorted(RAY_KINDS)} expected"
    return out


@functools.cache
def packaged_serve_config() -> Doc:
    return yaml.safe_load(PACKAGED_SERVE_CONFIG.read_text())


# --- navigating Ray specs -------------------------------------------------------------


def cluster_specs(d: Doc) -> list[Doc]:
    """The RayCluster specs of a Ray resource (none for other kinds)."""
    spec = d.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    if d.get("kind") not in key:
        return []
    cspec = spec if key[d["kind"]] is None else spec.get(key[d["kind"]])
    return [cspec] if isinstance(cspec, dict) else []


def groups(cspec: Doc) -> list[tuple[str, Doc]]:
    """(name, group) for the head ("head") and every worker group."""
    out = [("head", cspec.get("headGroupSpec") or {})]
    out += [(g.get("groupName", "?"), g) for g in cspec.get("workerGroupSpecs") or []]
    return out


def pod_spec(group: Doc) -> Doc:
    return (group.get("template") or {}).get("spec") or {}


def ray_container(group: Doc) -> Doc:
    """KubeRay runs Ray in the first container of a group's pod template."""
    containers = pod_spec(group).get("containers") or [{}]
    return containers[0]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e.get("name"): e for e in container.get("env") or []}


def is_gpu(container: Doc) -> bool:
    res = container.get("resources") or {}
    for section in ("limits", "requests"):
        for name in GPU_RESOURCES:
            if str((res.get(section) or {}).get(name, "0")) not in ("0", ""):
                return True
    return False


def mounts_of(group: Doc, volume_kind: str) -> dict[str, str]:
    """mountPath -> volume name, for the Ray container's mounts of volumes of VOLUME_KIND."""
    volumes = {v.get("name"): v for v in pod_spec(group).get("volumes") or []}
    return {
        m["mountPath"]: m["name"]
        for m in ray_container(group).get("volumeMounts") or []
        if volume_kind in (volumes.get(m.get("name")) or {})
    }


def shared_mounts(cspec: Doc) -> set[str]:
    """PVC mount paths that every pod of the cluster has (where a run's files must go)."""
    per_group = [set(mounts_of(g, "persistentVolumeClaim")) for _, g in groups(cspec)]
    return set.intersection(*per_group) if per_group else set()


def under(path: str, roots: set[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def serve_config(d: Doc) -> Doc:
    return yaml.safe_load((d.get("spec") or {}).get("serveConfigV2") or "") or {}


def set_serve_config(d: Doc, cfg: Doc) -> None:
    d["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


# --- checks: each returns the problems of one document (others: the whole directory) -----

Check = Callable[[Doc, list[Doc]], list[str]]


def schema_problems(d: Doc, others: list[Doc]) -> list[str]:
    """Ray kinds: the CRD schema; other kinds: apiVersion, kind, metadata.name."""
    kind, api = d.get("kind"), d.get("apiVersion")
    problems = []
    if not isinstance(kind, str) or not isinstance(api, str) or not api:
        problems.append(f"apiVersion and kind must be strings (got {api!r}, {kind!r})")
    if not isinstance((d.get("metadata") or {}).get("name"), str):
        problems.append("metadata.name must be set")
    if kind in RAY_KINDS:
        validator = crd_validators().get((api, kind))
        if validator is None:
            served = sorted(a for a, k in crd_validators() if k == kind)
            return [*problems, f"{kind}: apiVersion {api!r} is not served (served: {served})"]
        for err in sorted(validator.iter_errors(d), key=lambda e: [str(p) for p in e.absolute_path]):
            where = ".".join(str(p) for p in err.absolute_path) or "(top)"
            problems.append(f"{kind} {where}: {err.message[:300]}")
    elif kind in CORE_KINDS and api != "v1":
        problems.append(f"{kind}: apiVersion must be v1, not {api!r}")
    return problems


def auth_problems(d: Doc, others: list[Doc]) -> list[str]:
    """Token auth on, explicitly, with the token from the Secret that authOptions names."""
    problems = []
    for cspec in cluster_specs(d):
        auth = cspec.get("authOptions") or {}
        secret = auth.get("secretName")
        if auth.get("mode") != "token" or not secret:
            # Without authOptions the operator's own dashboard calls (job submission, Serve
            # config) and the autoscaler carry no token and are refused.
            problems.append("authOptions must be {mode: token, secretName: <the token Secret>}")
        if cspec.get("rayVersion") != RAY_VERSION:
            problems.append(f"rayVersion must be {RAY_VERSION!r} (authOptions needs it set, >= 2.52)")
        for name, group in groups(cspec):
            env = env_of(ray_container(group))
            if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
                problems.append(f"group {name}: the Ray container must set RAY_AUTH_MODE=token")
            token = env.get("RAY_AUTH_TOKEN") or {}
            ref = (token.get("valueFrom") or {}).get("secretKeyRef") or {}
            if "value" in token or ref.get("name") != secret or ref.get("key") != TOKEN_SECRET_KEY:
                problems.append(
                    f"group {name}: RAY_AUTH_TOKEN must come from secretKeyRef "
                    f"{{name: {secret}, key: {TOKEN_SECRET_KEY}}}, never a literal value"
                )
    return problems


def serve_env_problems(d: Doc, others: list[Doc]) -> list[str]:
    """Clusters that serve (RayService, the long-lived RayCluster) set Ray Serve's throughput
    settings on every Ray container: Serve's processes read them when they start, on any node."""
    if d.get("kind") not in ("RayService", "RayCluster"):
        return []
    problems = []
    for cspec in cluster_specs(d):
        for name, group in groups(cspec):
            env = env_of(ray_container(group))
            for key, value in SERVE_ENV.items():
                if (env.get(key) or {}).get("value") != value:
                    problems.append(f"group {name}: the Ray container must set {key}={value} (SERVE_ENV)")
    return problems


def _exposes_ray_ports(service_spec: Doc) -> list[str]:
    hits = []
    for port in service_spec.get("ports") or []:
        for value in (port.get("port"), port.get("targetPort"), port.get("name")):
            if value in RAY_CONTROL_PORTS:
                hits.append(RAY_CONTROL_PORTS[value])
            elif isinstance(value, str) and ("dashboard" in value or value in ("gcs-server", "client")):
                hits.append(value)
    return hits


def exposure_problems(d: Doc, others: list[Doc]) -> list[str]:
    """The dashboard / Jobs API (and GCS, client) stay ClusterIP-only."""
    problems = []
    for cspec in cluster_specs(d):
        head = cspec.get("headGroupSpec") or {}
        service_type = head.get("serviceType") or "ClusterIP"
        head_svc_type = ((head.get("headService") or {}).get("spec") or {}).get("type")
        if service_type in EXPOSED_SERVICE_TYPES or head_svc_type in EXPOSED_SERVICE_TYPES:
            problems.append("the head Service (dashboard, Jobs API) must be ClusterIP")
        if head.get("enableIngress"):
            problems.append("headGroupSpec.enableIngress exposes the dashboard")
    services = [d] if d.get("kind") == "Service" else []
    if d.get("kind") == "RayService" and (d.get("spec") or {}).get("serveService"):
        services.append(d["spec"]["serveService"])
    for svc in services:
        spec = svc.get("spec") or {}
        hits = _exposes_ray_ports(spec)
        if spec.get("type") in EXPOSED_SERVICE_TYPES and hits:
            problems.append(f"a {spec['type']} Service exposes {sorted(set(hits))}")
    return problems


def runtime_env_problems(d: Doc, others: list[Doc]) -> list[str]:
    """No code or packages pulled at start, no secrets in a runtime_env."""
    spec = d.get("spec") or {}
    envs: list[tuple[str, Doc]] = []
    problems = []
    if d.get("kind") == "RayJob":
        if spec.get("runtimeEnvYAML"):
            envs.append(("runtimeEnvYAML", yaml.safe_load(spec["runtimeEnvYAML"]) or {}))
        entrypoint = spec.get("entrypoint") or ""
        if "--working-dir" in entrypoint or "--runtime-env" in entrypoint:
            problems.append("the entrypoint must not ship code (--working-dir / --runtime-env)")
    if d.get("kind") == "RayService":
        for app in serve_config(d).get("applications") or []:
            envs.append((f"application {app.get('name')}", app.get("runtime_env") or {}))
    for where, env in envs:
        if set(env) & CODE_RUNTIME_ENV_KEYS:
            problems.append(
                f"{where}: runtime_env {sorted(set(env) & CODE_RUNTIME_ENV_KEYS)}; the image has the code"
            )
        for secret in ("BLOOMRAY_API_KEYS", "RAY_AUTH_TOKEN"):
            if secret in (env.get("env_vars") or {}):
                problems.append(f"{where}: {secret} in runtime_env (shown in the dashboard)")
    for cspec in cluster_specs(d):
        for name, group in groups(cspec):
            if "BLOOMRAY_API_KEYS" in env_of(ray_container(group)):
                problems.append(f"group {name}: API keys via BLOOMRAY_API_KEYS_FILE (a mounted Secret) only")
    return problems


def image_problems(d: Doc, others: list[Doc]) -> list[str]:
    """The Dockerfile's two images, GPU pods on the -gpu one."""
    problems = []
    for cspec in cluster_specs(d):
        for name, group in groups(cspec):
            for container in pod_spec(group).get("containers") or []:
                image = container.get("image", "")
                match = IMAGE_RE.match(image)
                if not match:
                    problems.append(
                        f"group {name}: image {image!r} is not a bloomray:<v>-ray{RAY_VERSION}-py311 build"
                    )
                elif bool(match["gpu"]) != is_gpu(container):
                    want = "-gpu" if is_gpu(container) else "CPU"
                    problems.append(f"group {name}: {image!r}: this pod needs the {want} image")
    return problems


def gpu_group_problems(d: Doc, others: list[Doc]) -> list[str]:
    """A CPU head, GPU worker groups that start at 0 replicas and autoscale."""
    problems = []
    for cspec in cluster_specs(d):
        if not cspec.get("enableInTreeAutoscaling"):
            problems.append("enableInTreeAutoscaling must be true (GPU groups scale from 0)")
        if is_gpu(ray_container(cspec.get("headGroupSpec") or {})):
            problems.append("the head must be a CPU pod")
        gpu_groups = [(n, g) for n, g in groups(cspec)[1:] if is_gpu(ray_container(g))]
        if not gpu_groups:
            problems.append("no GPU worker group")
        for name, group in gpu_groups:
            if group.get("minReplicas") != 0 or group.get("replicas", 0) != 0:
                problems.append(f"GPU group {name}: minReplicas and replicas must be 0")
            if not (group.get("maxReplicas") or 0) >= 1:
                problems.append(f"GPU group {name}: maxReplicas must be >= 1")
    return problems


def entrypoint_problems(entrypoint: str, shared: set[str]) -> list[str]:
    """The installed CLI, a real preset, a config that loads, outputs on shared storage."""
    argv = shlex.split(entrypoint)
    if not argv or argv[0] != "bloomray":
        return [f"entrypoint must run the installed CLI (bloomray VERB ...), not {entrypoint!r}"]
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return [f"bloomray rejects the arguments of {entrypoint!r}"]
    if args.verb not in JOB_VERBS:
        return [f"entrypoint verb {args.verb!r} is not one of {JOB_VERBS}"]
    problems = []
    if args.resume:
        if not under(args.resume, shared):
            problems.append(f"--resume {args.resume} is not on the shared PVC {sorted(shared)}")
        return problems
    if "--config" not in argv:
        return ["give --config PRESET explicitly (the CLI default is a CPU demo preset)"]
    if args.config not in preset_names():
        return [f"--config {args.config!r} is not a packaged preset: {preset_names()}"]
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        return [f"--config {args.config} with {args.overrides}: {exc}"]
    storage = cfg.output.storage_path or args.output or cfg.output.dir
    if not (storage.startswith("s3://") or under(storage, shared)):
        problems.append(f"checkpoints go to {storage!r}: not on the shared PVC {sorted(shared)} or S3")
    if not args.output or not under(args.output, shared):
        problems.append(f"--output {args.output!r} must be on the shared PVC {sorted(shared)}")
    return problems


def rayjob_problems(d: Doc, others: list[Doc]) -> list[str]:
    if d.get("kind") != "RayJob":
        return []
    spec = d.get("spec") or {}
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (the GPU cluster goes when the job ends)")
    ttl, deadline = spec.get("ttlSecondsAfterFinished"), spec.get("activeDeadlineSeconds")
    if not isinstance(ttl, int) or ttl < 0:
        problems.append("ttlSecondsAfterFinished must be set (>= 0)")
    if not isinstance(deadline, int) or deadline <= 0:
        problems.append("activeDeadlineSeconds must be set (> 0)")
    for cspec in cluster_specs(d):
        problems += entrypoint_problems(spec.get("entrypoint") or "", shared_mounts(cspec))
    return problems


def _key_paths(node: Any, prefix: str = "") -> set[str]:
    """Dotted key paths of nested dicts; ``models`` (name -> model dir) is one leaf."""
    if not isinstance(node, dict):
        return set()
    out = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.add(path)
        if key != "models":
            out |= _key_paths(value, path + ".")
    return out


def _env_var_names(app: Doc) -> list[str]:
    return sorted((app.get("runtime_env") or {}).get("env_vars") or {})


def serve_config_problems(cfg: Doc, reference: Doc) -> list[str]:
    """CFG has REFERENCE's applications: import_path, route_prefix, args keys, env var names.

    Deployments are not compared: the RayService lists what ``serve build`` writes for its
    models (tests/integration/test_rayservice_serve_build.py), the packaged config none.
    """
    problems = []
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        problems.append(f"not a valid Serve config: {str(exc)[:300]}")
    if set(cfg) != set(reference):
        problems.append(f"top-level keys {sorted(cfg)} != the packaged {sorted(reference)}")
    apps = {a.get("name"): a for a in cfg.get("applications") or []}
    ref_apps = {a["name"]: a for a in reference.get("applications") or []}
    if set(apps) != set(ref_apps):
        problems.append(f"applications {sorted(apps, key=str)} != the packaged {sorted(ref_apps)}")
    for name, ref in ref_apps.items():
        app = apps.get(name) or {}
        for key in ("import_path", "route_prefix"):
            if app.get(key) != ref.get(key):
                problems.append(f"{name}: {key} {app.get(key)!r} != the packaged {ref.get(key)!r}")
        got, want = _key_paths(app.get("args")), _key_paths(ref.get("args"))
        if got != want:
            problems.append(f"{name}: args keys missing {sorted(want - got)}, extra {sorted(got - want)}")
        if _env_var_names(app) != _env_var_names(ref):
            problems.append(
                f"{name}: runtime_env env_vars {_env_var_names(app)} != the packaged {_env_var_names(ref)}"
            )
        args = dict(app.get("args") or {})
        if not args.get("models"):
            problems.append(f"{name}: args.models is empty")
        args.pop("models", None)
        args.pop("ingress_deployment", None)
        try:
            ServeOptions.from_args(args)
        except (ConfigError, TypeError) as exc:
            problems.append(f"{name}: the app rejects its args: {exc}")
    return problems


def rayservice_problems(d: Doc, others: list[Doc]) -> list[str]:
    if d.get("kind") != "RayService":
        return []
    spec = d.get("spec") or {}
    problems = []
    if (spec.get("upgradeStrategy") or {}).get("type") not in (
        "NewCluster",
        "NewClusterWithIncrementalUpgrade",
    ):
        problems.append("upgradeStrategy.type must be NewCluster (or NewClusterWithIncrementalUpgrade)")
    try:
        cfg = serve_config(d)
    except yaml.YAMLError as exc:
        return [*problems, f"serveConfigV2 is not YAML: {exc}"]
    problems += serve_config_problems(cfg, packaged_serve_config())
    for cspec in cluster_specs(d):
        shared = shared_mounts(cspec)
        key_files = set()
        for name, group in groups(cspec):
            path = (env_of(ray_container(group)).get("BLOOMRAY_API_KEYS_FILE") or {}).get("value")
            if not path or not under(path, set(mounts_of(group, "secret"))):
                problems.append(f"group {name}: BLOOMRAY_API_KEYS_FILE must name a file of a mounted Secret")
            key_files.add(path)
        for app in cfg.get("applications") or []:
            path = ((app.get("runtime_env") or {}).get("env_vars") or {}).get("BLOOMRAY_API_KEYS_FILE")
            if path is not None and {path} != key_files:
                problems.append(
                    f"{app.get('name')}: runtime_env BLOOMRAY_API_KEYS_FILE {path!r} != the pods' {key_files}"
                )
            args = app.get("args") or {}
            for model, model_dir in (args.get("models") or {}).items():
                if not under(str(model_dir), shared):
                    problems.append(f"model {model}: {model_dir!r} is not on the shared PVC {sorted(shared)}")
            # auto decides when the app is built: with the GPU group at 0 it would pick CPU engines
            if args.get("device") != "gpu":
                problems.append("args.device must be gpu (auto sees no GPUs while the GPU group is at 0)")
    return problems


def pvc_problems(d: Doc, others: list[Doc]) -> list[str]:
    """Every claim a pod mounts is a ReadWriteMany PVC of deploy/kuberay."""
    pvcs = {o["metadata"]["name"]: o for o in others if o.get("kind") == "PersistentVolumeClaim"}
    problems = []
    for cspec in cluster_specs(d):
        for name, group in groups(cspec):
            for volume in pod_spec(group).get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                if claim is None:
                    continue
                if claim not in pvcs:
                    problems.append(
                        f"group {name}: claim {claim!r} has no PersistentVolumeClaim in deploy/kuberay"
                    )
                elif "ReadWriteMany" not in (pvcs[claim].get("spec") or {}).get("accessModes", []):
                    problems.append(f"claim {claim}: every node writes it, so it must be ReadWriteMany")
    return problems


CHECKS: dict[str, Check] = {
    "schema": schema_problems,
    "auth": auth_problems,
    "serve_env": serve_env_problems,
    "exposure": exposure_problems,
    "runtime_env": runtime_env_problems,
    "image": image_problems,
    "gpu_group": gpu_group_problems,
    "rayjob": rayjob_problems,
    "rayservice": rayservice_problems,
    "pvc": pvc_problems,
}


# --- tests ---------------------------------------------------------------------------------


def test_deploy_has_the_manifests_a_team_needs():
    kinds = [d.get("kind") for _, _, d in all_docs()]
    for kind in ("RayJob", "RayService", "RayCluster", "PersistentVolumeClaim"):
        assert kind in kinds, f"deploy/kuberay has no {kind}"
    verbs = {shlex.split(d["spec"]["entrypoint"])[1] for _, _, d in all_docs() if d.get("kind") == "RayJob"}
    assert {"pretrain", "tune"} <= verbs, verbs


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize(
    "file,index", [(f, i) for f, i, _ in all_docs()], ids=[f"{f}#{i}" for f, i, _ in all_docs()]
)
def test_manifest(file, index, check):
    d = next(d for f, i, d in all_docs() if (f, i) == (file, index))
    problems = CHECKS[check](copy.deepcopy(d), other_docs())
    assert not problems, (
        f"{file}#{index} ({d.get('kind')} {d.get('metadata', {}).get('name')}):\n" + "\n".join(problems)
    )


def test_dockerfile_builds_bloomray_on_the_pinned_ray_images():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(CPU_BASE)}$", text, re.M), "default base: the CPU image"
    assert f"BASE_IMAGE={GPU_BASE}" in text, "the GPU build arg is documented"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"pip install [^\n]*\"\.\[", text), "bloomray itself is pip-installed (not editable)"
    assert "pip install -e" not in text and "--editable" not in text
    # The image's Ray is the one the project pins.
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert f"ray=={RAY_VERSION}" in pins
    # Every tag the manifests use is one the Dockerfile documents.
    tags = {m for m in re.findall(r"-t (\S+)", text)}
    used = {
        c["image"]
        for _, _, d in all_docs()
        for cspec in cluster_specs(d)
        for _, g in groups(cspec)
        for c in pod_spec(g).get("containers") or []
    }
    assert used <= tags, f"images {sorted(used - tags)} are not built by deploy/docker/Dockerfile"


def test_broken_copy_of_a_manifest_fails_crd_validation(tmp_path):
    """A copy of rayjob-pretrain.yaml with a misspelled field and a wrong type fails the schema."""
    text = (KUBERAY / "rayjob-pretrain.yaml").read_text()
    assert "shutdownAfterJobFinishes: true" in text and "minReplicas: 0" in text
    broken = text.replace("shutdownAfterJobFinishes: true", "shutdownAfterJobFinish: true")
    broken = broken.replace("minReplicas: 0", "minReplicas: none")
    (tmp_path / "rayjob-pretrain.yaml").write_text(broken)
    (d,) = load_manifest_file(tmp_path / "rayjob-pretrain.yaml")
    problems = "\n".join(schema_problems(d, []))
    assert "shutdownAfterJobFinish" in problems, problems
    assert "minReplicas" in problems, problems
    d["apiVersion"] = "ray.io/v9"
    assert "not served" in "\n".join(schema_problems(d, []))


def _env(d: Doc, group: int, name: str) -> Doc:
    cspec = cluster_specs(d)[0]
    return env_of(ray_container(groups(cspec)[group][1]))[name]


def _drop_env(d: Doc, group: int, name: str) -> None:
    container = ray_container(groups(cluster_specs(d)[0])[group][1])
    container["env"] = [e for e in container["env"] if e["name"] != name]


def _edit_serve(d: Doc, edit: Callable[[Doc], None]) -> None:
    cfg = serve_config(d)
    edit(cfg)
    set_serve_config(d, cfg)


def _app_args(cfg: Doc) -> Doc:
    return cfg["applications"][0]["args"]


def _gpu_group(d: Doc) -> Doc:
    return next(g for _, g in groups(cluster_specs(d)[0])[1:] if is_gpu(ray_container(g)))


def _set(d: Doc, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value


# (check, file, what breaks, mutation): every check must find the broken copy.
MUTATIONS: list[tuple[str, str, str, Callable[[Doc], Any]]] = [
    (
        "serve_env",
        "rayservice.yaml",
        "no throughput setting on a worker",
        lambda d: _drop_env(d, 1, "RAY_SERVE_THROUGHPUT_OPTIMIZED"),
    ),
    (
        "serve_env",
        "raycluster.yaml",
        "direct ingress left to Ray's default on the head",
        lambda d: _drop_env(d, 0, "RAY_SERVE_ENABLE_DIRECT_INGRESS"),
    ),
    (
        "schema",
        "raycluster.yaml",
        "unknown field",
        lambda d: _set(d, "spec.headGroupSpec.serviceTyp", "ClusterIP"),
    ),
    ("schema", "pvc.yaml", "no metadata.name", lambda d: d["metadata"].pop("name")),
    (
        "auth",
        "rayjob-pretrain.yaml",
        "no RAY_AUTH_MODE on a worker",
        lambda d: _drop_env(d, 1, "RAY_AUTH_MODE"),
    ),
    (
        "auth",
        "raycluster.yaml",
        "RAY_AUTH_MODE=disabled",
        lambda d: _env(d, 0, "RAY_AUTH_MODE").update(value="disabled"),
    ),
    ("auth", "rayservice.yaml", "literal token", lambda d: _env(d, 2, "RAY_AUTH_TOKEN").update(value="abc")),
    ("auth", "rayjob-tune.yaml", "no authOptions", lambda d: d["spec"]["rayClusterSpec"].pop("authOptions")),
    (
        "exposure",
        "raycluster.yaml",
        "NodePort head",
        lambda d: _set(d, "spec.headGroupSpec.serviceType", "NodePort"),
    ),
    (
        "exposure",
        "rayservice.yaml",
        "LoadBalancer dashboard",
        lambda d: _set(d, "spec.serveService", {"spec": {"type": "LoadBalancer", "ports": [{"port": 8265}]}}),
    ),
    (
        "runtime_env",
        "rayjob-pretrain.yaml",
        "working_dir",
        lambda d: _set(d, "spec.runtimeEnvYAML", "working_dir: .\n"),
    ),
    (
        "runtime_env",
        "rayservice.yaml",
        "pip in the app",
        lambda d: _edit_serve(d, lambda c: c["applications"][0]["runtime_env"].update(pip=["bloomray"])),
    ),
    (
        "image",
        "rayjob-pretrain.yaml",
        "plain Ray image",
        lambda d: ray_container(_gpu_group(d)).update(image=GPU_BASE),
    ),
    (
        "image",
        "raycluster.yaml",
        "CPU image on GPUs",
        lambda d: ray_container(_gpu_group(d)).update(
            image="registry.example.com/bloomray:0.1.0-ray2.60.0-py311"
        ),
    ),
    ("gpu_group", "rayjob-tune.yaml", "GPU minReplicas 1", lambda d: _gpu_group(d).update(minReplicas=1)),
    (
        "gpu_group",
        "rayservice.yaml",
        "no autoscaling",
        lambda d: d["spec"]["rayClusterConfig"].pop("enableInTreeAutoscaling"),
    ),
    (
        "rayjob",
        "rayjob-pretrain.yaml",
        "cluster kept",
        lambda d: _set(d, "spec.shutdownAfterJobFinishes", False),
    ),
    ("rayjob", "rayjob-tune.yaml", "no deadline", lambda d: d["spec"].pop("activeDeadlineSeconds")),
    ("rayjob", "rayjob-finetune.yaml", "no ttl", lambda d: d["spec"].pop("ttlSecondsAfterFinished")),
    (
        "rayjob",
        "rayjob-pretrain.yaml",
        "unknown preset",
        lambda d: _set(
            d, "spec.entrypoint", d["spec"]["entrypoint"].replace("bloom-560m-zero2", "bloom-560m")
        ),
    ),
    (
        "rayjob",
        "rayjob-finetune.yaml",
        "bad override",
        lambda d: _set(d, "spec.entrypoint", d["spec"]["entrypoint"] + " --set train.lrr=1"),
    ),
    (
        "rayjob",
        "rayjob-tune.yaml",
        "a script, not the CLI",
        lambda d: _set(d, "spec.entrypoint", "python jobs/tune.py --config tune-bloom-560m"),
    ),
    (
        "rayjob",
        "rayjob-pretrain.yaml",
        "output off the PVC",
        lambda d: _set(d, "spec.entrypoint", d["spec"]["entrypoint"].replace("/mnt/shared/runs/", "/tmp/")),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "other import_path",
        lambda d: _edit_serve(
            d, lambda c: c["applications"][0].update(import_path="bloomray.serving.ingress:app")
        ),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "args key missing",
        lambda d: _edit_serve(d, lambda c: _app_args(c).pop("max_n")),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "nested args key misspelt",
        lambda d: _edit_serve(d, lambda c: _app_args(c)["engine_deployment"].update(max_ongoing_request=1)),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "device auto",
        lambda d: _edit_serve(d, lambda c: _app_args(c).update(device="auto")),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "bad option value",
        lambda d: _edit_serve(d, lambda c: _app_args(c).update(max_tokens_limit=4096)),
    ),
    (
        "rayservice",
        "rayservice.yaml",
        "invalid Serve config",
        lambda d: _edit_serve(d, lambda c: c.update(proxy_location="Everywhere")),
    ),
    ("rayservice", "rayservice.yaml", "no upgrade strategy", lambda d: d["spec"].pop("upgradeStrategy")),
    (
        "rayservice",
        "rayservice.yaml",
        "keys file not mounted",
        lambda d: _drop_env(d, 1, "BLOOMRAY_API_KEYS_FILE"),
    ),
    (
        "pvc",
        "raycluster.yaml",
        "unknown claim",
        lambda d: pod_spec(d["spec"]["headGroupSpec"])["volumes"][0]["persistentVolumeClaim"].update(
            claimName="x"
        ),
    ),
]


@pytest.mark.parametrize("check,file,what,mutate", MUTATIONS, ids=[f"{c}-{w}" for c, _, w, _ in MUTATIONS])
def test_each_check_can_fail(check, file, what, mutate):
    d = doc(file)
    assert not CHECKS[check](copy.deepcopy(d), other_docs()), f"{file} should pass {check} before the edit"
    mutate(d)
    assert CHECKS[check](d, other_docs()), f"{check} did not notice: {what} in {file}"


def test_every_check_has_a_breaking_edit():
    assert {c for c, *_ in MUTATIONS} == set(CHECKS)
