"""Every file under infra/ checked by the tool that will read it: the cluster launcher YAML by Ray's own schema and
`ray up`'s config checks, KubeRay manifests by the KubeRay CRD schemas (infra/schemas/), Serve configs by Ray
Serve's schema and our build_app settings, job entrypoints by the memory3 config loader, the Grafana dashboard
against the metric names the code really emits. Renaming a metric, a config key or a deployment fails here."""
from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
KUBERAY = sorted((INFRA / "kuberay").glob("*.yaml"))
CODE_DIRS = ("pipelines", "serve", "memory3", "model")
CRD_SCHEMAS = {"RayCluster": "rayclusters.v1.json", "RayJob": "rayjobs.v1.json", "RayService": "rayservices.v1.json"}


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[tuple[str, dict]]:
    return [(f"{p.name}#{i}", d) for p in KUBERAY for i, d in enumerate(load_yaml_docs(p))]


def strict(schema: dict) -> dict:
    """kubectl's strict field validation: an object schema with `properties` rejects unknown fields, unless it
    says x-kubernetes-preserve-unknown-fields (jsonschema alone would accept any typo)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((INFRA / "schemas" / CRD_SCHEMAS[kind]).read_text())
    schema["properties"]["metadata"] = {"type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "labels": {"type": "object"},
                                                       "namespace": {"type": "string"},
                                                       "annotations": {"type": "object"}}}
    return jsonschema.Draft7Validator(strict(schema))


def embedded_runtime_envs() -> list[tuple[str, dict]]:
    envs = []
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            envs.append((name, yaml.safe_load(doc["spec"]["runtimeEnvYAML"])))
        if doc["kind"] == "RayService":
            for app in yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]:
                envs.append((f"{name}:{app['name']}", app["runtime_env"]))
    return envs


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """`python -m memory3.cli <command> k=v ...` segments of a (possibly &&-chained) entrypoint."""
    return [shlex.split(part) for part in entrypoint.split("&&")]


# --- the Ray cluster launcher ----------------------------------------------------------------------------------

def test_cluster_launcher_yaml_passes_rays_own_checks():
    import ray
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # what `ray up` validates first ...
    validate_config(prepare_config(config))  # ... then defaults filled, head type, min/max workers
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-"), "image must match client Ray"
    gpu_types = [t for t, node in config["available_node_types"].items()
                 if re.match(r"(g5|g6|p4d|p5)\.", node["node_config"]["InstanceType"])]
    assert gpu_types and all(config["available_node_types"][t]["min_workers"] == 0 for t in gpu_types)
    assert any("pip install" in c and "~/memory3" in c for c in config["setup_commands"])

    typo = copy.deepcopy(config)
    typo["available_node_types"]["head"]["node_confg"] = typo["available_node_types"]["head"].pop("node_config")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


# --- KubeRay ---------------------------------------------------------------------------------------------------

def test_kuberay_manifests_match_the_crd_schemas():
    import ray

    kinds = set()
    for name, doc in manifests():
        assert doc["apiVersion"] == "ray.io/v1", name
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{name}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        kinds.add(doc["kind"])
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        assert spec["rayVersion"] == ray.__version__, name
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        assert images == {f"rayproject/ray:{ray.__version__}-py311-gpu"}, (name, images)
        assert spec["enableInTreeAutoscaling"] and spec["authOptions"]["mode"] == "token", name
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]]
        assert all(gpus), f"{name}: every worker group is a GPU group"
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_crd_validation_catches_a_misspelled_field():
    name, doc = next((n, d) for n, d in manifests() if d["kind"] == "RayJob")
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert list(crd_validator("RayJob").iter_errors(bad)), "unknown field accepted"
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert list(crd_validator("RayJob").iter_errors(bad)), "wrong type accepted"


def test_rayjob_entrypoints_use_real_commands_and_config_keys():
    from configs import load_config
    from memory3.cli import COMMANDS

    seen = set()
    for name, doc in manifests():
        if doc["kind"] != "RayJob":
            continue
        for argv in entrypoint_commands(doc["spec"]["entrypoint"]):
            assert argv[:3] == ["python", "-m", "memory3.cli"], (name, argv)
            command, overrides = argv[3], argv[4:]
            assert command in COMMANDS, (name, command)
            load_config(command, overrides)  # unknown keys raise ConfigError
            seen.add(command)
    assert {"encode", "train"} <= seen
    stages = {o for _, d in manifests() if d["kind"] == "RayJob"
              for argv in entrypoint_commands(d["spec"]["entrypoint"]) for o in argv if o.startswith("stage=")}
    assert stages == {"stage=warmup", "stage=continual"}


# --- runtime environments -------------------------------------------------------------------------------------

def test_runtime_envs_agree_with_each_other_and_pyproject():
    from ray.runtime_env import RuntimeEnv

    main = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    local = yaml.safe_load((INFRA / "runtime_env.local.yaml").read_text())
    RuntimeEnv(**main)
    RuntimeEnv(**local)
    assert main["working_dir"] == "." and local == {k: v for k, v in main.items() if k != "pip"}
    assert "RAY_AUTH_MODE" not in main["env_vars"], "auth is the cluster's and client's setting, not the job's"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(main["pip"]["packages"]) == sorted(d for d in deps if not d.startswith("ray"))
    for name, env in embedded_runtime_envs():
        RuntimeEnv(**env)
        assert re.fullmatch(r"s3://[^ ]+\.zip", env["working_dir"]), f"{name}: a remote zip (no local upload there)"
        assert {k: v for k, v in env.items() if k != "working_dir"} == {
            k: v for k, v in main.items() if k not in ("working_dir", "excludes")}, name


# --- Ray Serve -------------------------------------------------------------------------------------------------

def check_serve_config(config: dict, where: str) -> None:
    """Ray Serve's own schema, plus no unknown keys (Serve accepts them for forward compatibility), plus our
    build_app settings."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    from serve.app import load_settings

    ServeDeploySchema.model_validate(config)
    assert set(config) <= set(ServeDeploySchema.model_fields), where
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), (where, set(app))
        for deployment in app.get("deployments", []):
            assert set(deployment) <= set(DeploymentSchema.model_fields), (where, deployment)
        assert app["import_path"] == "serve.app:build_app", where
        load_settings(app.get("args", {}))  # unknown or invalid serve settings raise ValueError


