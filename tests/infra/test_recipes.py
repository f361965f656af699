"""The scale-out recipes in infra/ (compose, Kubernetes, SLURM, the image) are consistent.

None of them can run here (no Docker engine, no Kubernetes, no SLURM), so these tests check
what can be checked without them: the files parse; images are pinned and the project image is
built from infra/docker/Dockerfile the way the Makefile installs; every command, entry point
and environment variable they name exists (the settings module, the engines' own settings);
the workers get flows.cluster.WORKER_ENV; no secret has a literal value. The tests marked slow
run the recipes' own Dask and MLflow command lines on 127.0.0.1.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cluster import WORKER_ENV, free_port
from flows.settings import EMBEDDED_DEFAULTS, EXTERNAL, QUIET_DEFAULTS, SECRET_NAMES, SETTINGS

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKER = INFRA / "docker"
K8S = INFRA / "kubernetes"
SLURM = INFRA / "slurm"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
CONFIG = K8S / "config.yaml"
DASK_CLUSTER = K8S / "dask-cluster.yaml"
AUTOSCALER = K8S / "dask-autoscaler.yaml"
WORKER_VALUES = K8S / "prefect-worker-values.yaml"
DEPLOY_JOB = K8S / "mtag-deploy-job.yaml"
JOBQUEUE = SLURM / "jobqueue.yaml"
START_CLUSTER = SLURM / "start_cluster.py"
README = INFRA / "README.md"

RECIPE_YAML = [COMPOSE, CONFIG, DASK_CLUSTER, AUTOSCALER, WORKER_VALUES, DEPLOY_JOB, JOBQUEUE]
RECIPE_TEXT = [*RECIPE_YAML, DOCKERFILE, DOCKER / "mlflow.Dockerfile", ENV_EXAMPLE,
               START_CLUSTER, README]

# The deployments' flows (infra/deployments.py registers them; the recipes name them).
ENTRYPOINTS = ("flows/scheduled.py:scheduled_ingest", "flows/scheduled.py:scheduled_retrain",
               "flows/scheduled.py:scheduled_score")

PROJECT_NAMES = {s.env for s in (*SETTINGS, *EXTERNAL)}
# Variables of the engines themselves; MTAG_* and AWS_* get no prefix allowance: they must be
# names of the settings module.
ENGINE_PREFIXES = ("POSTGRES_", "MINIO_", "PREFECT_", "MLFLOW_", "DASK_", "SLURM_", "MALLOC_",
                   "PYTHON", "PIP_")
GENERIC_NAMES = {"PATH", "HOME", "TMPDIR", "VIRTUAL_ENV"}
SECRET_LIKE = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")
REQUIRED_VAR = re.compile(r"^\$\{([A-Z][A-Z0-9_]*):\?[^}]*\}$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# ---------------------------------------------------------------- helpers


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose() -> dict[str, Any]:
    return load(COMPOSE)


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_image() -> str:
    return f"mtag:{pyproject()['project']['version']}"


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's interpolation: ``${X}``, ``${X:-default}``, ``${X:?error}``, ``$$``."""
    env = env or {}

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg if op and op.endswith("-") else ""

    return INTERPOLATION.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


