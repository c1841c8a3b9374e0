"""The deployment files under clusters/ and infra/: valid, consistent with the repo, and free of secrets.

* every YAML file parses;
* the Ray cluster launcher files validate against Ray's own cluster schema (ray-schema.json) and
  survive Ray's offline config preparation (defaults merged, then validated as `ray up` does);
* launcher shape: a head with 0 CPUs and no GPU, GPU worker types from 0 nodes, a spot/preemptible
  variant, an idle timeout, IAM/service-account access instead of keys, GPU counts that match the
  machines;
* KubeRay: kinds and apiVersions, in-tree autoscaling, a head with num-cpus "0" and no GPU, a GPU
  worker group from 0 replicas with GPU limits, credentials only from Secrets, and a RayJob that runs
  pipelines/full.py with the RayCluster's spec embedded unchanged;
* Ray Serve: pipelines/configs/serve.yaml and the RayService's serveConfigV2 validate against Serve's own
  config schema (ServeDeploySchema) with no key it would ignore, import the app builder from a module of
  this repository, load a duet config that exists and takes their overrides, and listen where that
  config says; the RayService's pods get MLflow, S3 and the bearer token from Secrets, and its GPU
  workers start at 0 and can hold serve.max_replicas replicas;
* infra: the Dockerfile installs torch (the project's pin) before DeepSpeed, DeepSpeed with
  --no-build-isolation, then the project; the compose MLflow server runs with basic auth, a Postgres
  backend and S3 artifacts on MinIO; the MLflow entrypoint renders a working auth config;
* every repository path these files mention exists, and no file holds anything that looks like a
  credential.
"""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = ["clusters/aws/gpu-autoscaling.yaml", "clusters/gcp/gpu-autoscaling.yaml"]
RAYCLUSTER = "clusters/kuberay/raycluster.yaml"
RAYJOB = "clusters/kuberay/rayjob-full.yaml"
RAYSERVICE = "clusters/kuberay/rayservice.yaml"
KUBERAY_FILES = [RAYCLUSTER, RAYJOB, RAYSERVICE]
SERVE_CONFIG = "pipelines/configs/serve.yaml"
COMPOSE = "infra/docker-compose.yaml"
DOCKERFILE = "infra/Dockerfile"
MLFLOW_DIR = "infra/mlflow"

# GPUs per machine type named in the launcher files (a resources entry must match the machine).
GPUS_PER_MACHINE = {
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "g6e.12xlarge": 4,
    "a2-highgpu-1g": 1,
    "a2-highgpu-4g": 4,
    "a2-highgpu-8g": 8,
    "g2-standard-48": 4,
    "g2-standard-96": 8,
}


def _load(rel: str) -> Any:
    return yaml.safe_load((ROOT / rel).read_text())


def _deployment_files() -> list[Path]:
    files = [p for d in ("clusters", "infra") for p in sorted((ROOT / d).rglob("*")) if p.is_file()]
    files += [ROOT / ".dockerignore", ROOT / SERVE_CONFIG]
    return [p for p in files if "__pycache__" not in p.parts]


def _yaml_files() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in _deployment_files() if p.suffix in (".yaml", ".yml")]


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pyproject_pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no exact {name} version")


# ---------------------------------------------------------------- every file


def test_deployment_yaml_files_are_found() -> None:
    expected = set(LAUNCHER_FILES) | set(KUBERAY_FILES) | {COMPOSE, SERVE_CONFIG}
    assert expected <= set(_yaml_files())


@pytest.mark.parametrize("rel", _yaml_files())
def test_yaml_parses(rel: str) -> None:
    documents = list(yaml.safe_load_all((ROOT / rel).read_text()))
    assert documents and all(isinstance(doc, dict) for doc in documents), f"{rel}: expected mapping documents"