def test_rayservice_serve_config():
    import serve.app

    service = next(d for _, d in manifests() if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    check_serve_config(config, "rayservice.yaml")
    assert callable(serve.app.build_app)
    args = config["applications"][0]["args"]
    assert args["checkpoint"].startswith("s3://") and args["bank"].startswith("s3://")
    generator = args["deployments"]["generator"]
    assert generator["num_gpus"] >= 1 and generator["autoscaling_config"]["max_replicas"] > 1
    assert config["http_options"]["host"] == "0.0.0.0"


def test_rayservice_follows_infra_serve_yaml():
    """infra/serve.yaml is the serving engineer's Serve config; the RayService serves the same application."""
    path = INFRA / "serve.yaml"
    if not path.exists():
        pytest.skip("infra/serve.yaml not written yet")
    local = yaml.safe_load(path.read_text())
    check_serve_config(local, "infra/serve.yaml")
    service = next(d for _, d in manifests() if d["kind"] == "RayService")
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert [a["name"] for a in cluster["applications"]] == [a["name"] for a in local["applications"]]
    for mine, theirs in zip(cluster["applications"], local["applications"]):
        assert mine["import_path"] == theirs["import_path"]
        assert mine.get("route_prefix", "/") == theirs.get("route_prefix", "/")
        assert ([d["name"] for d in mine.get("deployments", [])] == [d["name"] for d in theirs.get("deployments", [])])
        assert set(theirs.get("args", {})) <= set(mine.get("args", {})), "the cluster sets every key serve.yaml sets"


def test_serve_deployment_names_exist_in_code():
    """Names a Serve config may override (`deployments: - name: ...`) are the ones the code declares."""
    declared = set()
    for path in (REPO / "serve").glob("*.py"):
        declared |= set(re.findall(r"@serve\.deployment\(\s*name=\"(\w+)\"", path.read_text()))
    assert {"Ingress", "Generator", "Retriever", "MemoryStore"} <= declared
    for path in [p for p in [INFRA / "serve.yaml"] if p.exists()]:
        for app in yaml.safe_load(path.read_text())["applications"]:
            assert {d["name"] for d in app.get("deployments", [])} <= declared


# --- Grafana ---------------------------------------------------------------------------------------------------

def emitted_metrics() -> dict[str, str]:
    """{metric name: kind} for every ray.util.metrics instrument the code creates."""
    found = {}
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*[\"'](memory3_\w+)[\"']", path.read_text()):
                found[name] = kind
    return found


def prometheus_names(name: str, kind: str) -> set[str]:
    """How Ray 2.60 exports an instrument (checked by scraping in test_cluster.py): a `ray_` prefix; counters end
    in `_total` (added when missing); histograms as _bucket/_sum/_count series."""
    base = f"ray_{name}"
    if kind == "Counter":
        return {base if name.endswith("_total") else f"{base}_total"}
    if kind == "Histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def test_grafana_dashboard_queries_exactly_the_emitted_metrics():
    dashboard = json.loads((INFRA / "grafana" / "memory3.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(e.count("(") == e.count(")") and e.count("[") == e.count("]") for e in exprs)
    queried = {m for e in exprs for m in re.findall(r"\bray_memory3_\w+", e)}

    emitted = emitted_metrics()
    assert {"memory3_encode_references_total", "memory3_train_loss", "memory3_serve_requests_total"} <= set(emitted)
    exported = {n: name for name, kind in emitted.items() for n in prometheus_names(name, kind)}
    unknown = queried - set(exported)
    assert not unknown, f"the dashboard queries metrics no code emits: {sorted(unknown)}"
    shown = {exported[n] for n in queried}
    assert shown == set(emitted), f"emitted but not on the dashboard: {sorted(set(emitted) - shown)}"
    for name, kind in emitted.items():
        if kind == "Histogram":
            assert f"ray_{name}_bucket" in queried, f"{name}: a histogram is shown by its buckets (quantiles)"
    titles = " ".join(p["title"].lower() for p in panels)
    for phrase in ("references encoded / s", "tokens encoded / s", "bytes written", "malformed", "training loss",
                   "training tokens / s", "requests / s", "time to first token", "generated tokens"):
        assert phrase in titles, phrase


# --- docs ------------------------------------------------------------------------------------------------------

def test_cluster_docs_name_only_files_that_exist():
    text = (REPO / "docs" / "cluster.md").read_text()
    paths = set(re.findall(r"\b((?:infra|pipelines|tests|configs|scripts)/[\w./-]+\.(?:ya?ml|json|py|md|sh))", text))
    assert paths, "docs/cluster.md names no files"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
