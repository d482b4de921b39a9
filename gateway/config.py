"""Configuration: strict YAML schema, ${ENV} substitution, and compilation into a frozen runtime view."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("gateway.config")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """A config that cannot be served; the message names the file, the key path and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    connect: float = Field(5.0, gt=0, description="seconds to open a TCP connection to vLLM")
    first_token: float = Field(60.0, gt=0, description="seconds from sending until response headers / first chunk")
    total: float = Field(600.0, gt=0, description="seconds for the whole upstream request")


class DeploymentSpec(_Strict):
    name: str | None = None
    url: str
    model: str = Field(description="model name on the vLLM server (a base model or a LoRA adapter)")
    weight: float = Field(1.0, gt=0)
    max_concurrency: int = Field(256, ge=1, description="requests this gateway worker sends at once")
    timeouts: Timeouts = Timeouts()
    api_key: str | None = Field(None, description="bearer token vLLM expects (--api-key), if any")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class Prices(_Strict):
    prompt_per_1m: float = Field(0.0, ge=0)
    completion_per_1m: float = Field(0.0, ge=0)
    cached_prompt_per_1m: float | None = Field(None, ge=0, description="defaults to prompt_per_1m")


class CostBasis(_Strict):
    gpu_usd_per_hour: float = Field(gt=0)
    gpu_count: int = Field(1, ge=1)


class ModelSpec(_Strict):
    deployments: list[DeploymentSpec] = Field(min_length=1)
    prices: Prices | None = None
    cost_basis: CostBasis | None = None
    owned_by: str = "vllm"

    @model_validator(mode="after")
    def _one_cost_source(self) -> ModelSpec:
        if self.prices is not None and self.cost_basis is not None:
            raise ValueError("give either prices or cost_basis, not both")
        return self


class ApiKeySpec(_Strict):
    tenant: str = Field(min_length=1)
    key_sha256: str | None = Field(None, description="hex SHA-256 of the key")
    key: str | None = Field(None, description="the key itself, normally as ${ENV_NAME}")
    admin: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> ApiKeySpec:
        if (self.key_sha256 is None) == (self.key is None):
            raise ValueError("give exactly one of key_sha256 or key")
        if self.key_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError("key_sha256 must be 64 lowercase hex digits")
        return self


class AuthSpec(_Strict):
    keys: list[ApiKeySpec] = []


class ServerSpec(_Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait for a deployment slot")
    health_interval: float = Field(5.0, gt=0)
    request_log: str = Field("stderr", description="stderr, stdout, off, or a file path")


class GatewaySpec(_Strict):
    server: ServerSpec = ServerSpec()
    auth: AuthSpec = AuthSpec()
    models: dict[str, ModelSpec] = Field(min_length=1)


# ---------------------------------------------------------------- compiled, immutable runtime view


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    url: str
    upstream_model: str
    weight: float
    max_concurrency: int
    timeouts: Timeouts
    api_key: str | None


@dataclass(frozen=True, slots=True)
class Pricing:
    """USD per token (already divided by 1e6) or a GPU cost per second; see docs/config.md."""

    prompt: float = 0.0
    completion: float = 0.0
    cached_prompt: float = 0.0
    gpu_usd_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    deployments: tuple[Deployment, ...]
    pricing: Pricing
    owned_by: str


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    server: ServerSpec
    models: dict[str, Model]
    keys_by_sha256: dict[str, Tenant]
    auth_enabled: bool
    tenants: tuple[str, ...] = field(default=())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def substitute_env(value: Any, env: dict[str, str] | os._Environ[str]) -> Any:
    """Replace ${NAME} and ${NAME:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = env.get(name)
            if got is None or got == "":
                if default is None:
                    raise KeyError(name)
                return default
            return got

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env) for v in value]
    return value


def _substitute_with_paths(tree: Any, env: dict[str, str] | os._Environ[str], path: str = "") -> Any:
    """Like substitute_env, but an unset variable without default names its key path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            key_path = f"{path}.{k}" if path else str(k)
            key = _substitute_with_paths(k, env, key_path) if isinstance(k, str) else k
            out[key] = _substitute_with_paths(v, env, key_path)
        return out
    if isinstance(tree, list):
        return [_substitute_with_paths(v, env, f"{path}.{i}") for i, v in enumerate(tree)]
    try:
        return substitute_env(tree, env)
    except KeyError as e:
        raise ConfigError(f"{path}: environment variable {e.args[0]} is not set and has no default") from None


def _drop_unset_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """An API key given as ${VAR} with VAR unset resolves to "" and is dropped (auth may end up off)."""
    auth = raw.get("auth")
    if isinstance(auth, dict) and isinstance(auth.get("keys"), list):
        kept = [k for k in auth["keys"] if not (isinstance(k, dict) and k.get("key") == "")]
        if len(kept) != len(auth["keys"]):
            log.warning("api key entries with an empty key were dropped (their env variable is unset)")
        auth = {**auth, "keys": kept}
        raw = {**raw, "auth": auth}
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid gateway config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, source: str, env: dict[str, str] | os._Environ[str] | None = None) -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid gateway config {source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid gateway config {source}: top level must be a mapping")
    try:
        raw = _substitute_with_paths(raw, os.environ if env is None else env)
    except ConfigError as e:
        raise ConfigError(f"invalid gateway config {source}: {e}") from None
    raw = _drop_unset_keys(raw)
    try:
        spec = GatewaySpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None
    return compile_config(spec, source)


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read gateway config {p}: {e.strerror}") from None
    return parse_config(text, str(p))


def compile_config(spec: GatewaySpec, source: str) -> GatewayConfig:
    models: dict[str, Model] = {}
    seen_deployments: set[str] = set()
    for name, m in spec.models.items():
        deps = []
        for i, d in enumerate(m.deployments):
            dep_name = d.name or f"{name}-{i}"
            if dep_name in seen_deployments:
                raise ConfigError(f"invalid gateway config {source}:\n  models.{name}.deployments.{i}.name: "
                                  f"deployment name {dep_name!r} is used twice")
            seen_deployments.add(dep_name)
            deps.append(Deployment(dep_name, d.url, d.model, d.weight, d.max_concurrency, d.timeouts, d.api_key))
        if m.prices is not None:
            p = m.prices
            cached = p.prompt_per_1m if p.cached_prompt_per_1m is None else p.cached_prompt_per_1m
            pricing = Pricing(p.prompt_per_1m / 1e6, p.completion_per_1m / 1e6, cached / 1e6)
        elif m.cost_basis is not None:
            pricing = Pricing(gpu_usd_per_second=m.cost_basis.gpu_usd_per_hour * m.cost_basis.gpu_count / 3600.0)
        else:
            pricing = Pricing()
        models[name] = Model(name, tuple(deps), pricing, m.owned_by)

    keys: dict[str, Tenant] = {}
    for k in spec.auth.keys:
        digest = k.key_sha256 or hash_key(k.key or "")
        keys[digest] = Tenant(k.tenant, k.admin)
    if not keys:
        log.warning("no API keys configured: authentication is OFF, every caller is tenant 'anonymous'")
    tenants = tuple(sorted({t.name for t in keys.values()} | ({"anonymous"} if not keys else set())))
    return GatewayConfig(source, spec.server, models, keys, bool(keys), tenants)