# ---------------------------------------------------------------- Ray cluster launcher


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_matches_ray_schema(rel: str) -> None:
    jsonschema.validate(_load(rel), _ray_schema())


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_survives_ray_config_preparation(rel: str) -> None:
    """Defaults merged and validated the way `ray up` does before it calls the cloud."""
    prepared = prepare_config(copy.deepcopy(_load(rel)))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def _node_types(cfg: dict) -> tuple[dict, dict[str, dict]]:
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    return head, workers


def _is_spot(cfg: dict, node_type: dict) -> bool:
    node = node_type["node_config"]
    if cfg["provider"]["type"] == "aws":
        return node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_head_runs_no_training(rel: str) -> None:
    cfg = _load(rel)
    head, _ = _node_types(cfg)
    assert head["resources"].get("CPU") == 0, "the head must advertise 0 CPUs: no task or train worker there"
    assert head["resources"].get("GPU", 0) == 0
    node = head["node_config"]
    assert "guestAccelerators" not in node
    assert not str(node.get("InstanceType", "")).startswith(("p", "g")), "the head is a CPU machine"


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_gpu_workers_scale_from_zero_with_spot_variant(rel: str) -> None:
    cfg = _load(rel)
    _, workers = _node_types(cfg)
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, node_type in gpu_types.items():
        assert node_type.get("min_workers", 0) == 0, f"{name}: GPU workers must start from 0 nodes"
        assert node_type.get("max_workers", 0) >= 1, f"{name}: must be allowed to scale up"
    spot = [name for name, t in gpu_types.items() if _is_spot(cfg, t)]
    on_demand = [name for name, t in gpu_types.items() if not _is_spot(cfg, t)]
    assert spot and on_demand, "expected an on-demand and a spot/preemptible GPU type"
    assert cfg["idle_timeout_minutes"] > 0
    assert 1 <= cfg["max_workers"] <= sum(t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_gpu_resources_match_machines(rel: str) -> None:
    cfg = _load(rel)
    _, workers = _node_types(cfg)
    for name, node_type in workers.items():
        node = node_type["node_config"]
        machine = node.get("InstanceType") or node.get("machineType")
        assert machine in GPUS_PER_MACHINE, f"{name}: add {machine} to GPUS_PER_MACHINE"
        assert node_type["resources"]["GPU"] == GPUS_PER_MACHINE[machine], name
        for accelerator in node.get("guestAccelerators", []):
            assert accelerator["acceleratorCount"] == node_type["resources"]["GPU"], name
        if cfg["provider"]["type"] == "gcp":
            maintenance = node["scheduling"]["onHostMaintenance"]
            assert maintenance == "TERMINATE", f"{name}: GPU VMs cannot live-migrate"


def test_aws_nodes_use_instance_profiles_not_keys() -> None:
    cfg = _load(LAUNCHER_FILES[0])
    for name, node_type in cfg["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: needs an instance profile"
    text = (ROOT / LAUNCHER_FILES[0]).read_text()
    assert "AWS_ACCESS_KEY_ID" not in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_gcp_workers_have_a_service_account() -> None:
    cfg = _load(LAUNCHER_FILES[1])
    _, workers = _node_types(cfg)
    for name, node_type in workers.items():
        accounts = node_type["node_config"].get("serviceAccounts")
        assert accounts and accounts[0]["email"].endswith(".iam.gserviceaccount.com"), name


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_env_file_is_written_before_the_container_reads_it(rel: str) -> None:
    """The container's --env-file must be the file the initialization commands write on that node."""
    cfg = _load(rel)
    docker = cfg["docker"]
    head_options = " ".join(docker.get("run_options", []) + docker.get("head_run_options", []))
    worker_options = " ".join(docker.get("run_options", []) + docker.get("worker_run_options", []))
    env_file = re.search(r"--env-file\s+(\S+)", head_options)
    assert env_file, "the head container gets its MLflow settings through --env-file"
    path = env_file.group(1)
    assert any(path in cmd for cmd in cfg["initialization_commands"]), "head never writes its env file"
    for name, node_type in _node_types(cfg)[1].items():
        commands = node_type.get("initialization_commands", cfg["initialization_commands"])
        if path in worker_options:
            assert any(path in cmd for cmd in commands), f"{name}: reads {path} but never writes it"
    for cmd in cfg["initialization_commands"]:
        if path in cmd:
            assert "umask 077" in cmd, "the env file holds credentials: write it private"


@pytest.mark.parametrize("rel", LAUNCHER_FILES)
def test_launcher_image_is_marked_for_the_user(rel: str) -> None:
    line = next(line for line in (ROOT / rel).read_text().splitlines() if line.strip().startswith("image:"))
    assert "set me" in line


# ---------------------------------------------------------------- KubeRay


def _ray_containers(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return [(group, c) for group, pod in pods for c in pod["spec"]["containers"]]


def _cluster_spec(rel: str) -> dict:
    """The RayCluster spec of a KubeRay file: its own, a RayJob's rayClusterSpec, a RayService's rayClusterConfig."""
    doc = _load(rel)
    assert doc["apiVersion"] == "ray.io/v1", rel
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[doc["kind"]]
    return doc["spec"][key] if key else doc["spec"]


@pytest.mark.parametrize("rel", [RAYCLUSTER, RAYSERVICE])
def test_raycluster_autoscales_gpu_workers_from_zero(rel: str) -> None:
    spec = _cluster_spec(rel)
    assert spec["enableInTreeAutoscaling"] is True
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert str(spec["rayVersion"]).startswith(major_minor), "rayVersion must match the Ray the project pins"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must run no training"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in key for part in head_resources.values() for key in part)
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpu_limit(g) >= 1]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0
        assert group["maxReplicas"] >= 1
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert str(resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])) == str(
            resources["limits"]["nvidia.com/gpu"]
        )


