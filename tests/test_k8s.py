"""KubeRay manifests and the cluster launcher config: valid against their schemas, and in step with the Serve config."""

import gzip
import importlib.resources
import importlib.util
import json

import jsonschema
import pytest
import yaml

from serve.core.paths import REPO_ROOT, data_dir

SCHEMAS = data_dir().parent / "schemas" / "kuberay"
CRDS = {"RayService": "ray.io_rayservices.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz"}
MANIFESTS = {"rayservice.yaml": "RayService", "rayjob-train.yaml": "RayJob", "rayjob-batch.yaml": "RayJob"}


def _load_render():
    spec = importlib.util.spec_from_file_location("k8s_render", REPO_ROOT / "k8s" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strict(schema):
    """The schema as `kubectl apply` enforces it (strict field validation): unknown fields are errors, except
    where the CRD says it keeps them."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@pytest.fixture(scope="module")
def spec_validators():
    """{kind: a validator of its spec}; built once, since checking the large CRD schemas themselves is slow."""
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS}")
    validators = {}
    for kind, file in CRDS.items():
        crd = yaml.load(gzip.decompress((SCHEMAS / file).read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
        schema = _strict(v1["schema"]["openAPIV3Schema"]["properties"]["spec"])
        validators[kind] = jsonschema.validators.validator_for(schema)(schema)
    return validators


def _manifest(name):
    return yaml.safe_load((REPO_ROOT / "k8s" / name).read_text())


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_spec_validates_against_the_crd(spec_validators, name):
    manifest = _manifest(name)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == MANIFESTS[name]
    spec_validators[manifest["kind"]].validate(manifest["spec"])


def test_strict_validation_rejects_a_misspelt_field(spec_validators):
    spec = _manifest("rayservice.yaml")["spec"]
    spec["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        spec_validators["RayService"].validate(spec)


def test_rayservice_embeds_the_serve_config():
    render = _load_render()
    serve_config = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load(render.SERVE_CONFIG.read_text())
    assert [app["import_path"] for app in serve_config["applications"]] == ["serve.app.builder:build_app"]


def test_committed_manifests_equal_their_rendering():
    for name, text in _load_render().manifests().items():
        assert (REPO_ROOT / "k8s" / name).read_text() == text, f"k8s/{name} is stale: run `python k8s/render.py`"


def test_jobs_run_the_project_commands_on_gpu_workers():
    train, routing = _manifest("rayjob-train.yaml")["spec"], _manifest("rayjob-batch.yaml")["spec"]
    assert train["entrypoint"].startswith("python -m training fit --dataset llmrouter_9model --out /artifacts/llmrouter_9model")
    assert "--workers 2 --use-gpu" in train["entrypoint"]
    assert routing["entrypoint"].startswith("python -m serve.batch --artifact /artifacts/llmrouter_9model")
    for spec in (train, routing):
        (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        (container,) = workers["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"name": "FINEROUTER_DATA_DIR", "value": "/data"} in container["env"]


def test_cluster_launcher_config_is_valid_and_names_head_and_gpu_nodes():
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    schema = json.loads(importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, node in node_types.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(node_types[name]["max_workers"] >= node_types[name]["min_workers"] for name in gpu_types)
    assert any("[gpu]" in command for command in config["setup_commands"])


def test_render_refuses_an_artifact_outside_the_volume(tmp_path):
    config = tmp_path / "serve.gpu.config"
    config.write_text("applications:\n  - name: finerouter\n    import_path: serve.app.builder:build_app\n    args: {artifact: /models/router}\n")
    with pytest.raises(ValueError, match="'/models/router'.*outside the artifact volume /artifacts"):
        _load_render().manifests(config)


def test_gpu_workers_follow_the_serve_config(tmp_path):
    render = _load_render()
    config = yaml.safe_load("""
applications:
  - name: finerouter
    import_path: serve.app.builder:build_app
    args:
      backends:
        a: {kind: vllm, model_source: org/a, deployment_config: {autoscaling_config: {min_replicas: 1, max_replicas: 3}}}
        b: {kind: vllm, model_source: org/b, placement_group_config: {bundles: [{GPU: 2}]}}
        c: {kind: openai, base_url: "http://x/v1", api_key_env: C_KEY}
    deployments:
      - {name: Embedder, autoscaling_config: {min_replicas: 1, max_replicas: 2}, ray_actor_options: {num_gpus: 0.5}}
""")
    apps = render._app_configs(config, tmp_path / "serve.gpu.config")
    assert render.gpu_demand(apps, "min_replicas") == 4  # 1 + 2 + 0.5
    assert render.gpu_demand(apps, "max_replicas") == 6  # 3 + 2 + 1
    assert render.secret_keys(apps) == ["C_KEY", "HF_TOKEN"]
