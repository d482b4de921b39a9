#!/bin/sh
# Writes this pod's redis.conf and sentinel.conf into $CONF_DIR (init container of the redis StatefulSet;
# tests/test_k8s_redis_sentinel.py runs it against real redis-server/redis-sentinel processes).
#
# Which pod is the master is the sentinels' business. On every start the pod asks the other pods'
# sentinels; if one names a master, the pod starts as its replica (or as the master, when it is named
# itself). If no sentinel answers, this is the first start of the set (pods start in order: 0, 1, 2):
# pod 0 is the master. Sentinel state lives in an emptyDir and is rebuilt from its peers on each start.
#
# Environment: POD_NAME (redis-<ordinal>), REDIS_PASSWORD (Secret redis-auth), REPLICAS, PEER_FMT (printf
# pattern of a pod's address, e.g. redis-%s.redis). Optional: CONF_DIR, REDIS_PORT, SENTINEL_PORT,
# MASTER_NAME, QUORUM, DOWN_AFTER_MS, BIND (default: every interface), BASE_CONF.
set -eu

: "${POD_NAME:?}" "${REPLICAS:?}" "${PEER_FMT:?}"
: "${REDIS_PASSWORD:?REDIS_PASSWORD is empty: create the Secret redis-auth (docs/deploy.md)}"
CONF_DIR=${CONF_DIR:-/run/redis}
REDIS_PORT=${REDIS_PORT:-6379}
SENTINEL_PORT=${SENTINEL_PORT:-26379}
MASTER_NAME=${MASTER_NAME:-gateway}
QUORUM=${QUORUM:-2}
DOWN_AFTER_MS=${DOWN_AFTER_MS:-5000}
BIND=${BIND:-* -::*}
BASE_CONF=${BASE_CONF:-/etc/redis/redis.conf}

case "$REDIS_PASSWORD" in
  *[!A-Za-z0-9._~-]*) echo "REDIS_PASSWORD must be URL-safe (the gateway's REDIS_URL carries it): use openssl rand -hex 32" >&2
                      exit 1 ;;
esac

ordinal=${POD_NAME##*-}
peer() { printf "$PEER_FMT" "$1"; }
self=$(peer "$ordinal")
export REDISCLI_AUTH="$REDIS_PASSWORD"  # redis-cli reads the password from here, not from argv

master=""
i=0
while [ "$i" -lt "$REPLICAS" ]; do
  if [ "$i" != "$ordinal" ]; then
    # Two lines (host, port) when the sentinel knows the master; anything else is no answer.
    answer=$(timeout 3 redis-cli --raw -h "$(peer "$i")" -p "$SENTINEL_PORT" \
             sentinel get-master-addr-by-name "$MASTER_NAME" 2>/dev/null || true)
    host=$(printf '%s\n' "$answer" | sed -n 1p)
    port=$(printf '%s\n' "$answer" | sed -n 2p)
    case "$port" in
      ''|*[!0-9]*) ;;
      *) master=$host; echo "sentinel at $(peer "$i") names master $host:$port"; break ;;
    esac
  fi
  i=$((i + 1))
done
if [ -z "$master" ]; then
  master=$(peer 0)
  echo "no sentinel knows master $MASTER_NAME: first start, $master is the master"
fi

mkdir -p "$CONF_DIR"
umask 077  # both files hold the password
{
  echo "include $BASE_CONF"
  echo "bind $BIND"
  echo "port $REDIS_PORT"
  echo "requirepass \"$REDIS_PASSWORD\""
  echo "masterauth \"$REDIS_PASSWORD\""
  echo "replica-announce-ip $self"
  echo "replica-announce-port $REDIS_PORT"
  if [ "$master" != "$self" ]; then
    echo "replicaof $master $REDIS_PORT"
  fi
} > "$CONF_DIR/redis.conf"

{
  echo "bind $BIND"
  echo "port $SENTINEL_PORT"
  echo "dir $CONF_DIR"
  echo "sentinel resolve-hostnames yes"
  echo "sentinel announce-hostnames yes"
  echo "sentinel announce-ip $self"
  echo "sentinel announce-port $SENTINEL_PORT"
  echo "requirepass \"$REDIS_PASSWORD\""
  echo "sentinel sentinel-pass \"$REDIS_PASSWORD\""
  echo "sentinel monitor $MASTER_NAME $master $REDIS_PORT $QUORUM"
  echo "sentinel auth-pass $MASTER_NAME \"$REDIS_PASSWORD\""
  echo "sentinel down-after-milliseconds $MASTER_NAME $DOWN_AFTER_MS"
  # also how long a replica left following the old master waits before the sentinels fix it (default 180 s)
  echo "sentinel failover-timeout $MASTER_NAME 10000"
  echo "sentinel parallel-syncs $MASTER_NAME 1"
} > "$CONF_DIR/sentinel.conf"
echo "$self: $( [ "$master" = "$self" ] && echo master || echo "replica of $master" )"
