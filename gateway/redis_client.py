"""Redis connection from one URL: a plain server (redis://, rediss://, unix://) or a master found through Sentinel.

The Sentinel form names the sentinels and the master's service name, so the one `redis.url` setting
(and REDIS_URL in the shipped deployments) covers both:

    redis+sentinel://[user:password@]host1:26379,host2:26379/MASTER_NAME[/DB][?sentinel_password=...]
    rediss+sentinel://...   TLS to the master and to the sentinels

The user/password in the URL authenticate to the master (and its replicas); `sentinel_username` /
`sentinel_password` query parameters authenticate to the sentinels when they have their own
`requirepass`. Each new connection asks the sentinels where the master is, so after a failover the
next command (the store's one retry, or the next request) reaches the promoted replica; a connection
still open to a demoted master is dropped on its first READONLY answer (redis-py does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_SENTINEL_QUERY = {"sentinel_username", "sentinel_password"}


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """What a redis+sentinel:// URL says: where the sentinels are and which master to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    tls: bool = False


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse the Sentinel URL form; ValueError names what is wrong (without echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"a Sentinel URL starts with {' or '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if sep else None)
    sentinels = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel address {item.strip()!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("the path must be /MASTER_NAME or /MASTER_NAME/DB (the master's name in sentinel.conf)")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"database {path[1]!r} is not a number")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _SENTINEL_QUERY)
    if unknown:
        known = ", ".join(sorted(_SENTINEL_QUERY))
        raise ValueError(f"unknown query parameter(s) {', '.join(unknown)}; known: {known}")
    return SentinelTarget(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0, username,
                          password, _first(query, "sentinel_username"),
                          _first(query, "sentinel_password"), parts.scheme == "rediss+sentinel")


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def check_url(url: str) -> str:
    """Validate a `redis.url` for the config loader: the scheme, and the whole Sentinel form."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError(f"scheme {scheme + '://' if scheme else '(none)'} is not one of "
                         f"{', '.join(s + '://' for s in PLAIN_SCHEMES + SENTINEL_SCHEMES)}")
    return url


def describe(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


def connect(url: str, **options: Any) -> Any:
    """An asyncio redis-py client for `url`; `options` are the connection options (timeouts, retry...)."""
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return aioredis.Redis.from_url(url, **options)
    t = parse_sentinel_url(url)
    socket_opts = {k: v for k, v in options.items() if k.startswith("socket_")}
    sentinel_kwargs: dict[str, Any] = {**socket_opts, "ssl": t.tls}
    if t.sentinel_username:
        sentinel_kwargs["username"] = t.sentinel_username
    if t.sentinel_password:
        sentinel_kwargs["password"] = t.sentinel_password
    sentinel = Sentinel(list(t.sentinels), sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(t.master, redis_class=SentinelMaster, db=t.db, username=t.username,
                                 password=t.password, ssl=t.tls, **options)
    client.sentinels = sentinel
    return client


class SentinelMaster(aioredis.Redis):
    """The master's client; closing it also closes the connections to the sentinels."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinels is not None:
            await self.sentinels.aclose()