def mask_interpolations(value: str) -> tuple[str, list[str]]:
    """``value`` with each ``${...}`` replaced by ``\\0<i>\\0``, and the list of them."""
    parts: list[str] = []

    def sub(m: re.Match[str]) -> str:
        parts.append(m.group(0))
        return f"\0{len(parts) - 1}\0"

    return INTERPOLATION.sub(sub, value), parts


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def as_argv(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def walk(node: Any):  # type: ignore[no-untyped-def]
    """Every dict in a nested structure."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(doc: Any) -> list[dict[str, Any]]:
    return [c for d in walk(doc) for c in d.get("containers", []) if isinstance(c, dict)]


def k8s_images() -> set[str]:
    """Images of the Kubernetes containers (the job template's ``{{ image }}`` aside)."""
    return {c["image"] for doc in kubernetes_docs() for c in containers(doc)
            if "{{" not in c["image"]}


def strings(node: Any):  # type: ignore[no-untyped-def]
    """Every string value in a nested structure (what compose interpolates; not comments)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def compose_interpolations() -> list[re.Match[str]]:
    return [m for s in strings(compose()) for m in INTERPOLATION.finditer(s)]


def job_template() -> dict[str, Any]:
    values = load(WORKER_VALUES)
    return json.loads(values["worker"]["config"]["baseJobTemplate"]["configuration"])


def kubernetes_docs() -> list[Any]:
    docs = [d for path in (CONFIG, DASK_CLUSTER, AUTOSCALER, DEPLOY_JOB) for d in load_all(path)]
    return [*docs, load(WORKER_VALUES), job_template()]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in kubernetes_docs() if isinstance(d, dict) and d.get("kind") == kind]


def config_map() -> dict[str, Any]:
    (cm,) = by_kind("ConfigMap")
    return cm


def dask_cluster() -> dict[str, Any]:
    (cluster,) = by_kind("DaskCluster")
    return cluster


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    out = {}
    for instruction, args in dockerfile_instructions(path):
        if instruction == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            out[name] = value.strip('"')
    return out


def base_images(path: Path) -> list[str]:
    args = dockerfile_args(path)
    images = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction == "FROM":
            ref = rest.split()[0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], ref))
    return images


def pip_installs(path: Path = DOCKERFILE) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the Dockerfile, in order."""
    out = []
    for instruction, args in dockerfile_instructions(path):
        if instruction != "RUN":
            continue
        for part in re.split(r"&&|;|\bthen\b", args):
            words = part.split()
            if "pip" in words and "install" in words:
                rest = words[words.index("install") + 1:]
                out.append([w for w in rest if w not in ("-q", "--quiet", "fi")])
    return out


def is_pinned(image: str) -> bool:
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    if "@sha256:" in image:
        return True
    return ":" in last and last.rsplit(":", 1)[1] not in ("", "latest")


def env_names_set(path: Path) -> set[str]:
    """Names of the environment variables a recipe file sets or references."""
    text = path.read_text()
    names: set[str] = set()
    if path == COMPOSE:
        for service in services().values():
            names |= set(service_env(service))
        names |= {m.group(1) for m in compose_interpolations()}
        names |= {n for s in strings(compose()) for n in re.findall(r"\$\$\{?([A-Z]\w*)", s)}
    elif path == ENV_EXAMPLE:
        names |= set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
    elif path == JOBQUEUE:
        names |= set(re.findall(r"\bexport\s+([A-Z][A-Z0-9_]*)=", text))
        names |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
    elif path in (DOCKERFILE, DOCKER / "mlflow.Dockerfile"):
        for instruction, args in dockerfile_instructions(path):
            if instruction == "ENV":
                names |= set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", args))
    else:  # Kubernetes manifests and the Prefect base job template
        docs = load_all(path) if path != WORKER_VALUES else [load(path), job_template()]
        for doc in docs:
            for d in walk(doc):
                for item in d.get("env", []) if isinstance(d.get("env"), list) else []:
                    names.add(item["name"])
                if "secretKeyRef" in d:
                    names.add(d["secretKeyRef"]["key"])
            if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                names |= set(doc["data"])
        names |= set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", text))
    return names


def allowed(name: str) -> bool:
    if name in PROJECT_NAMES or name in WORKER_ENV or name in GENERIC_NAMES:
        return True
    if name in EMBEDDED_DEFAULTS or name in QUIET_DEFAULTS:
        return True
    if name.startswith(("MTAG_", "AWS_")):
        return False
    return name.startswith(ENGINE_PREFIXES)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def venv_program(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed beside {sys.executable}"
    return str(path)


# ---------------------------------------------------------------- files parse


def test_every_yaml_file_under_infra_parses():
    found = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
    assert set(RECIPE_YAML) <= set(found), "a recipe file is missing"
    for path in found:
        docs = load_all(path)
        assert docs, f"{path} holds no document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


def test_prefect_base_job_template_is_json_with_declared_variables():
    template = job_template()
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    # Prefect refuses a template whose placeholders are not declared variables
    assert used and used <= declared, sorted(used - declared)


# ---------------------------------------------------------------- images


def test_every_image_is_pinned():
    images = [s["image"] for s in services().values() if "image" in s]
    images += base_images(DOCKERFILE) + base_images(DOCKER / "mlflow.Dockerfile")
    values = load(WORKER_VALUES)["worker"]["image"]
    images.append(f"{values['repository']}:{values['prefectTag']}")
    images += sorted(k8s_images())
    images.append(job_template()["variables"]["properties"]["image"]["default"])
    assert len(images) > 10
    unpinned = [i for i in images if not is_pinned(i)]
    assert not unpinned, f"images without a fixed tag: {unpinned}"


def test_every_compose_service_has_an_image_and_builds_exist():
    for name, service in services().items():
        assert "image" in service, f"compose service {name} has no image"
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name


def test_project_image_is_built_from_infra_dockerfile_and_used_everywhere():
    image = project_image()
    builders = {n: s for n, s in services().items()
                if s.get("build", {}).get("dockerfile") == "infra/docker/Dockerfile"}
    assert len(builders) == 1, "exactly one service builds the project image"
    (service,) = builders.values()
    assert (COMPOSE.parent / service["build"]["context"]).resolve() == REPO
    assert DOCKERFILE.is_file()
    assert service["image"] == image
    for name in ("dask-scheduler", "dask-worker", "prefect-worker", "mtag"):
        assert services()[name]["image"] == image, name
    assert k8s_images() == {image}
    assert job_template()["variables"]["properties"]["image"]["default"] == image


def test_dockerfile_installs_like_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    (make_torch,) = re.findall(r"^TORCH_SPEC\s*\?=\s*(.+)$", makefile, re.M)
    assert dockerfile_args()["TORCH_SPEC"] == make_torch.strip()

    installs = pip_installs()
    steps = [i for i in installs if i != ["--upgrade", "pip"]]
    assert steps[0] == ["$TORCH_SPEC"], "torch first and alone"
    assert steps[1] == ["-c", "constraints.txt", "."], "then the project, constrained"
    for later in steps[2:]:
        assert later[:2] == ["-c", "constraints.txt"], f"unconstrained install {later}"
    assert installs.index(steps[0]) < installs.index(steps[1])


def test_dockerfile_copies_every_package_of_pyproject():
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*").rstrip(".") for p in include}
    copied: set[str] = set()
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            copied |= {Path(s).name for s in args.split()[:-1] if not s.startswith("--")}
    missing = (packages | {"pyproject.toml", "constraints.txt", "README.md"}) - copied
    assert not missing, f"not copied into the image: {sorted(missing)}"
    # and the Dockerfile's own ignore file does not keep them out of the build context
    ignore = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "everything is excluded first"
    assert {f"!{p}" for p in copied} <= set(ignore)


def test_dockerfile_base_user_and_entrypoint():
    (base,) = base_images(DOCKERFILE)
    match = re.fullmatch(r"python:(3\.\d+)(?:\.\d+)?-slim(?:-\w+)?", base)
    assert match, base
    from packaging.specifiers import SpecifierSet

    assert f"{match.group(1)}.0" in SpecifierSet(pyproject()["project"]["requires-python"])
    assert match.group(1) == "3.11"
    users = [args for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root user (runAsNonRoot)"
    # Kubernetes args, compose commands and Prefect's jobs give the whole command line
    assert "ENTRYPOINT" not in {i for i, _ in dockerfile_instructions()}


# ---------------------------------------------------------------- commands and entry points


def recipe_commands() -> list[list[str]]:
    project = project_image()
    out = []
    for service in services().values():
        if service.get("image") == project or service.get("build"):
            argv = as_argv(service.get("entrypoint")) + as_argv(service.get("command"))
            out.append([interpolate(a) for a in argv])
    for doc in kubernetes_docs():
        for c in containers(doc):
            if c.get("args") and "{{" not in json.dumps(c["args"]):
                out.append(as_argv(c.get("command")) + as_argv(c["args"]))
    return out


def test_commands_named_in_recipes_exist():
    from flows.cli import build_parser

    scripts = pyproject()["project"]["scripts"]
    assert scripts.get("mtag") == "flows.cli:entry"
    console = {e.name for e in importlib.metadata.entry_points(group="console_scripts")}
    dask_cli = {e.name for e in importlib.metadata.entry_points(group="dask_cli")}
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    commands = recipe_commands()
    programs = {argv[0] for argv in commands}
    assert {"mtag", "dask", "prefect", "mlflow"} <= programs
    for argv in commands:
        assert argv[0] in console, f"{argv[0]} is not a console script of the environment"
        if argv[0] == "mtag" and argv[1] != "--help":
            assert argv[1] in subparsers.choices, f"mtag has no command {argv[1]!r}"
        if argv[0] == "dask":
            assert argv[1] in dask_cli, f"dask has no command {argv[1]!r}"
    # the operator's examples say dask-worker/dask-scheduler: those scripts are gone
    assert not {"dask-worker", "dask-scheduler"} & programs


def test_deployment_entrypoints_are_named_and_exist():
    readme = README.read_text()
    for entrypoint in ENTRYPOINTS:
        assert re.fullmatch(r"flows/\w+\.py:\w+", entrypoint)
        assert entrypoint in readme, f"infra/README.md does not name {entrypoint}"
    # the deployments module registers exactly these
    registered = set(re.findall(r"flows/\w+\.py:\w+", (INFRA / "deployments.py").read_text()))
    assert registered == set(ENTRYPOINTS)
    path = REPO / ENTRYPOINTS[0].partition(":")[0]
    assert path.is_file(), f"{path} does not exist"
    defined = {n.name for n in ast.walk(ast.parse(path.read_text()))
               if isinstance(n, ast.FunctionDef)}
    assert {e.partition(":")[2] for e in ENTRYPOINTS} <= defined


# ---------------------------------------------------------------- environment variables


def test_environment_variable_names_are_settings_or_engine_variables():
    per_file = {path: env_names_set(path) for path in
                [COMPOSE, ENV_EXAMPLE, CONFIG, DASK_CLUSTER, DEPLOY_JOB, WORKER_VALUES,
                 JOBQUEUE, DOCKERFILE]}
    assert {"MTAG_STORE", "PREFECT_API_URL", "AWS_SECRET_ACCESS_KEY"} <= per_file[COMPOSE]
    assert {"MTAG_DASK_ADDRESS", "MTAG_WORK_POOL"} <= per_file[CONFIG]
    assert set(WORKER_ENV) <= per_file[JOBQUEUE]
    bad = {str(p.relative_to(REPO)): sorted(n for n in names if not allowed(n))
           for p, names in per_file.items()}
    assert not any(bad.values()), f"not a setting nor an engine variable: {bad}"


def test_project_names_mentioned_in_recipes_are_settings():
    for path in RECIPE_TEXT:
        for name in re.findall(r"\b(?:MTAG|AWS)_[A-Z0-9_]+", path.read_text()):
            if name.endswith("_"):  # a pattern such as MTAG_*_CRON
                continue
            assert name in PROJECT_NAMES, f"{path.relative_to(REPO)} names unknown {name}"


def test_engine_variables_are_known_to_their_engine():
    import mlflow.environment_variables as mlflow_env
    from mlflow.cli import server as mlflow_server
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    prefect_names = set(_get_settings_fields(Settings))
    mlflow_names = {v.name for v in vars(mlflow_env).values() if hasattr(v, "name")
                    and isinstance(getattr(v, "name", None), str)}
    mlflow_names |= {p.envvar for p in mlflow_server.params if isinstance(p.envvar, str)}
    names = set().union(*(env_names_set(p) for p in
                          (COMPOSE, CONFIG, DASK_CLUSTER, WORKER_VALUES, DEPLOY_JOB)))
    prefect_used = {n for n in names if n.startswith("PREFECT_")}
    mlflow_used = {n for n in names if n.startswith("MLFLOW_")} - PROJECT_NAMES
    assert prefect_used and mlflow_used
    assert prefect_used <= prefect_names, sorted(prefect_used - prefect_names)
    assert mlflow_used <= mlflow_names, sorted(mlflow_used - mlflow_names)


def test_worker_env_in_every_worker_definition():
    worker = service_env(services()["dask-worker"])
    assert {k: worker.get(k) for k in WORKER_ENV} == WORKER_ENV

    (container,) = dask_cluster()["spec"]["worker"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: env.get(k) for k in WORKER_ENV} == WORKER_ENV

    prologue = load(JOBQUEUE)["jobqueue"]["slurm"]["job-script-prologue"]
    exports = dict(re.findall(r"^export ([A-Z_]+)=(\S+)$", "\n".join(prologue), re.M))
    assert {k: exports.get(k) for k in WORKER_ENV} == WORKER_ENV
    assert any(re.match(r"source \S*/bin/activate", line) for line in prologue)


# ---------------------------------------------------------------- secrets


def test_compose_secrets_come_from_required_variables():
    secret_values = url_passwords = 0
    for name, service in services().items():
        for key, value in service_env(service).items():
            if key in SECRET_NAMES or SECRET_LIKE.search(key):
                assert REQUIRED_VAR.match(value), f"{name}: {key} must be ${{VAR:?...}}"
                secret_values += 1
            # a password inside a URL must be one required variable, nothing literal
            masked, parts = mask_interpolations(value)
            for password in re.findall(r"://[^/:@\s]+:([^@\s/]+)@", masked):
                index = re.fullmatch(r"\0(\d+)\0", password)
                assert index, f"{name}: {key} has a literal password"
                assert REQUIRED_VAR.match(parts[int(index.group(1))]), f"{name}: {key}"
                url_passwords += 1
    assert secret_values >= 8
    assert url_passwords == 2  # Prefect's and MLflow's database URLs
    for m in compose_interpolations():
        if m.group(1) in SECRET_NAMES or SECRET_LIKE.search(m.group(1)):
            assert m.group(2) == ":?", f"{m.group(0)}: a secret never has a default"


def test_env_example_lists_every_compose_variable_with_placeholders():
    text = ENV_EXAMPLE.read_text()
    example = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M))
    used = {m.group(1) for m in compose_interpolations()}
    required = {m.group(1) for m in compose_interpolations() if m.group(2) == ":?"}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD"} <= required
    assert used <= set(example), sorted(used - set(example))
    for name in required:
        assert "change-me" in example[name], f"{name}: example values only"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    # compose runs with the example values: nothing required is left out
    for service in services().values():
        for value in service_env(service).values():
            interpolate(value, example)


def test_kubernetes_secrets_only_by_secret_key_ref():
    assert not by_kind("Secret"), "no Secret is committed; README documents kubectl create"
    cm = config_map()
    assert not [k for k in cm["data"] if k in SECRET_NAMES or SECRET_LIKE.search(k)]
    refs = 0
    for doc in kubernetes_docs():
        for d in walk(doc):
            for item in d.get("env", []) if isinstance(d.get("env"), list) else []:
                if item["name"] in SECRET_NAMES or SECRET_LIKE.search(item["name"]):
                    assert "value" not in item, f"literal secret {item['name']}"
                    ref = item["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "mtag-secrets" and ref["key"] == item["name"]
                    refs += 1
    assert refs >= 4  # Dask workers and Prefect flow-run jobs: both keys
    for value in map(str, cm["data"].values()):
        assert not re.search(r"://[^/\s]+:[^@/\s]+@", value), "credentials in a URL"
    command = "kubectl -n mtag create secret generic mtag-secrets"
    assert command in README.read_text() and command in CONFIG.read_text()


# ---------------------------------------------------------------- consistency


def test_compose_urls_point_at_services_and_ports():
    svc = services()
    env = service_env(svc["prefect-worker"])
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                "MTAG_DASK_ADDRESS"):
        m = re.match(r"\w+://([\w-]+):(\d+)", env[key])
        assert m, f"{key}={env[key]}"
        host, port = m.groups()
        assert host in svc, f"{key}: no service {host}"
        argv = as_argv(svc[host].get("command"))
        assert any(a == port or a.endswith(f":{port}") for a in argv), f"{key}: port {port}"
    mlflow_env = service_env(svc["mlflow"])
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # the MLflow server accepts the Host header the other containers send
    argv = as_argv(svc["mlflow"]["command"])
    hosts = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:*" in hosts and "localhost:*" in hosts


def test_compose_buckets_are_created():
    buckets = {b for s in strings(compose()) for b in re.findall(r"s3://([a-z0-9.-]+)", s)}
    init = "\n".join(as_argv(services()["minio-init"]["command"]))
    created = set(re.findall(r"mc mb --ignore-existing local/([a-z0-9.-]+)", init))
    assert buckets and buckets <= created, sorted(buckets - created)


def test_work_pool_is_named_consistently():
    default = next(s.default for s in SETTINGS if s.env == "MTAG_WORK_POOL")
    svc = services()
    expected = "${MTAG_WORK_POOL:-" + str(default) + "}"
    assert svc["prefect-worker"]["environment"]["MTAG_WORK_POOL"] == expected
    argv = as_argv(svc["prefect-worker"]["command"])
    assert argv[:3] == ["prefect", "worker", "start"]
    assert argv[argv.index("--pool") + 1] == expected
    assert argv[argv.index("--type") + 1] == "process"
    values = load(WORKER_VALUES)["worker"]
    assert values["config"]["type"] == "kubernetes"
    assert values["config"]["workPool"] == config_map()["data"]["MTAG_WORK_POOL"]
    assert values["apiConfig"] == "server"
    assert values["serverApiConfig"]["apiUrl"] == config_map()["data"]["PREFECT_API_URL"]


def test_kubernetes_names_agree():
    cluster = dask_cluster()
    name = cluster["metadata"]["name"]
    ports = {p["name"]: p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert config_map()["data"]["MTAG_DASK_ADDRESS"] == f"tcp://{name}-scheduler:{ports['tcp-comm']}"
    (autoscaler,) = by_kind("DaskAutoscaler")
    assert autoscaler["spec"]["cluster"] == name
    assert 0 < autoscaler["spec"]["minimum"] <= autoscaler["spec"]["maximum"]
    cm_name = config_map()["metadata"]["name"]
    refs = [d["configMapRef"]["name"] for doc in kubernetes_docs() for d in walk(doc)
            if "configMapRef" in d]
    assert len(refs) >= 4 and set(refs) == {cm_name}
    namespace = job_template()["variables"]["properties"]["namespace"]["default"]
    assert f"-n {namespace}" in README.read_text()


def test_dask_cluster_spec():
    spec = dask_cluster()["spec"]
    assert dask_cluster()["apiVersion"] == "kubernetes.dask.org/v1"
    # the fields the operator's CRD requires
    assert {"scheduler", "worker"} <= set(spec)
    assert {"spec", "service"} <= set(spec["scheduler"]) and "spec" in spec["worker"]
    (worker,) = spec["worker"]["spec"]["containers"]
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    assert worker["args"][:2] == ["dask", "worker"]
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    for c in (worker, scheduler):
        assert {"requests", "limits"} <= set(c["resources"]), c["name"]
        assert c["envFrom"][0]["configMapRef"]["name"] == config_map()["metadata"]["name"]
    probe_ports = {p["name"] for p in scheduler["ports"]}
    assert scheduler["readinessProbe"]["httpGet"]["port"] in probe_ports
    assert scheduler["readinessProbe"]["httpGet"]["path"] == "/health"


def test_prefect_job_template_runs_the_project_image_with_the_settings():
    from prefect.utilities.templating import apply_values

    template = job_template()
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items()
                if "default" in v}
    job = apply_values(template["job_configuration"], defaults)
    (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == project_image()
    assert container["envFrom"] == [{"configMapRef": {"name": "mtag-config"}}]
    assert {e["name"] for e in container["env"]} == {"AWS_ACCESS_KEY_ID",
                                                    "AWS_SECRET_ACCESS_KEY"}
    assert container["resources"]["requests"]["memory"]


def test_slurm_config():
    slurm = load(JOBQUEUE)["jobqueue"]["slurm"]
    assert slurm["cores"] == slurm["processes"], "one thread per worker process"
    assert re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]i?B", slurm["memory"])
    assert re.fullmatch(r"\d+:\d\d:\d\d", slurm["walltime"])
    assert "job-script-prologue" in slurm and "job_script_prologue" not in slurm


def load_start_cluster(monkeypatch: pytest.MonkeyPatch) -> Any:
    # None in sys.modules makes `import dask_jobqueue` fail, installed or not
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    spec = importlib.util.spec_from_file_location("mtag_start_cluster", START_CLUSTER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_start_cluster_imports_without_dask_jobqueue(monkeypatch, capsys):
    module = load_start_cluster(monkeypatch)
    assert module.load_config()["jobqueue"]["slurm"]["processes"] >= 1
    with pytest.raises(SystemExit) as exc:
        module.main(["--print-job-script"])
    assert "pip install dask-jobqueue" in str(exc.value)
    args = module.build_parser().parse_args(["--jobs", "3", "--queue", "gpu"])
    assert (args.jobs, args.queue) == (3, "gpu")
    text = START_CLUSTER.read_text()
    assert 'if __name__ == "__main__":' in text
    assert "MTAG_DASK_ADDRESS=" in text
    assert "dask-jobqueue" not in json.dumps(pyproject()["project"])


def test_flows_do_not_import_the_recipes():
    for package in ("flows", "tasks", "featurestore", "training"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "start_cluster" not in text and "dask_jobqueue" not in text, path


def test_readme_documents_every_recipe():
    text = README.read_text()
    for needle in ("docker compose", "up -d", "helm install", "prefect-worker-values.yaml",
                   "kubectl -n mtag apply -f infra/kubernetes/dask-cluster.yaml",
                   "python infra/slurm/start_cluster.py", "pip install dask-jobqueue",
                   "--dask-address", "mtag deploy", "not run"):
        assert needle in text, f"infra/README.md does not say {needle!r}"
    for path in re.findall(r"(?<![\w/])infra/[\w./-]+\w", text):
        assert (REPO / path).exists(), f"infra/README.md names missing {path}"


# ---------------------------------------------------------------- the command lines, run


@pytest.mark.slow
def test_compose_dask_commands_run_and_workers_get_worker_env(tmp_path):
    """The compose scheduler and worker command lines, and the DaskCluster worker's, run on
    127.0.0.1 with their workers' environment."""
    svc = services()
    port, dashboard = free_port(), free_port()
    sched = [interpolate(a) for a in as_argv(svc["dask-scheduler"]["command"])]
    sched = [{"0.0.0.0": "127.0.0.1", "8786": str(port),
              ":8787": f"127.0.0.1:{dashboard}"}.get(a, a) for a in sched]
    argv = [interpolate(a) for a in as_argv(svc["dask-worker"]["command"])]
    nworkers = int(argv[argv.index("--nworkers") + 1])
    argv = [f"tcp://127.0.0.1:{port}" if a == "tcp://dask-scheduler:8786" else a for a in argv]
    example = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M))
    worker_env = {k: interpolate(v, example) for k, v in service_env(svc["dask-worker"]).items()}
    env = {**os.environ, **worker_env, "DASK_TEMPORARY_DIRECTORY": str(tmp_path)}
    dask = venv_program("dask")
    procs = [subprocess.Popen([dask, *sched[1:]], start_new_session=True, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask, *argv[1:], "--host", "127.0.0.1"],
                                      start_new_session=True, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # the DaskCluster worker: the operator sets DASK_SCHEDULER_ADDRESS and DASK_WORKER_NAME
        (k8s,) = dask_cluster()["spec"]["worker"]["spec"]["containers"]
        k8s_env = {e["name"]: e["value"] for e in k8s["env"] if "value" in e}
        k8s_argv = [{"$(DASK_WORKER_NAME)": "k8s-worker", "8788": str(free_port())}.get(a, a)
                    for a in k8s["args"]]
        procs.append(subprocess.Popen(
            [dask, *k8s_argv[1:], "--host", "127.0.0.1"], start_new_session=True,
            env={**os.environ, **k8s_env, "DASK_TEMPORARY_DIRECTORY": str(tmp_path),
                 "DASK_SCHEDULER_ADDRESS": f"tcp://127.0.0.1:{port}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        nworkers += 1
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout="60s") as client:
            client.wait_for_workers(nworkers, timeout=90)
            workers = client.scheduler_info(n_workers=-1)["workers"]
            assert {w["nthreads"] for w in workers.values()} == {1}
            assert "k8s-worker" in {w["name"] for w in workers.values()}
            seen = client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENV})
            assert len(seen) == nworkers
            assert all(v == WORKER_ENV for v in seen.values()), seen
        # the health path of the compose healthcheck and the Kubernetes probes
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.mark.slow
def test_recipe_command_line_flags_exist():
    """Every --flag of the recipes' dask, prefect and mlflow command lines is in its --help."""
    flags: dict[tuple[str, ...], set[str]] = {}
    # the Prefect server image runs the same Prefect version as this environment
    server = as_argv(services()["prefect-server"]["command"])
    for argv in [*recipe_commands(), server]:
        if argv[0] == "mtag":
            continue
        depth = 3 if argv[0] == "prefect" else 2
        flags.setdefault(tuple(argv[:depth]), set()).update(
            a.split("=")[0] for a in argv if a.startswith("--"))
    checked = set()
    for key, used in flags.items():
        out = subprocess.run([venv_program(key[0]), *key[1:], "--help"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        missing = sorted(f for f in used if f not in out.stdout)
        assert not missing, f"{' '.join(key)} has no {missing}"
        checked.add(key)
    assert {("dask", "worker"), ("dask", "scheduler"), ("prefect", "worker", "start"),
            ("prefect", "server", "start"), ("mlflow", "server")} <= checked
