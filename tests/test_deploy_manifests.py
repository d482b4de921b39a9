"""Offline checks of the deployment files: Dockerfile, deploy/compose, deploy/kubernetes, gateway configs.

Nothing here needs Docker, a cluster, a GPU or the network:
  (a) every gateway config under deploy/ passes `gateway check-config` (with the env vars it references set);
  (b) deploy/compose/docker-compose.yaml validates against the compose-spec JSON schema (vendored in the
      check-jsonschema package), plus structural checks (GPU reservations, health checks, volumes, mounts);
  (c) every Kubernetes object validates with kubernetes-validate (strict) for k8s 1.30 and the newest schema
      the package ships; CRDs (ServiceMonitor) get structural checks. The kustomizations are rendered by a
      small renderer here, and also by `kubectl kustomize` / `kustomize build` when one is installed;
  (d) the Dockerfile installs this package from pyproject.toml and runs its `gateway` console script on the
      port it exposes.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
K8S = DEPLOY / "kubernetes"
K8S_BASE = K8S / "base"
K8S_DASHBOARDS = K8S / "dashboards"
DASHBOARD_FILES = ("gateway-overview.json", "vllm-engines.json", "cost-tenants.json")
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_API_GROUPS = ("monitoring.coreos.com/",)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# =============================================================================== (a) gateway configs


def gateway_configs() -> list[Path]:
    """Every gateway config under deploy/ (a YAML mapping with a top-level `models`), except deploy/local."""
    found = []
    for p in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        if "local" in p.relative_to(DEPLOY).parts[:1]:
            continue
        try:
            doc = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and "models" in doc and "kind" not in doc and "services" not in doc:
            found.append(p)
    return found


def _dummy_env(path: Path) -> dict[str, str]:
    referenced = set(_ENV_REF.findall(path.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in referenced}
    for name in referenced:
        env[name] = "redis://127.0.0.1:6379/0" if "REDIS" in name else \
            "http://127.0.0.1:8000" if name.endswith("URL") else f"test-{name.lower()}"
    return env


def _gateway_cmd() -> list[str]:
    script = Path(sys.executable).parent / "gateway"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def test_gateway_configs_found() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in gateway_configs()}
    assert {"compose/gateway.yaml", "kubernetes/base/gateway.yaml", "examples/single-vllm.yaml"} <= names


@pytest.mark.parametrize("path", gateway_configs(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_gateway_config_passes_check_config(path: Path) -> None:
    r = subprocess.run([*_gateway_cmd(), "check-config", str(path)], env=_dummy_env(path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ": OK (" in r.stdout


@pytest.mark.parametrize("path", [COMPOSE_DIR / "gateway.yaml", K8S_BASE / "gateway.yaml"],
                         ids=["compose", "kubernetes"])
def test_deployed_configs_refuse_to_start_without_api_key(path: Path) -> None:
    """The compose/k8s configs must not silently run with auth off when the key is missing."""
    env = _dummy_env(path)
    r = subprocess.run([*_gateway_cmd(), "check-config", str(path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert "auth on" in r.stdout
    env.pop("GATEWAY_API_KEY")
    r = subprocess.run([*_gateway_cmd(), "check-config", str(path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "GATEWAY_API_KEY is not set" in r.stderr


@pytest.mark.parametrize("path", [COMPOSE_DIR / "gateway.yaml", K8S_BASE / "gateway.yaml"],
                         ids=["compose", "kubernetes"])
def test_deployed_configs_use_redis(path: Path) -> None:
    """Replicas x workers must share one limit and one ledger: no silent fallback to the in-process store."""
    cfg = yaml.safe_load(path.read_text())
    assert cfg["redis"]["url"] == "${REDIS_URL}"
    env = _dummy_env(path)
    env.pop("REDIS_URL")
    r = subprocess.run([*_gateway_cmd(), "check-config", str(path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "REDIS_URL is not set" in r.stderr
    env["REDIS_URL"] = "redis+sentinel://sentinel-0:26379,sentinel-1:26379/gateway/0"
    r = subprocess.run([*_gateway_cmd(), "check-config", str(path)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def _redis_args(args: list[str]) -> dict[str, str]:
    flags = [a for a in args if a != "redis-server"]
    return {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags) - 1, 2)}


def test_compose_redis_keeps_limits_and_ledger() -> None:
    redis_svc = compose_doc({"GATEWAY_API_KEY": "k"})["services"]["redis"]
    args = _redis_args(redis_svc["command"])
    assert args["appendonly"] == "yes" and args["maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in redis_svc["volumes"])


# =============================================================================== (b) docker compose


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation: $$, $NAME, ${NAME}, ${NAME:-d}, ${NAME-d}, ${NAME:?e}, ${NAME?e}."""
    pat = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")

    def repl(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4)
        val = env.get(name)
        unset = val is None or (val == "" and op is not None and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return val or ""

    if isinstance(value, str):
        return pat.sub(repl, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def compose_doc(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the `<<: *vllm` merge keys
    return interpolate(raw, {} if env is None else env)


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema as vendored by check-jsonschema (`--builtin-schema vendor.compose-spec`)."""
    res = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(res.read_text())


def _compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_validates_against_compose_spec() -> None:
    assert _compose_errors(compose_doc()) == []
    # with the overrides documented in docs/deploy.md as well
    env = {"HF_TOKEN": "hf_x", "GATEWAY_API_KEY": "k", "SMALL_GPU": "1", "LARGE_GPU_MEM_UTIL": "0.9",
           "SMALL_GPU_MEM_UTIL": "0.9", "GATEWAY_PORT": "8080", "GATEWAY_WORKERS": "4"}
    assert _compose_errors(compose_doc(env)) == []


def test_compose_schema_check_is_not_vacuous() -> None:
    doc = compose_doc()
    bad = copy.deepcopy(doc)
    bad["services"]["gateway"]["helthcheck"] = bad["services"]["gateway"].pop("healthcheck")
    assert any("helthcheck" in e for e in _compose_errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["vllm-large"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    assert any("gpus" in e for e in _compose_errors(bad))


def test_compose_services_and_structure() -> None:
    doc = compose_doc()
    services = doc["services"]
    assert set(services) == {"vllm-large", "vllm-small", "gateway", "redis", "prometheus", "grafana", "alertmanager",
                             "redis-exporter"}
    for name, svc in services.items():
        assert "healthcheck" in svc and svc["healthcheck"]["test"][0] == "CMD", name
        if "image" in svc:
            tag = svc["image"].rpartition(":")[2]
            assert ":" in svc["image"] and tag not in ("", "latest"), f"{name}: image tag must be pinned"
    # named volumes are declared
    declared = set(doc.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in declared, f"{name}: volume {src} not declared"
    # bind-mount sources exist (the dashboards folder may still be empty, hence untracked)
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                path = (COMPOSE_DIR / src).resolve()
                if path == ROOT / "dashboards":
                    continue
                assert path.exists(), f"{name}: bind source {src} missing"


def _flag(cmd: list[str], flag: str) -> str | None:
    for i, a in enumerate(cmd):
        if a == flag:
            return cmd[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_compose_vllm_engines() -> None:
    services = compose_doc()["services"]
    for name in ("vllm-large", "vllm-small"):
        svc = services[name]
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", svc["image"])
        assert svc["entrypoint"] == ["vllm", "serve"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "HF_TOKEN" in svc["environment"] and svc["environment"]["HF_HOME"].startswith("/models")
        assert "model-cache:/models" in svc["volumes"]
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert _flag(svc["command"], "--port") == "8000"
    assert services["vllm-large"]["command"][0] == "meta-llama/Llama-3.1-8B-Instruct"
    small = services["vllm-small"]["command"]
    assert small[0] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "--enable-lora" in small and _flag(small, "--lora-modules")
    mem = [float(str(_flag(services[n]["command"], "--gpu-memory-utilization"))) for n in ("vllm-large", "vllm-small")]
    assert sum(mem) < 0.95, "defaults share GPU 0: utilizations must fit together"


def _served_models_compose(services: dict[str, Any]) -> dict[str, set[str]]:
    out = {}
    for name, svc in services.items():
        if name.startswith("vllm-"):
            cmd = svc["command"]
            models = {_flag(cmd, "--served-model-name") or cmd[0]}
            lora = _flag(cmd, "--lora-modules")
            if lora:
                models.add(lora.split("=")[0])
            out[name] = models
    return out


def _check_config_upstreams(cfg_path: Path, served: dict[str, set[str]]) -> None:
    """Each deployment's URL is http://<engine>:8000 and its model is one the engine serves."""
    cfg = yaml.safe_load(cfg_path.read_text())
    for model, spec in cfg["models"].items():
        for d in spec["deployments"]:
            m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", d["url"])
            assert m, d["url"]
            host, port = m.group(1), m.group(2)
            assert host in served and port == "8000", f"{model}: {d['url']} is not an engine"
            assert d["model"] in served[host], f"{model}: {host} does not serve {d['model']}"


def test_compose_gateway_service() -> None:
    doc = compose_doc({"GATEWAY_API_KEY": "k"})
    gw = doc["services"]["gateway"]
    assert gw["build"]["context"] == "../.." and (COMPOSE_DIR / gw["build"]["context"] / gw["build"]["dockerfile"]
                                                   ).resolve() == ROOT / "Dockerfile"
    assert "./gateway.yaml:/etc/gateway/gateway.yaml:ro" in gw["volumes"]
    assert gw["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert gw["environment"]["GATEWAY_API_KEY"] == "k"
    assert gw["ports"] == ["8000:8000"]
    assert "/healthz" in " ".join(gw["healthcheck"]["test"])
    _check_config_upstreams(COMPOSE_DIR / "gateway.yaml", _served_models_compose(doc["services"]))


def test_compose_prometheus_and_grafana() -> None:
    services = compose_doc()["services"]
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "../prometheus:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]
    assert (DEPLOY / "prometheus").is_dir()
    targets = {t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {"gateway:8000", "vllm-large:8000", "vllm-small:8000"} <= targets
    for job in prom["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                host = t.split(":")[0]
                assert host == "localhost" or host in services, t

    ds = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1
    assert [d["url"] for d in ds["datasources"]] == ["http://prometheus:9090"]
    dash = yaml.safe_load((COMPOSE_DIR / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    assert dash["apiVersion"] == 1
    assert dash["providers"][0]["type"] == "file"
    assert dash["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert "../../dashboards:/var/lib/grafana/dashboards:ro" in services["grafana"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]


# =============================================================================== (c) kubernetes

_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator",
                   "generatorOptions", "images"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                   "PersistentVolume", "StorageClass"}


def _pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def render_kustomization(path: Path) -> list[dict[str, Any]]:
    """A minimal `kustomize build` for the features these kustomizations use (no name hashes)."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(kust) - _KUSTOMIZE_KEYS
    assert not unknown, f"{path}: renderer does not support {unknown}"
    objs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        p = (path / res).resolve()
        if p.is_dir():
            objs += render_kustomization(p)
        else:
            objs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    opts = kust.get("generatorOptions", {})
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.rpartition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (path / src).read_text()
        meta: dict[str, Any] = {"name": gen["name"]}
        if opts.get("labels"):
            meta["labels"] = dict(opts["labels"])
        if opts.get("annotations"):
            meta["annotations"] = dict(opts["annotations"])
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for obj in objs:
        meta = obj.setdefault("metadata", {})
        if kust.get("namespace") and obj["kind"] not in _CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for lab in kust.get("labels", []):
            meta.setdefault("labels", {}).update(lab["pairs"])
        for img in kust.get("images", []):
            for c in _pod_containers(obj):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return objs


def _kustomize_cli() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build", "--load-restrictor", "LoadRestrictionsNone"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone"]
    return None


def render_with_cli(path: Path) -> list[dict[str, Any]] | None:
    cli = _kustomize_cli()
    if cli is None:
        return None
    r = subprocess.run([*cli, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    name = obj["metadata"]["name"]
    if obj["kind"] == "ConfigMap":
        name = re.sub(r"-[a-z0-9]{10}$", "", name)  # kustomize's content hash suffix
    return obj["kind"], name


def _by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for o in objs:
        assert _key(o) not in out, f"duplicate {_key(o)}"
        out[_key(o)] = o
    return out


@pytest.fixture(scope="module")
def base_objects() -> list[dict[str, Any]]:
    return render_kustomization(K8S_BASE)


@pytest.fixture(scope="module")
def dashboards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/kubernetes/dashboards, with stand-in dashboard JSON where the real files do not exist yet."""
    if all((ROOT / "dashboards" / f).is_file() for f in DASHBOARD_FILES):
        return K8S_DASHBOARDS
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(K8S, root / "deploy" / "kubernetes")
    (root / "dashboards").mkdir()
    for f in DASHBOARD_FILES:
        real = ROOT / "dashboards" / f
        text = real.read_text() if real.is_file() else json.dumps({"title": f, "panels": [], "schemaVersion": 39})
        (root / "dashboards" / f).write_text(text)
    return root / "deploy" / "kubernetes" / "dashboards"


def _all_renderings(base_objects: list[dict[str, Any]], dashboards_dir: Path) -> list[tuple[str, list]]:
    out = [("base", base_objects), ("dashboards", render_kustomization(dashboards_dir))]
    for name, path in (("base", K8S_BASE), ("dashboards", dashboards_dir)):
        cli = render_with_cli(path)
        if cli is not None:
            out.append((f"{name} (kustomize cli)", cli))
    return out


def test_kubernetes_objects_validate(base_objects: list[dict[str, Any]], dashboards_dir: Path) -> None:
    checked = 0
    for label, objs in _all_renderings(base_objects, dashboards_dir):
        for obj in objs:
            if obj["apiVersion"].startswith(CRD_API_GROUPS):
                continue  # no schema in kubernetes-validate: see test_servicemonitors
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    pytest.fail(f"{label}: {obj['kind']}/{obj['metadata']['name']} (k8s {version}): {e.message}")
                checked += 1
    assert checked >= 2 * 15


def test_kubernetes_validate_is_not_vacuous(base_objects: list[dict[str, Any]]) -> None:
    dep = copy.deepcopy(_by_key(base_objects)[("Deployment", "gateway")])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def test_cli_rendering_matches_renderer(base_objects: list[dict[str, Any]], dashboards_dir: Path) -> None:
    if _kustomize_cli() is None:
        pytest.skip("neither kustomize nor kubectl installed: only the built-in renderer was used")
    for mine, path in ((base_objects, K8S_BASE), (render_kustomization(dashboards_dir), dashboards_dir)):
        cli = render_with_cli(path)
        assert cli is not None
        assert sorted(_key(o) for o in cli) == sorted(_key(o) for o in mine)
        for o in cli:
            assert o["metadata"].get("namespace") in (None, "llm-gateway")
        # kustomize rewrote the Deployment's reference to the hashed ConfigMap name
        cms = {o["metadata"]["name"] for o in cli if o["kind"] == "ConfigMap"}
        gw = next(o for o in cli if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway")
        vols = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
        assert vols["config"]["configMap"]["name"] in cms


def test_kubernetes_expected_objects(base_objects: list[dict[str, Any]]) -> None:
    keys = set(_by_key(base_objects))
    assert {
        ("Namespace", "llm-gateway"), ("ConfigMap", "gateway-config"), ("Deployment", "gateway"),
        ("Service", "gateway"), ("HorizontalPodAutoscaler", "gateway"), ("PodDisruptionBudget", "gateway"),
        ("StatefulSet", "redis"), ("Service", "redis"), ("PersistentVolumeClaim", "model-cache"),
        ("Deployment", "vllm-large"), ("Service", "vllm-large"), ("Deployment", "vllm-small"),
        ("Service", "vllm-small"), ("ServiceMonitor", "gateway"), ("ServiceMonitor", "vllm"),
    } <= keys
    for o in base_objects:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "llm-gateway", _key(o)


def _pod_labels(o: dict[str, Any]) -> dict[str, str]:
    return o["spec"]["template"]["metadata"]["labels"]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_references(base_objects: list[dict[str, Any]]) -> None:
    objs = _by_key(base_objects)
    workloads = [o for o in base_objects if o["kind"] in ("Deployment", "StatefulSet")]
    for w in workloads:
        assert _matches(w["spec"]["selector"]["matchLabels"], _pod_labels(w)), _key(w)
        spec = w["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in objs
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in objs
        mounts = {m["name"] for c in spec["containers"] for m in c.get("volumeMounts", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claims, _key(w)
    # every Service selects exactly one workload and its targetPort is a named container port of it
    for svc in (o for o in base_objects if o["kind"] == "Service"):
        selected = [w for w in workloads if _matches(svc["spec"]["selector"], _pod_labels(w))]
        assert len(selected) == 1, _key(svc)
        ports = {p["name"]: p["containerPort"] for c in selected[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, f"{_key(svc)}: {p['targetPort']}"
    hpa = objs[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) in objs
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    pdb = objs[("PodDisruptionBudget", "gateway")]["spec"]
    assert _matches(pdb["selector"]["matchLabels"], _pod_labels(objs[("Deployment", "gateway")]))


def test_kubernetes_redis_is_persistent(base_objects: list[dict[str, Any]]) -> None:
    objs = _by_key(base_objects)
    assert ("Deployment", "redis") not in objs
    sts = objs[("StatefulSet", "redis")]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = _redis_args(c["args"])
    assert args["appendonly"] == "yes" and args["maxmemory-policy"] == "noeviction" and args["dir"] == "/data"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    svc = objs[("Service", "redis")]
    assert sts["spec"]["serviceName"] == "redis" and svc["spec"]["clusterIP"] == "None"


def test_kubernetes_gateway_deployment(base_objects: list[dict[str, Any]]) -> None:
    objs = _by_key(base_objects)
    dep = objs[("Deployment", "gateway")]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"
    assert len(pod["spec"]["topologySpreadConstraints"]) >= 1
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "registry.example.com/vllm-gateway:0.1.0"
    assert c["ports"][0]["containerPort"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in c["env"]}
    assert env["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "gateway-api-keys"
    assert env["REDIS_URL"]["value"] == "redis://redis:6379/0"
    # the config file lands where the image's CMD reads it
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    cm = objs[("ConfigMap", "gateway-config")]
    assert mount["mountPath"] == "/etc/gateway" and "gateway.yaml" in cm["data"]
    assert "/etc/gateway/gateway.yaml" in _dockerfile_cmd()
    # every ${VAR} in the config without a default is provided by the container env
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", cm["data"]["gateway.yaml"])}
    assert required <= set(env)


def test_kubernetes_vllm_and_config_upstreams(base_objects: list[dict[str, Any]]) -> None:
    objs = _by_key(base_objects)
    served: dict[str, set[str]] = {}
    for name, model in (("vllm-large", "meta-llama/Llama-3.1-8B-Instruct"),
                        ("vllm-small", "Qwen/Qwen2.5-0.5B-Instruct")):
        dep = objs[("Deployment", name)]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", c["image"])
        assert c["command"] == ["vllm", "serve"] and c["args"][0] == model
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "model-cache"
                   for v in dep["spec"]["template"]["spec"]["volumes"])
        assert objs[("Service", name)]["spec"]["ports"][0]["port"] == 8000
        models = {str(_flag(c["args"], "--served-model-name"))}
        if (lora := _flag(c["args"], "--lora-modules")) is not None:
            models.add(lora.split("=")[0])
        served[name] = models
    assert "--enable-lora" in objs[("Deployment", "vllm-small")]["spec"]["template"]["spec"]["containers"][0]["args"]
    _check_config_upstreams(K8S_BASE / "gateway.yaml", served)


def test_servicemonitors(base_objects: list[dict[str, Any]]) -> None:
    """ServiceMonitor is a CRD (no schema in kubernetes-validate): check its shape and that it selects."""
    services = [o for o in base_objects if o["kind"] == "Service"]
    selected_names = set()
    for sm in (o for o in base_objects if o["kind"] == "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
        sel = sm["spec"]["selector"]["matchLabels"]
        hits = [s for s in services if _matches(sel, s["metadata"].get("labels", {}))]
        assert hits, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}
            for rl in ep.get("relabelings", []):  # monitoring.coreos.com/v1 RelabelConfig fields only
                assert set(rl) <= {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
                                   "action"}
            if sm["metadata"]["name"] == "vllm":  # engine panels join on deployment = the Service name
                assert {"sourceLabels": ["__meta_kubernetes_service_name"], "targetLabel": "deployment"} in ep[
                    "relabelings"]
            assert ep["path"] == "/metrics" and re.fullmatch(r"\d+s", ep["interval"])
            for s in hits:
                assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}
        selected_names |= {s["metadata"]["name"] for s in hits}
    assert {"gateway", "vllm-large", "vllm-small"} <= selected_names


def test_dashboards_overlay(dashboards_dir: Path) -> None:
    objs = render_kustomization(dashboards_dir)
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"
           and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    assert set(cms) == {f"dashboard-{f.removesuffix('.json')}" for f in DASHBOARD_FILES}
    for name, cm in cms.items():
        ((key, text),) = cm["data"].items()
        assert key == name.removeprefix("dashboard-") + ".json"
        json.loads(text)
        assert cm["metadata"]["namespace"] == "llm-gateway"
    kust = yaml.safe_load((K8S_DASHBOARDS / "kustomization.yaml").read_text())
    files = [f for g in kust["configMapGenerator"] for f in g["files"]]
    assert files == [f"../../../dashboards/{f}" for f in DASHBOARD_FILES]
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True


def test_real_dashboards_overlay_builds() -> None:
    missing = [f for f in DASHBOARD_FILES if not (ROOT / "dashboards" / f).is_file()]
    if missing:
        pytest.skip(f"dashboards/ does not have {', '.join(missing)} yet (the overlay was checked with stand-ins)")
    for f in DASHBOARD_FILES:
        json.loads((ROOT / "dashboards" / f).read_text())
    if _kustomize_cli() is not None:
        assert render_with_cli(K8S_DASHBOARDS)


# =============================================================================== (d) Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, args = buf.partition(" ")
        lines.append((instr.upper(), args.strip()))
        buf = ""
    return lines


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            stages.append([])
        stages[-1].append(ins)
    return stages


def _dockerfile_cmd() -> str:
    (cmd,) = [a for i, a in _stages()[-1] if i == "CMD"]
    argv = json.loads(cmd) if cmd.startswith("[") else ["sh", "-c", cmd]
    assert argv[:2] == ["sh", "-c"], "CMD must go through a shell to expand ${GATEWAY_WORKERS}"
    return argv[2]


def test_dockerfile_installs_the_package() -> None:
    stages = _stages()
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"
    req = _pyproject()["project"]["requires-python"]
    assert req == ">=3.11"
    instrs = [ins for st in stages for ins in st]
    copies = [a for i, a in instrs if i == "COPY" and not a.startswith("--from")]
    assert any(a.split()[0] == "pyproject.toml" for a in copies)
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        pkg = pattern.rstrip("*")
        assert any(a.split()[0] == pkg for a in copies), f"package {pkg} is not copied"
        assert (ROOT / pkg / "__init__.py").exists()
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the image must `pip install .` (the pyproject package)"
    # .dockerignore must not hide what the build copies
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & {"pyproject.toml", "gateway", "gateway/", "*.toml", "*"}


def test_dockerfile_runtime() -> None:
    final = _stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (expose,) = [a for i, a in final if i == "EXPOSE"]
    port = expose.split("/")[0]
    cmd = _dockerfile_cmd()
    script = _pyproject()["project"]["scripts"]
    assert script == {"gateway": "gateway.cli:main"}
    argv = cmd.split()
    assert argv[0] == "exec" and argv[1] in script and argv[2] == "serve"
    assert _flag(argv, "--port") == port
    assert _flag(argv, "--host") == "0.0.0.0"
    assert _flag(argv, "--config") == "/etc/gateway/gateway.yaml"
    assert _flag(argv, "--workers") == "${GATEWAY_WORKERS:-2}"
    (health,) = [a for i, a in final if i == "HEALTHCHECK"]
    assert f"127.0.0.1:{port}/healthz" in health
    # the same ports in compose and kubernetes
    assert compose_doc()["services"]["gateway"]["ports"][0].endswith(f":{port}")


def test_dockerfile_cmd_parses_with_the_cli() -> None:
    """The CMD's arguments are accepted by gateway.cli's parser (run with a config that fails fast)."""
    argv = _dockerfile_cmd().replace("${GATEWAY_WORKERS:-2}", "2").split()[1:]
    argv[argv.index("--config") + 1] = "/nonexistent/gateway.yaml"
    r = subprocess.run([*_gateway_cmd(), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read gateway config" in r.stderr, r.stderr
