"""deploy/kuberay/rayservice.yaml's serveConfigV2 is what ``serve build`` writes for the app.

``serve build`` (Ray 2.60, ray/serve/scripts.py) imports a *bound* Application, while
bloomray's import path is the builder ``bloomray.serving.app:build_app(args)``, whose args name
model dirs that must exist. So the test binds the builder itself, in a module it writes: the
RayService's own args, each model dir replaced by a tiny real export (device gpu kept: nothing
starts, and the engine gets the GPU bundle the cluster gives it), and runs the real
``serve build`` CLI on that module. Then, field by field:

* the top level (proxy_location, http_options, grpc_options, logging_config) after Ray's own
  schema (``ServeDeploySchema``) fills in what the manifest leaves out; only
  ``http_options.request_timeout_s`` is the manifest's own (serve build writes none);
* the application's route_prefix and other Serve fields, and its ``deployments``: the same
  names, and every option serve build writes, except the resource options (ray_actor_options,
  placement groups: the code derives them from the device and Ray Serve LLM's LLMConfig), which
  the manifest may leave out; anything it sets has serve build's value;
* name, import_path, args and runtime_env are the manifest's: the app's name, the builder and
  the packaged args (tests/unit/test_kuberay.py checks those), the API-key file.

Ray Serve LLM reads the job's runtime context while it builds (``LLMServer.get_deployment_options``
calls ``ray.get_runtime_context()``), which starts a local Ray: the module starts a small one
itself (1 CPU, no dashboard), beside any test Ray, in the ``serve build`` process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import LoggingConfig, ServeDeploySchema
from serve_helpers import make_tiny_dir

pytestmark = pytest.mark.integration
RAYSERVICE = Path(__file__).parents[2] / "deploy" / "kuberay" / "rayservice.yaml"
# Options the manifest may leave to the code (Serve then keeps the code's values).
RESOURCE_OPTIONS = {"ray_actor_options", "placement_group_bundles", "placement_group_strategy"}
# Application fields that are the manifest's own, not serve build's.
MANIFEST_FIELDS = {"name", "import_path", "args", "runtime_env"}
BUILD_MODULE = """\
import json

import ray

from bloomray.serving.app import build_app

ray.init(num_cpus=1, include_dashboard=False)  # Ray Serve LLM needs one while it builds
app = build_app(json.loads({args!r}))
"""

Doc = dict[str, Any]


def rayservice_serve_config() -> Doc:
    (d,) = [x for x in yaml.safe_load_all(RAYSERVICE.read_text()) if x and x.get("kind") == "RayService"]
    return yaml.safe_load(d["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Doc:
    """The config ``serve build`` writes for the builder bound with the RayService's args."""
    tmp = tmp_path_factory.mktemp("serve_build")
    (app,) = rayservice_serve_config()["applications"]
    model_dir = make_tiny_dir(tmp / "lm")
    args = {**app["args"], "models": {name: str(model_dir) for name in app["args"]["models"]}}
    (tmp / "rayservice_app.py").write_text(BUILD_MODULE.format(args=json.dumps(args)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never a real cluster
    env["HF_HUB_OFFLINE"] = "1"
    serve_cli = Path(sys.executable).with_name("serve")
    cmd = [
        str(serve_cli),
        "build",
        "--app-dir",
        str(tmp),
        "rayservice_app:app",
        "-o",
        str(tmp / "built.yaml"),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"serve build failed:\n{proc.stderr[-4000:]}"
    return yaml.safe_load((tmp / "built.yaml").read_text())


def serve_build_problems(cfg: Doc, built: Doc) -> list[str]:
    """Where the RayService's serve config CFG is not what serve build wrote (BUILT)."""
    problems = []
    ours, theirs = (
        ServeDeploySchema.model_validate(c).model_dump(mode="json", exclude={"applications"})
        for c in (cfg, built)
    )
    for top in (ours, theirs):
        top["http_options"].pop("request_timeout_s", None)
        # None: the replicas log with Serve's global config, LoggingConfig()'s defaults.
        top["logging_config"] = top.get("logging_config") or LoggingConfig().model_dump(mode="json")
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            problems.append(f"{key}: {ours.get(key)!r} != serve build's {theirs.get(key)!r}")
    if len(cfg["applications"]) != len(built["applications"]):
        return [
            *problems,
            f"{len(cfg['applications'])} applications, serve build wrote {len(built['applications'])}",
        ]
    (app,), (built_app,) = cfg["applications"], built["applications"]
    for key in sorted((set(app) | set(built_app)) - MANIFEST_FIELDS - {"deployments"}):
        if app.get(key) != built_app.get(key):
            problems.append(f"application {key}: {app.get(key)!r} != serve build's {built_app.get(key)!r}")
    mine = {d["name"]: d for d in app.get("deployments") or []}
    theirs_d = {d["name"]: d for d in built_app.get("deployments") or []}
    if set(mine) != set(theirs_d):
        problems.append(f"deployments {sorted(mine)} != serve build's {sorted(theirs_d)}")
    for name, want in theirs_d.items():
        got = mine.get(name, {})
        for key in sorted((set(want) | set(got)) - {"name"}):
            if key in got and got[key] != want.get(key):
                problems.append(f"{name}.{key}: {got[key]!r} != serve build's {want.get(key)!r}")
            elif key not in got and key not in RESOURCE_OPTIONS:
                problems.append(f"{name}.{key} missing (serve build writes {want[key]!r})")
    return problems


def test_rayservice_serve_config_is_what_serve_build_writes(built):
    cfg = rayservice_serve_config()
    problems = serve_build_problems(cfg, built)
    assert not problems, "\n".join(problems)
    # The build used the RayService's args: the engine on the GPU group, and it is the ingress
    # (no separate BloomIngress deployment when a causal LM is served).
    names = [d["name"] for d in built["applications"][0]["deployments"]]
    assert names == ["LLMServer:default"], names
    (engine,) = built["applications"][0]["deployments"]
    assert engine["placement_group_bundles"][0].get("GPU") == 1, engine


def _deployment(cfg: Doc, name: str) -> Doc:
    return next(d for d in cfg["applications"][0]["deployments"] if d["name"] == name)


EDITS = {
    "deployment renamed": lambda c: _deployment(c, "LLMServer:default").update(name="LLMServer:winner"),
    "max_replicas differs": lambda c: _deployment(c, "LLMServer:default")["autoscaling_config"].update(
        max_replicas=8
    ),
    "option missing": lambda c: _deployment(c, "LLMServer:default").pop("health_check_timeout_s"),
    "resource option differs": lambda c: _deployment(c, "LLMServer:default").update(
        ray_actor_options={"num_cpus": 7}
    ),
    "deployment missing": lambda c: c["applications"][0]["deployments"].pop(),
    "proxy_location": lambda c: c.update(proxy_location="HeadOnly"),
    "grpc port": lambda c: c.update(grpc_options={"port": 9001}),
    "route_prefix": lambda c: c["applications"][0].update(route_prefix="/api"),
}


@pytest.mark.parametrize("what", sorted(EDITS))
def test_comparison_notices(built, what):
    cfg = copy.deepcopy(rayservice_serve_config())
    EDITS[what](cfg)
    assert serve_build_problems(cfg, built), f"not noticed: {what}"