def _gpu_limit(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_raycluster_env_reaches_mlflow_and_s3_with_secrets_only() -> None:
    spec = _load(RAYCLUSTER)["spec"]
    secret_like = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|USERNAME")
    for group, container in _ray_containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "AWS_ENDPOINT_URL_S3" in env, group
        for name, entry in env.items():
            if secret_like.search(name):
                assert "value" not in entry, f"{group}: {name} must come from a Secret"
                assert "secretKeyRef" in entry["valueFrom"], f"{group}: {name} must come from a Secret"
    head_env = {e["name"]: e for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["MLFLOW_TRACKING_URI"]["value"].startswith(("http://", "https://"))
    assert "MLFLOW_TRACKING_PASSWORD" in head_env or "MLFLOW_TRACKING_TOKEN" in head_env


def test_kuberay_images_are_one_image_marked_for_the_user() -> None:
    images = set()
    for rel in KUBERAY_FILES:
        for line in (ROOT / rel).read_text().splitlines():
            if line.strip().startswith("image:"):
                assert "set me" in line, f"{rel}: {line.strip()}"
                images.add(line.split("image:", 1)[1].split("#", 1)[0].strip())
    launcher_images = {_load(rel)["docker"]["image"] for rel in LAUNCHER_FILES}
    assert len(images | launcher_images) == 1, "every cluster file should name the same duet image"


def test_no_kubernetes_secret_is_committed() -> None:
    for rel in KUBERAY_FILES:
        for doc in yaml.safe_load_all((ROOT / rel).read_text()):
            assert doc["kind"] != "Secret", f"{rel}: Secrets are created by the user, never committed"


def test_rayjob_runs_the_full_pipeline_on_the_same_cluster_spec() -> None:
    job = _load(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full.py"], argv
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"RayJob config {config} does not exist"
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app", "the image keeps the repository in /app (infra/Dockerfile)"
    assert "WORKDIR /app" in (ROOT / DOCKERFILE).read_text()
    assert spec["rayClusterSpec"] == _load(RAYCLUSTER)["spec"], "rayjob-full.yaml drifted from raycluster"


def test_rayjob_entrypoint_script_exists() -> None:
    """pipelines/full.py is the RayJob's entrypoint (and the launcher README's job)."""
    assert (ROOT / "pipelines" / "full.py").is_file()


_SECRET_LIKE_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY|USERNAME")


@pytest.mark.parametrize("rel", KUBERAY_FILES)
def test_kuberay_credentials_come_only_from_secrets(rel: str) -> None:
    for group, container in _ray_containers(_cluster_spec(rel)):
        for entry in container.get("env", []):
            if _SECRET_LIKE_ENV.search(entry["name"]):
                assert "value" not in entry, f"{rel} {group}: {entry['name']} must come from a Secret"
                assert set(entry["valueFrom"]) == {"secretKeyRef"}, f"{rel} {group}: {entry['name']}"


# ---------------------------------------------------------------- Ray Serve

SERVE_FILES = [SERVE_CONFIG, RAYSERVICE]
APP_BUILDER = "components.serve.app:app_builder"
IMAGE_REPO = "/app"  # where infra/Dockerfile puts the repository (its WORKDIR)
# Every RayService pod: the app builder (head) and the replicas (workers) resolve and load registry models.
SERVE_POD_ENV = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
]


def _serve_config(rel: str) -> dict:
    doc = _load(rel)
    if rel == RAYSERVICE:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
        assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
        return yaml.safe_load(doc["spec"]["serveConfigV2"])
    return doc


def _duet_app(rel: str) -> dict:
    (app,) = _serve_config(rel)["applications"]
    return app


def _repo_config_path(rel: str, config: str) -> Path:
    """The repository file an app's args.config names: the RayService's is inside the image."""
    if rel == RAYSERVICE:
        assert config.startswith(f"{IMAGE_REPO}/"), f"{config}: a config inside the image, under /app"
        assert f"WORKDIR {IMAGE_REPO}" in (ROOT / DOCKERFILE).read_text()
        return ROOT / config.removeprefix(f"{IMAGE_REPO}/")
    assert not Path(config).is_absolute(), f"{config}: relative to the repository root"
    return ROOT / config


def _duet_config(rel: str):
    from components.config import load_config

    args = _duet_app(rel)["args"]
    return load_config(_repo_config_path(rel, args["config"]), args.get("overrides", []))


@pytest.mark.parametrize("rel", SERVE_FILES)
def test_serve_config_matches_ray_serve_schema(rel: str) -> None:
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    raw = _serve_config(rel)
    schema = ServeDeploySchema.model_validate(raw)
    # The schema ignores keys it does not know (forward compatibility): a misspelt one would be dropped.
    unknown = set(raw) - set(ServeDeploySchema.model_fields)
    unknown |= set(raw["http_options"]) - set(HTTPOptionsSchema.model_fields)
    for app in raw["applications"]:
        unknown |= set(app) - set(ServeApplicationSchema.model_fields)
    assert not unknown, f"{rel}: keys Serve does not know: {sorted(unknown)}"
    (app,) = schema.applications
    assert app.name == "duet" and app.route_prefix == "/" and app.import_path == APP_BUILDER
    assert not app.deployments, "the app builder sets replicas and resources from the config's serve section"
    assert set(app.args) <= {"config", "model", "overrides"}, f"{rel}: args are config, model, overrides"
    assert all(isinstance(o, str) and "=" in o for o in app.args.get("overrides", [])), "overrides: KEY=VALUE"


@pytest.mark.parametrize("rel", SERVE_FILES)
def test_serve_import_path_is_a_module_of_the_repository(rel: str) -> None:
    module, attribute = _duet_app(rel)["import_path"].split(":")
    assert attribute.isidentifier()
    path = ROOT.joinpath(*module.split("."))
    assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), f"{rel}: no module {module}"


@pytest.mark.parametrize("rel", SERVE_FILES)
def test_serve_app_loads_its_duet_config_and_listens_where_it_says(rel: str) -> None:
    app = _duet_app(rel)
    config = app["args"]["config"]
    assert _repo_config_path(rel, config).is_file(), f"{rel}: config {config} does not exist"
    cfg = _duet_config(rel)  # validates the overrides too
    http = _serve_config(rel)["http_options"]
    assert (http["host"], http["port"]) == (cfg.serve.host, cfg.serve.port), (
        f"{rel}: http_options and the config's serve.host/serve.port disagree"
    )
    if "model" in app["args"]:
        assert app["args"]["model"] == f"models:/{cfg.registry.model_name}@{cfg.registry.alias}", rel


def test_local_serve_config_stays_on_this_machine() -> None:
    assert _serve_config(SERVE_CONFIG)["http_options"]["host"] == "127.0.0.1"
    assert _duet_app(SERVE_CONFIG)["args"]["config"] == "pipelines/configs/demo.yaml"


def test_rayservice_listens_in_the_pod_and_requires_the_token_from_a_secret() -> None:
    cfg = _duet_config(RAYSERVICE)
    assert cfg.serve.host == "0.0.0.0" and _serve_config(RAYSERVICE)["http_options"]["host"] == "0.0.0.0"
    assert cfg.serve.api_key_env == "DUET_API_KEY"
    spec = _cluster_spec(RAYSERVICE)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {port["name"]: port["containerPort"] for port in head["ports"]}
    assert head_ports.get("serve") == cfg.serve.port, "KubeRay's serve service targets the head's serve port"
    for group, container in _ray_containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        token = env.get(cfg.serve.api_key_env)
        assert token, f"{group}: {cfg.serve.api_key_env} missing"
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["key"] and not ref.get("optional", False), f"{group}: the token is required"
        missing = set(SERVE_POD_ENV) - set(env)
        assert not missing, f"{group}: {sorted(missing)} missing"


def test_rayservice_gpu_workers_hold_the_most_replicas_serve_asks_for() -> None:
    cfg = _duet_config(RAYSERVICE)
    spec = _cluster_spec(RAYSERVICE)
    gpus = sum(g["maxReplicas"] * _gpu_limit(g) for g in spec["workerGroupSpecs"])
    # The builder decides GPU or not when it runs, before any GPU pod exists: "auto" would answer no.
    assert cfg.eval.use_gpu is True, "set eval.use_gpu=true in the overrides: the GPU pods start at 0"
    needed = cfg.serve.max_replicas * cfg.eval.gpus_per_replica
    assert gpus >= needed, f"{gpus} GPUs at most for serve.max_replicas x eval.gpus_per_replica = {needed}"
    assert spec["rayVersion"] == _cluster_spec(RAYCLUSTER)["rayVersion"]
    assert spec["autoscalerOptions"] == _cluster_spec(RAYCLUSTER)["autoscalerOptions"]


def test_rayservice_services_do_not_collide_with_the_raycluster() -> None:
    """KubeRay names a RayService's services NAME-head-svc and NAME-serve-svc, a RayCluster's NAME-head-svc."""
    assert _load(RAYSERVICE)["metadata"]["name"] != _load(RAYCLUSTER)["metadata"]["name"]


# ---------------------------------------------------------------- infra: images


def _dockerfile_instructions(rel: str) -> list[str]:
    text = (ROOT / rel).read_text()
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _first_index(lines: list[str], pattern: str) -> int:
    for i, line in enumerate(lines):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no Dockerfile instruction matches {pattern!r}")


def test_dockerfile_installs_torch_then_deepspeed_then_the_project() -> None:
    lines = _dockerfile_instructions(DOCKERFILE)
    torch_pin = _pyproject_pin("torch")
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", "\n".join(lines), flags=re.M))
    assert args.get("TORCH_VERSION") == torch_pin, f"TORCH_VERSION must be pyproject's {torch_pin}"
    torch = _first_index(lines, r"pip install .*[\"']?torch==\$\{TORCH_VERSION\}")
    deepspeed = _first_index(lines, r"pip install .*deepspeed")
    project = _first_index(lines, r"pip install (--no-deps )?\.( |$)")
    assert torch < deepspeed < project, "order must be torch, DeepSpeed, the project"
    assert "--no-build-isolation" in lines[deepspeed]
    assert "torch.version.cuda" in lines[torch], "the build must refuse a CPU-only torch"
    assert lines[0].startswith(("ARG", "FROM")) and any(line.startswith("FROM ") for line in lines)
    assert not any(re.search(r"index-url\s+\S*://", line) for line in lines), "no index URLs in the repo"
    copies = [line for line in lines if line.startswith("COPY")]
    assert any(line.endswith(". /app") for line in copies), "the repository is copied to /app"


def test_ray_version_of_the_image_matches_the_project() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", (ROOT / DOCKERFILE).read_text(), flags=re.M))
    assert args["RAY_VERSION"].startswith(".".join(ray.__version__.split(".")[:2]))


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for required in (".venv", ".git", ".duet", "mlruns", "__pycache__", ".env"):
        assert required in patterns, f".dockerignore must exclude {required}"
    for needed in ("pyproject.toml", "components", "pipelines", "README.md"):
        assert needed not in patterns, f".dockerignore must keep {needed} (the image installs it)"


# ---------------------------------------------------------------- infra: compose stack


def _services() -> dict[str, dict]:
    return _load(COMPOSE)["services"]


def test_compose_has_the_stack_with_healthchecks_and_named_volumes() -> None:
    compose = _load(COMPOSE)
    services = compose["services"]
    assert {"minio", "minio-setup", "postgres", "mlflow"} <= set(services)
    for name in ("minio", "postgres", "mlflow"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / "infra" / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert declared >= {"minio-data", "postgres-data"}
    minio_ports = " ".join(services["minio"]["ports"])
    assert ":9000" in minio_ports and ":9001" in minio_ports


def test_compose_creates_the_buckets() -> None:
    setup = _services()["minio-setup"]
    script = " ".join(setup["command"] if isinstance(setup["command"], list) else [setup["command"]])
    for bucket in ("duet-data", "duet-models", "duet-runs", "mlflow-artifacts"):
        assert bucket in script
    assert "mc mb --ignore-existing" in script
    assert setup["depends_on"]["minio"]["condition"] == "service_healthy"


def test_compose_mlflow_server_has_auth_postgres_and_s3_artifacts() -> None:
    mlflow = _services()["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--app-name") + 1] == "basic-auth", "authentication must be on"
    assert command[command.index("--artifacts-destination") + 1] == "s3://mlflow-artifacts"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    env = mlflow["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]
    assert env["MLFLOW_AUTH_DB_NAME"] != env["MLFLOW_DB_NAME"], "the auth store needs a database of its own"
    assert (ROOT / "infra" / mlflow["build"]["context"] / "Dockerfile").is_file()
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    mlflow_dockerfile = (ROOT / MLFLOW_DIR / "Dockerfile").read_text()
    assert "mlflow[auth]" in mlflow_dockerfile and "psycopg2" in mlflow_dockerfile
    assert "entrypoint.py" in mlflow_dockerfile and "basic_auth.ini" in mlflow_dockerfile
    init_sql = "\n".join(p.read_text() for p in sorted((ROOT / MLFLOW_DIR / "initdb").glob("*.sql")))
    assert f"CREATE DATABASE {env['MLFLOW_AUTH_DB_NAME']};" in init_sql
    assert _services()["postgres"]["environment"]["POSTGRES_DB"] == env["MLFLOW_DB_NAME"]


def test_compose_credentials_come_from_the_environment() -> None:
    secret_like = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER")
    for name, service in _services().items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form of environment"
        for key, value in env.items():
            if secret_like.search(key):
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", str(value)), (
                    f"{name}: {key} must be ${{VAR:?...}} from infra/.env, not a literal or a default"
                )


def _entrypoint_module():
    path = ROOT / MLFLOW_DIR / "entrypoint.py"
    spec = importlib.util.spec_from_file_location("duet_mlflow_entrypoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_entrypoint_renders_a_private_auth_config(tmp_path: Path) -> None:
    entrypoint = _entrypoint_module()
    password = "p@ss:w%rd/#1 x"  # every character that breaks a URL or configparser's interpolation
    config_path = tmp_path / "auth" / "basic_auth.ini"
    env = {
        "POSTGRES_USER": "mlflow",
        "POSTGRES_PASSWORD": password,
        "POSTGRES_HOST": "postgres",
        "MLFLOW_DB_NAME": "mlflow",
        "MLFLOW_AUTH_DB_NAME": "mlflow_auth",
        "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
        "MLFLOW_AUTH_ADMIN_PASSWORD": "not-checked-here",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "not-checked-here",
    }
    entrypoint.prepare(env)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(config_path)
    assert config_path.stat().st_mode & 0o077 == 0, "the rendered config holds a password: owner-only"
    parser = configparser.ConfigParser()  # what MLflow's read_auth_config uses
    parser.read(config_path)
    auth_uri = urlsplit(parser["mlflow"]["database_uri"])
    assert auth_uri.scheme.startswith("postgresql") and auth_uri.path == "/mlflow_auth"
    assert unquote(auth_uri.password) == password and auth_uri.hostname == "postgres"
    tracking_uri = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert tracking_uri.path == "/mlflow" and unquote(tracking_uri.password) == password
    assert parser["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"


def test_mlflow_entrypoint_names_missing_settings() -> None:
    entrypoint = _entrypoint_module()
    with pytest.raises(entrypoint.SetupError, match="POSTGRES_PASSWORD.*MLFLOW_AUTH_ADMIN_PASSWORD"):
        entrypoint.prepare({"POSTGRES_USER": "mlflow", "MLFLOW_FLASK_SERVER_SECRET_KEY": "x"})


def test_mlflow_auth_template_holds_no_secret() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / MLFLOW_DIR / "basic_auth.ini")
    section = parser["mlflow"]
    assert "admin_password" not in section, "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"
    assert section["database_uri"] == "${MLFLOW_AUTH_DATABASE_URI}"


# ---------------------------------------------------------------- paths and secrets

_REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:pipelines|clusters|infra|components|tests)/[\w./-]*\w"
    r"|\.dockerignore|pyproject\.toml)"
)


