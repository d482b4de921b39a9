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
                             "redis-exporter", "jaeger"}
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
    assert [d["url"] for d in ds["datasources"]] == ["http://prometheus:9090", "http://jaeger:16686"]
    # traces: exemplars stored by Prometheus, their trace_id linked to the Jaeger datasource, fed by all
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    links = ds["datasources"][0]["jsonData"]["exemplarTraceIdDestinations"]
    assert links == [{"name": "trace_id", "datasourceUid": ds["datasources"][1]["uid"]}]
    assert services["gateway"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    for engine in ("vllm-large", "vllm-small"):
        assert "--otlp-traces-endpoint=http://jaeger:4318/v1/traces" in services[engine]["command"]
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
                if c["image"].split("@")[0].split(":")[0] == img["name"]:
                    digest = f"@{img['digest']}" if img.get("digest") else ""
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}{digest}"
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
    assert checked >= 2 * 22


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
        ("ServiceMonitor", "redis"), ("ConfigMap", "redis-config"), ("PodDisruptionBudget", "redis"),
        ("NetworkPolicy", "default-deny-ingress"), ("NetworkPolicy", "allow-clients-to-gateway"),
        ("NetworkPolicy", "allow-gateway-to-redis"), ("NetworkPolicy", "allow-gateway-to-vllm"),
        ("NetworkPolicy", "allow-prometheus-to-vllm"),
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
                for item in v["configMap"].get("items", []):
                    assert item["key"] in objs[("ConfigMap", v["configMap"]["name"])]["data"], _key(w)
                assert ("ConfigMap", v["configMap"]["name"]) in objs
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in objs
        mounts = {m["name"] for c in _pod_containers(w) for m in c.get("volumeMounts", [])}
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
    for name in ("gateway", "redis"):
        pdb = objs[("PodDisruptionBudget", name)]["spec"]
        selected = [w for w in workloads if _matches(pdb["selector"]["matchLabels"], _pod_labels(w))]
        assert [_key(w) for w in selected] == [(("Deployment" if name == "gateway" else "StatefulSet"), name)]


