"""Config: strict schema, ${ENV} substitution, clear messages naming file and key path, check-config CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, hash_key, load_config, parse_config
from gateway.pricing import request_cost

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
auth:
  keys:
    - {tenant: a, key: "${KEY_A}"}
    - {tenant: b, key_sha256: "%s", admin: true}
models:
  big:
    prices: {prompt_per_1m: 3, completion_per_1m: 15, cached_prompt_per_1m: 0.3}
    deployments:
      - {url: "${VLLM_URL:-http://127.0.0.1:9}", model: llama, weight: 2, max_concurrency: 8,
         timeouts: {connect: 1, first_token: 5, total: 60}}
      - {name: second, url: "http://10.0.0.2:8000/", model: llama}
  small-gpu:
    cost_basis: {gpu_usd_per_hour: 3.6, gpu_count: 2}
    deployments: [{url: "http://h:1", model: small}]
""".replace("%s", hash_key("secret-b"))


def test_good_config_compiles() -> None:
    cfg = parse_config(GOOD, "good.yaml", env={"KEY_A": "secret-a"})
    big = cfg.models["big"]
    assert [d.name for d in big.deployments] == ["big-0", "second"]
    assert big.deployments[0].url == "http://127.0.0.1:9" and big.deployments[1].url == "http://10.0.0.2:8000"
    assert big.deployments[0].timeouts.first_token == 5 and big.deployments[0].weight == 2
    assert cfg.keys_by_sha256[hash_key("secret-a")].name == "a"
    assert cfg.keys_by_sha256[hash_key("secret-b")].admin
    assert cfg.auth_enabled
    # exact pico-USD: 600 uncached at $3/1M, 400 cached at $0.3/1M, 100 completion at $15/1M
    assert request_cost(big.pricing, 1000, 100, 400, 0.0) == 600 * 3_000_000 + 400 * 300_000 + 100 * 15_000_000
    # GPU basis: 2 GPUs at 3.6 USD/h = 0.002 USD/s; a share of 0.5 s of the busy time costs 0.001 USD
    assert request_cost(cfg.models["small-gpu"].pricing, 10, 10, 0, 0.5) == 10**9


def test_money_is_exact_integers() -> None:
    """3 tokens at $0.1/1M + 7 at $0.4/1M is exactly 3.1e-6 USD, and a million of them sum exactly."""
    cfg = parse_config("""
models: {m: {deployments: [{url: "http://127.0.0.1:1", model: m}],
             prices: {prompt_per_1m: 0.1, completion_per_1m: 0.4}}}
""", "test")
    one = request_cost(cfg.models["m"].pricing, 3, 7, 0, 0.0)
    assert one == 3_100_000  # pico-USD
    assert sum(one for _ in range(1_000_000)) == 3_100_000 * 10**6  # exactly 3.1 USD
    with pytest.raises(ConfigError, match="more than six decimals"):
        parse_config("""
models: {m: {deployments: [{url: "http://127.0.0.1:1", model: m}], prices: {prompt_per_1m: 0.00000001}}}
""", "test")


@pytest.mark.parametrize("mutate, where", [
    (lambda t: t.replace("weight: 2", "weight: -2"), "models.big.deployments.0.weight"),
    (lambda t: t.replace("max_concurrency: 8", "max_concurency: 8"),
     "models.big.deployments.0.max_concurency: unknown key"),
    (lambda t: t.replace('url: "http://h:1"', 'url: "h:1"'), "models.small-gpu.deployments.0.url"),
    (lambda t: t.replace("prompt_per_1m: 3", "prompt_per_1m: cheap"), "models.big.prices.prompt_per_1m"),
    (lambda t: t.replace("cost_basis:", "prices: {}\n    cost_basis:"), "models.small-gpu"),
    (lambda t: t.replace('key: "${KEY_A}"', 'key: "${KEY_A}", key_sha256: "ab"'), "auth.keys.0"),
    (lambda t: t.replace("${KEY_A}", "${NOT_SET_ANYWHERE}").replace("tenant: a, key:", "tenant: a, key_sha256:"),
     "auth.keys.0.key_sha256: environment variable NOT_SET_ANYWHERE is not set"),
])
def test_bad_config_names_file_and_key_path(mutate, where: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as e:
        parse_config(mutate(GOOD), "conf/gw.yaml", env={"KEY_A": "x"})
    msg = str(e.value)
    assert "conf/gw.yaml" in msg
    assert where in msg, msg


def test_unset_key_turns_auth_off(caplog: pytest.LogCaptureFixture) -> None:
    text = ("auth: {keys: [{tenant: t, key: '${GW_KEY:-}'}]}\n"
            "models: {m: {deployments: [{url: 'http://x:1', model: m}]}}")
    cfg = parse_config(text, "x.yaml", env={})
    assert not cfg.auth_enabled
    assert "authentication is OFF" in caplog.text


def test_not_yaml_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        parse_config("models: [", "bad.yaml", env={})
    with pytest.raises(ConfigError, match="cannot read gateway config /nonexistent.yaml"):
        load_config("/nonexistent.yaml")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "deploy/examples/single-vllm.yaml",
                 env={"VLLM_URL": "http://127.0.0.1:8101", "VLLM_MODEL": "smollm2", "GATEWAY_API_KEY": "k"})
    assert ok.returncode == 0, ok.stderr
    assert "1 models" in ok.stdout and "auth on" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {deployments: [{url: 'http://x:1', model: m, colour: red}]}}")
    out = run_cli("check-config", str(bad))
    assert out.returncode == 2
    assert str(bad) in out.stderr and "models.m.deployments.0.colour: unknown key" in out.stderr


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {}")
    out = run_cli("serve", "--config", str(bad), "--port", "1")
    assert out.returncode == 2 and "models" in out.stderr and str(bad) in out.stderr