def test_every_repository_path_mentioned_exists() -> None:
    missing = []
    for path in _deployment_files():
        for match in _REPO_PATH.finditer(path.read_text()):
            ref = match.group(1)
            if ref.endswith(".env") or "<" in ref:
                continue  # files the user creates
            if ref == "pipelines/full.py":
                continue  # its own test: test_rayjob_entrypoint_script_exists
            if not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "paths that do not exist in the repository:\n" + "\n".join(missing)


_CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service account key": re.compile(r"\"private_key(_id)?\"\s*:"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@${}]+:[^/\s@${}<]+@"),
    "Slack/GitHub token": re.compile(r"\b(xox[abpr]-[0-9A-Za-z-]{10,}|gh[pousr]_[0-9A-Za-z]{30,})\b"),
}


@pytest.mark.parametrize("path", _deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_credentials_in_deployment_files(path: Path) -> None:
    text = path.read_text()
    for what, pattern in _CREDENTIAL_PATTERNS.items():
        match = pattern.search(text)
        where = path.relative_to(ROOT)
        assert not match, f"{where} contains what looks like a {what}: {match.group(0)[:12]}..."


# A developer checkout (or root's home) has no business in deployment files; node paths like /home/ubuntu do.
LOCAL_PATH = re.compile(r"(?<![\w.])/(?:root|work)/")


def test_no_machine_paths_or_index_urls() -> None:
    for path in _deployment_files():
        text = path.read_text()
        assert not LOCAL_PATH.search(text), f"{path.relative_to(ROOT)} names a local machine path"
        assert not re.search(r"--(extra-)?index-url[ =]+\S*://", text), f"{path.relative_to(ROOT)}: index URL"
