"""The Redis URL forms: plain, TLS, and Sentinel (parsed, validated by check-config, never echoing a password)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.redis_client import SentinelTarget, check_url, describe, parse_sentinel_url


def test_sentinel_url_is_parsed() -> None:
    t = parse_sentinel_url("rediss+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/gw/2?sentinel_password=sp")
    assert t == SentinelTarget((("10.0.0.1", 26379), ("::1", 26380)), "gw", 2, "app", "s@cret", None, "sp", True)
    assert parse_sentinel_url("redis+sentinel://h:26379/mymaster") == SentinelTarget((("h", 26379),), "mymaster")
    assert describe("rediss://user:pw@redis.example.com:6380/0?ssl_cert_reqs=required") == \
        "rediss://redis.example.com:6380/0"


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel://h1:26379,h2/gw", "'h2' is not host:port"),
    ("redis+sentinel://h1:26379", "/MASTER_NAME"),
    ("redis+sentinel://h1:26379/gw/x", "database 'x'"),
    ("redis+sentinel://h1:26379/gw?password=x", "unknown query parameter(s) password"),
    ("http://h1:6379/0", "scheme http://"),
])
def test_bad_urls_are_named(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        check_url(url)


def test_check_config_rejects_a_bad_sentinel_url_without_echoing_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text('models: {m: {deployments: [{url: "http://127.0.0.1:1", model: m}]}}\n'
                   'redis: {url: "redis+sentinel://:hunter2@h1:26379,h2/gw"}\n')
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 2 and "redis.url" in out.stderr and "'h2' is not host:port" in out.stderr
    assert "hunter2" not in out.stderr
    cfg.write_text(cfg.read_text().replace(",h2/gw", ",h2:26380/gw"))
    out = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
