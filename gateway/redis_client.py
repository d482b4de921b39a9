"""Redis connection from one URL: a plain server (redis://, rediss://, unix://), a master found through Sentinel,
or a Redis Cluster.

The Sentinel form names the sentinels and the master's service name, so the one `redis.url` setting
(and REDIS_URL in the shipped deployments) covers both:

    redis+sentinel://[user:password@]host1:26379,host2:26379/MASTER_NAME[/DB][?sentinel_password=...]
    rediss+sentinel://...   TLS to the master and to the sentinels

The user/password in the URL authenticate to the master (and its replicas); `sentinel_username` /
`sentinel_password` query parameters authenticate to the sentinels when they have their own
`requirepass`. Each new connection asks the sentinels where the master is, so after a failover the
next command (the store's one retry, or the next request) reaches the promoted replica; a connection
still open to a demoted master is dropped on its first READONLY answer (redis-py does that).

The Cluster form lists seed nodes (any masters or replicas of the cluster; one that answers is enough):

    redis+cluster://[user:password@]host1:7000,host2:7001[,...]
    rediss+cluster://...[?ssl_ca_certs=/path/ca.pem&ssl_cert_reqs=required&ssl_certfile=...&ssl_keyfile=...]
                           TLS to every node (a private CA, a client certificate)

redis-py's asyncio RedisCluster asks a seed for the slot map (CLUSTER SLOTS), sends each command to
the master of its key's slot, follows MOVED/ASK and reloads the map after a connection error (a
failover). A Cluster has only database 0: the URL has no path. Every multi-key call of the gateway
keeps its keys in one hash slot (docs/redis.md, "Redis Cluster").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Connections per cluster node (redis-py raises MaxConnectionsError beyond it): far above what one gateway
# process keeps open (one per command in flight), so the bound is never what fails a request.
CLUSTER_MAX_CONNECTIONS = 4096
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
    username, password, sentinels = _credentials_and_hosts(parts.netloc, "sentinel")
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


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """What a redis+cluster:// URL says: the seed nodes and the credentials for every node."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_options: tuple[tuple[str, str], ...] = ()  # the ssl_* query parameters, for redis-py


_CLUSTER_TLS_QUERY = {"ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"}


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse the Cluster URL form; ValueError names what is wrong (without echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"a Cluster URL starts with {' or '.join(s + '://' for s in CLUSTER_SCHEMES)}")
    username, password, seeds = _credentials_and_hosts(parts.netloc, "cluster node")
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0: leave the path out")
    tls = parts.scheme == "rediss+cluster"
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _CLUSTER_TLS_QUERY) if tls else sorted(query)
    if unknown:
        known = ", ".join(sorted(_CLUSTER_TLS_QUERY)) + " (rediss+cluster:// only)"
        raise ValueError(f"unknown query parameter(s) {', '.join(unknown)}; known: {known}")
    options = tuple(sorted((k, v[0]) for k, v in query.items()))
    reqs = dict(options).get("ssl_cert_reqs")
    if reqs is not None and reqs not in ("none", "optional", "required"):
        raise ValueError(f"ssl_cert_reqs {reqs!r} is not none, optional or required")
    return ClusterTarget(tuple(seeds), username, password, tls, options)


def _credentials_and_hosts(netloc: str, what: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if sep else None)
    hosts = []
    for item in hostlist.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{what} address {item.strip()!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    return username, password, hosts


def is_cluster(url: str | None) -> bool:
    return bool(url) and urlsplit(url or "").scheme in CLUSTER_SCHEMES


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def check_url(url: str) -> str:
    """Validate a `redis.url` for the config loader: the scheme, and the whole Sentinel and Cluster forms."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
    elif scheme in CLUSTER_SCHEMES:
        parse_cluster_url(url)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError(f"scheme {scheme + '://' if scheme else '(none)'} is not one of "
                         f"{', '.join(s + '://' for s in PLAIN_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES)}")
    return url


def describe(url: str) -> str:
    """The URL without credentials, for logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


def connect(url: str, **options: Any) -> Any:
    """An asyncio redis-py client for `url`; `options` are the connection options (timeouts, retry...)."""
    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        return connect_cluster(parse_cluster_url(url), **options)
    if scheme not in SENTINEL_SCHEMES:
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


def connect_cluster(t: ClusterTarget, **options: Any) -> RedisCluster:
    """redis-py's asyncio RedisCluster on the seeds. It keeps serving the slots it can when some are not
    covered (a master down before its replica is promoted): the gateway marks only those slots down."""
    opts: dict[str, Any] = {**dict(t.tls_options), **options}
    if opts.get("max_connections") is None:
        opts["max_connections"] = CLUSTER_MAX_CONNECTIONS
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in t.seeds],
                        username=t.username, password=t.password, ssl=t.tls, require_full_coverage=False,
                        **opts)