def _redis_conf(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition(" ")
            out[k] = v.strip()
    return out


def _sts_redis(objs: dict[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    sts = objs[("StatefulSet", "redis")]
    return sts, {c["name"]: c for c in _pod_containers(sts)}


def test_kubernetes_redis_is_persistent_and_replicated(base_objects: list[dict[str, Any]]) -> None:
    """Master + 2 replicas + a sentinel per pod, AOF and noeviction on a per-pod volume, one pod per node.
    tests/test_k8s_redis_sentinel.py runs the init and preStop scripts against real Redis and Sentinel."""
    objs = _by_key(base_objects)
    assert ("Deployment", "redis") not in objs
    sts, containers = _sts_redis(objs)
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["podManagementPolicy"] == "OrderedReady"
    assert set(containers) == {"config", "redis", "sentinel", "exporter"}
    conf_map = objs[("ConfigMap", "redis-config")]["data"]
    assert set(conf_map) == {"redis.conf", "redis-init.sh", "redis-prestop.sh"}
    conf = _redis_conf(conf_map["redis.conf"])
    assert conf["appendonly"] == "yes" and conf["maxmemory-policy"] == "noeviction" and conf["dir"] == "/data"
    # the init container writes the per-pod files where the containers read them
    assert containers["config"]["command"] == ["sh", "/etc/redis/redis-init.sh"]
    assert containers["redis"]["command"] == ["redis-server", "/run/redis/redis.conf"]
    assert containers["sentinel"]["command"] == ["redis-sentinel", "/run/redis/sentinel.conf"]
    assert "BASE_CONF:-/etc/redis/redis.conf" in conf_map["redis-init.sh"]
    assert "CONF_DIR:-/run/redis" in conf_map["redis-init.sh"]
    for name in ("config", "redis", "sentinel"):
        mounts = {m["name"]: m["mountPath"] for m in containers[name]["volumeMounts"]}
        assert mounts["run"] == "/run/redis", name
        if name != "sentinel":
            assert mounts["config"] == "/etc/redis", name
    vols = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert vols["run"]["emptyDir"]["medium"] == "Memory"  # the generated files hold the password
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in containers["redis"]["volumeMounts"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # peers: one address per replica, as the gateway's REDIS_URL names them
    env = {e["name"]: e for e in containers["config"]["env"]}
    assert env["REPLICAS"]["value"] == str(sts["spec"]["replicas"])
    assert env["PEER_FMT"]["value"] == f"redis-%s.{sts['spec']['serviceName']}"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert containers["redis"]["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "/etc/redis/redis-prestop.sh"]
    assert {e["name"] for e in containers["redis"]["env"]} >= {"POD_NAME", "REPLICAS", "PEER_FMT", "REDIS_PASSWORD"}
    # the preStop waits at most AWARE_S for an informed sentinel and WAIT_S for the handover: within the grace
    waits = [int(re.search(rf"{v}=\$\{{{v}:-(\d+)\}}", conf_map["redis-prestop.sh"]).group(1))  # type: ignore[union-attr]
             for v in ("AWARE_S", "WAIT_S")]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= sum(waits) + 5
    # never two copies on one node
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {"topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule"}.items() <= next(
        t for t in spread if t["topologyKey"] == "kubernetes.io/hostname").items()
    svc = objs[("Service", "redis")]
    assert sts["spec"]["serviceName"] == "redis" and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True  # a starting pod must resolve its peers
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"redis": 6379, "sentinel": 26379, "metrics": 9121}
    # the exporter reads the local Redis with the Secret's password (GatewayRedisMemoryNearMax needs it)
    exporter = _env(containers["exporter"])
    assert exporter["REDIS_ADDR"]["value"] == "redis://127.0.0.1:6379"
    assert exporter["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2) or "", 1)


def test_kubernetes_gateway_deployment(base_objects: list[dict[str, Any]]) -> None:
    from gateway.config import parse_config

    objs = _by_key(base_objects)
    dep = objs[("Deployment", "gateway")]
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]
    # /metrics needs the key: no annotation-based scraping (it would get 401); the ServiceMonitor sends it
    assert not any(k.startswith("prometheus.io/") for k in pod["metadata"].get("annotations", {}))
    assert len(pod["spec"]["topologySpreadConstraints"]) >= 1
    (c,) = pod["spec"]["containers"]
    assert re.fullmatch(r"registry\.example\.com/vllm-gateway:0\.1\.0@sha256:[0-9a-f]{64}", c["image"])
    assert c["ports"][0]["containerPort"] == 8000
    # one engine down must not take every replica out of the Service (tests/test_readiness.py)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz?require=any"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    env = _env(c)
    assert env["GATEWAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "gateway-api-keys"
    assert env["GATEWAY_METRICS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-metrics", "key": "token"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    # the config file lands where the image's CMD reads it
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    cm = objs[("ConfigMap", "gateway-config")]
    assert mount["mountPath"] == "/etc/gateway" and "gateway.yaml" in cm["data"]
    assert "/etc/gateway/gateway.yaml" in _dockerfile_cmd()
    # every ${VAR} in the config without a default is provided by the container env
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", cm["data"]["gateway.yaml"])}
    assert required <= set(env)
    assert yaml.safe_load(cm["data"]["gateway.yaml"])["server"]["metrics_key"] == "${GATEWAY_METRICS_KEY}"
    # the root file system is read-only: every place the gateway writes is a volume (the spool in
    # GATEWAY_STATE_DIR from the Dockerfile, PROMETHEUS_MULTIPROC_DIR under /tmp)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    state_dir = next(a.split("=", 1)[1] for i, a in _stages()[-1] if i == "ENV"
                     for a in a.split() if a.startswith("GATEWAY_STATE_DIR="))
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    for path in (state_dir, "/tmp"):
        assert path in mounts and "emptyDir" in vols[mounts[path]], path
    spool_max = parse_config(cm["data"]["gateway.yaml"], "gateway.yaml",
                             _dummy_env(K8S_BASE / "gateway.yaml")).features.ledger.spool_max_bytes
    assert _bytes(vols[mounts[state_dir]]["emptyDir"]["sizeLimit"]) > spool_max


def test_kubernetes_gateway_redis_url(base_objects: list[dict[str, Any]]) -> None:
    """REDIS_URL names every Redis pod's sentinel and the master name the sentinels monitor; the password
    comes from the Secret through the kubelet's $(VAR) expansion (never written in the manifest)."""
    from gateway.redis_client import parse_sentinel_url

    objs = _by_key(base_objects)
    (c,) = objs[("Deployment", "gateway")]["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in c["env"]]
    url = _env(c)["REDIS_URL"]["value"]
    refs = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", url))
    assert refs == {"REDIS_PASSWORD"}
    for ref in refs:  # the kubelet expands only variables defined earlier in the list
        assert names.index(ref) < names.index("REDIS_URL")
    t = parse_sentinel_url(url.replace("$(REDIS_PASSWORD)", "0123abcd"))
    assert t.password == "0123abcd" and t.sentinel_password == "0123abcd" and t.username is None
    sts, containers = _sts_redis(objs)
    peer_fmt = _env(containers["config"])["PEER_FMT"]["value"]
    sentinel_port = containers["sentinel"]["ports"][0]["containerPort"]
    assert list(t.sentinels) == [(peer_fmt % i, sentinel_port) for i in range(sts["spec"]["replicas"])]
    init = objs[("ConfigMap", "redis-config")]["data"]["redis-init.sh"]
    assert f"MASTER_NAME=${{MASTER_NAME:-{t.master}}}" in init and "MASTER_NAME" not in _env(containers["config"])
    # passwords must be URL-safe, and the init script refuses others rather than break the URL
    assert "openssl rand -hex" in init


def test_kubernetes_gateway_grace_covers_shutdown(base_objects: list[dict[str, Any]]) -> None:
    """A preStop hook (if any), the drain notice and server.shutdown_grace_s all count against
    terminationGracePeriodSeconds: the pod must not be SIGKILLed while it still serves the notice, streams
    still have their grace to finish, or records are being flushed."""
    from gateway.config import parse_config

    objs = _by_key(base_objects)
    pod = objs[("Deployment", "gateway")]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    prestop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    prestop_s = float(prestop[1]) if prestop else 0.0
    assert prestop is None or prestop[0] == "sleep"
    text = objs[("ConfigMap", "gateway-config")]["data"]["gateway.yaml"]
    server = parse_config(text, "gateway.yaml", _dummy_env(K8S_BASE / "gateway.yaml")).server
    assert server.shutdown_grace_s == 30.0
    # the notice must outlast the endpoint removal's propagation; it keeps serving meanwhile
    assert server.drain_notice_s >= 5 or prestop_s >= 5
    flush_margin_s = 10  # the ledger flush and the process exit after the last stream
    assert pod["terminationGracePeriodSeconds"] >= prestop_s + server.drain_notice_s + server.shutdown_grace_s \
        + flush_margin_s


RELEASE_FILLED = {"registry.example.com/vllm-gateway", "vllm/vllm-openai"}
_ZERO_DIGEST = "sha256:" + "0" * 64


def test_kubernetes_images_pinned_by_digest(base_objects: list[dict[str, Any]], dashboards_dir: Path) -> None:
    """Every image is name:tag@sha256:<digest>; all-zero digests are the placeholders the release step fills
    in (docs/deploy.md), and only for the images it names."""
    seen = set()
    for label, objs in _all_renderings(base_objects, dashboards_dir):
        for o in objs:
            for c in _pod_containers(o):
                m = re.fullmatch(r"([a-z0-9._/-]+):([A-Za-z0-9._-]+)@(sha256:[0-9a-f]{64})", c["image"])
                assert m, f"{label}: {_key(o)} {c['name']}: {c['image']} is not pinned by digest"
                if m.group(3) == _ZERO_DIGEST:
                    assert m.group(1) in RELEASE_FILLED, f"{label}: {c['image']}: placeholder digest"
                seen.add(m.group(1))
    assert {"registry.example.com/vllm-gateway", "vllm/vllm-openai", "redis", "oliver006/redis_exporter"} <= seen
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name in RELEASE_FILLED:
        assert name.split("/")[-1] in docs


_SECRET_CMD = re.compile(r"create secret generic ([a-z0-9-]+)((?:\\\n|[^\n])*)")  # to the command's end


def _documented_secrets(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in _SECRET_CMD.finditer(text):
        out.setdefault(m.group(1), set()).update(re.findall(r"--from-literal=([A-Za-z_0-9]+)=", m.group(2)))
    return out


def _secret_refs(objs: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    refs = []
    for o in objs:
        for c in _pod_containers(o):
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    refs.append((ref["name"], ref["key"], bool(ref.get("optional"))))
        if o["kind"] == "ServiceMonitor":
            for ep in o["spec"]["endpoints"]:
                if cred := ep.get("authorization", {}).get("credentials"):
                    refs.append((cred["name"], cred["key"], False))
    return refs


def test_kubernetes_secret_refs_are_created_by_the_documented_commands(base_objects: list[dict[str, Any]]) -> None:
    """The Secrets are not in the repository: every non-optional key a pod or ServiceMonitor reads is created
    by the `kubectl create secret` lines of kustomization.yaml and docs/deploy.md."""
    refs = _secret_refs(base_objects)
    assert {(n, k) for n, k, _ in refs} >= {("redis-auth", "password"), ("gateway-metrics", "token"),
                                             ("gateway-api-keys", "GATEWAY_API_KEY")}
    for source in (K8S_BASE / "kustomization.yaml", ROOT / "docs" / "deploy.md"):
        documented = _documented_secrets(source.read_text())
        for name, key, optional in refs:
            if not optional:
                assert key in documented.get(name, set()), f"{source.name}: no command creates {name}/{key}"
        assert not any(o["kind"] == "Secret" for o in base_objects)


def _port_number(pod: dict[str, Any], port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    for c in pod["spec"]["template"]["spec"]["containers"]:
        for p in c.get("ports", []):
            if p["name"] == port:
                return int(p["containerPort"])
    return None


def _selects(sel: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(sel) <= {"matchLabels"}, sel  # matchExpressions: not used here, not evaluated
    return _matches(sel.get("matchLabels", {}), labels)


def ingress_allowed(policies: list[dict[str, Any]], dst: dict[str, Any], port: int, src_labels: dict[str, str],
                    src_namespace: str, namespaces: dict[str, dict[str, str]]) -> bool:
    """NetworkPolicy ingress semantics (namespace-local policies, label selectors, TCP ports): a pod no policy
    selects takes everything; a selected pod takes what any rule of any selecting policy allows."""
    dst_ns = dst["metadata"]["namespace"]
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], _pod_labels(dst))]
    if not selecting:
        return True
    for pol in selecting:
        for rule in pol["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and _port_number(dst, p["port"]) == port
                                             for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                if "namespaceSelector" in peer:
                    ns_ok = _selects(peer["namespaceSelector"], namespaces.get(src_namespace, {}))
                else:
                    ns_ok = src_namespace == dst_ns
                pod_ok = _selects(peer.get("podSelector", {}), src_labels)
                if ns_ok and pod_ok:
                    return True
    return False


def test_kubernetes_network_policies(base_objects: list[dict[str, Any]]) -> None:
    """Only gateway pods reach Redis and vLLM; Redis pods reach each other; Prometheus (namespace monitoring)
    reaches the gateway and vLLM's port; clients reach the gateway's port 8000 and nothing else."""
    objs = _by_key(base_objects)
    policies = [o for o in base_objects if o["kind"] == "NetworkPolicy"]
    workloads = [o for o in base_objects if o["kind"] in ("Deployment", "StatefulSet")]
    ns = "llm-gateway"
    namespaces = {ns: {"kubernetes.io/metadata.name": ns},
                  "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
                  "other": {"kubernetes.io/metadata.name": "other"}}
    for pol in policies:  # every selector selects something, every named port exists on what it selects
        selected = [w for w in workloads if _selects(pol["spec"]["podSelector"], _pod_labels(w))]
        assert selected, pol["metadata"]["name"]
        for rule in pol["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                assert all(_port_number(w, p["port"]) for w in selected), (pol["metadata"]["name"], p)
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    assert any(_selects(peer["podSelector"], _pod_labels(w)) for w in workloads), peer
    for w in workloads:  # default deny covers every pod
        assert not ingress_allowed(policies, w, 12345, {"app": "x"}, ns, namespaces), _key(w)

    gateway_labels = _pod_labels(objs[("Deployment", "gateway")])
    redis_labels = _pod_labels(objs[("StatefulSet", "redis")])
    vllm_labels = _pod_labels(objs[("Deployment", "vllm-large")])
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    stranger = {"app": "debug-shell"}
    redis, gw = objs[("StatefulSet", "redis")], objs[("Deployment", "gateway")]

    def allowed(dst: dict[str, Any], port: int, labels: dict[str, str], src_ns: str = ns) -> bool:
        return ingress_allowed(policies, dst, port, labels, src_ns, namespaces)

    for port in (6379, 26379):
        assert allowed(redis, port, gateway_labels) and allowed(redis, port, redis_labels)
        for labels, src_ns in ((stranger, ns), (vllm_labels, ns), (gateway_labels, "other"),
                               (prometheus, "monitoring")):
            assert not allowed(redis, port, labels, src_ns), (port, labels, src_ns)
    assert allowed(redis, 9121, prometheus, "monitoring")  # the exporter, for Prometheus only
    for labels, src_ns in ((stranger, ns), (gateway_labels, ns), (prometheus, "other")):
        assert not allowed(redis, 9121, labels, src_ns), (labels, src_ns)
    for name in ("vllm-large", "vllm-small"):
        vllm = objs[("Deployment", name)]
        assert allowed(vllm, 8000, gateway_labels) and allowed(vllm, 8000, prometheus, "monitoring")
        for labels, src_ns in ((stranger, ns), (redis_labels, ns), (prometheus, "other"), (stranger, "monitoring"),
                               (gateway_labels, "other")):
            assert not allowed(vllm, 8000, labels, src_ns), (name, labels, src_ns)
    assert allowed(gw, 8000, stranger, "other") and allowed(gw, 8000, prometheus, "monitoring")
    assert not allowed(gw, 9000, stranger, "other")


def test_kubernetes_pdbs_let_unhealthy_pods_go(base_objects: list[dict[str, Any]]) -> None:
    """A PDB must never block a node drain because pods are unready anyway (crash loop, engines gone)."""
    pdbs = [o for o in base_objects if o["kind"] == "PodDisruptionBudget"]
    assert {p["metadata"]["name"] for p in pdbs} == {"gateway", "redis"}
    for p in pdbs:
        assert p["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert p["spec"]["maxUnavailable"] == 1 and "minAvailable" not in p["spec"]


ADAPTER_VALUES = K8S / "autoscaling" / "prometheus-adapter-values.yaml"


def test_kubernetes_hpa_scales_on_in_flight_requests(base_objects: list[dict[str, Any]],
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The HPA's custom metric is one prometheus-adapter serves (rule in deploy/kubernetes/autoscaling) from a
    series the gateway exports, with a query Prometheus parses; CPU stays as the second signal."""
    from gateway.metrics import GatewayMetrics

    hpa = _by_key(base_objects)[("HorizontalPodAutoscaler", "gateway")]["spec"]
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert set(kinds) == {"Pods", "Resource"} and kinds["Resource"]["resource"]["name"] == "cpu"
    pods_metric = kinds["Pods"]["pods"]
    assert pods_metric["target"]["type"] == "AverageValue" and float(pods_metric["target"]["averageValue"]) > 0
    name = pods_metric["metric"]["name"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60

    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    (rule,) = [r for r in values["rules"]["custom"] if r["name"]["as"] == name]
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    assert re.fullmatch(rule["name"]["matches"], series)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    # the gateway exports that series (a gauge, one sample per model)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = GatewayMetrics({"m"}, {"d"})
    metrics.in_flight.labels(model="m").inc()
    assert re.search(rf"^{series}\{{model=\"m\"\}} 1\.0$", metrics.render().decode(), re.M)
    # the query, as the adapter fills in its template, parses in Prometheus
    query = (rule["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'namespace="llm-gateway",pod=~"gateway-a|gateway-b"')
             .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in query
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: the query was not parsed")
    rules = tmp_path / "q.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [{"record": "q:in_flight", "expr": query}]}]}))
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_vllm_and_config_upstreams(base_objects: list[dict[str, Any]]) -> None:
    objs = _by_key(base_objects)
    served: dict[str, set[str]] = {}
    for name, model in (("vllm-large", "meta-llama/Llama-3.1-8B-Instruct"),
                        ("vllm-small", "Qwen/Qwen2.5-0.5B-Instruct")):
        dep = objs[("Deployment", name)]
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+@sha256:[0-9a-f]{64}", c["image"])
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
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                               "authorization"}
            if sm["metadata"]["name"] == "gateway":  # /metrics needs the key the gateway reads from the Secret
                assert ep["authorization"] == {"type": "Bearer",
                                               "credentials": {"name": "gateway-metrics", "key": "token"}}
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
    assert {"gateway", "vllm-large", "vllm-small", "redis"} <= selected_names


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
    assert re.search(r"""pip install (\.|"\.\[tracing\]")(\s|$)""", runs), \
        "the image must `pip install .` (the pyproject package, with its tracing extra)"
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
