#!/bin/sh
# preStop of the redis container: a master hands over to a replica before it stops, so a node drain or a
# rollout costs one promotion (a second or two of waiting writes) instead of down-after-milliseconds plus
# the promotion, and loses no acknowledged write:
#   1. pause writes here (clients wait; replication keeps flowing, so the replicas catch up);
#   2. ask another pod's sentinel to fail over (this pod's own sentinel is being stopped alongside);
#   3. as soon as the sentinels name the new master, follow it (the sentinels would demote this pod only
#      at their next INFO, up to 10 s later) and unpause: waiting writes get READONLY, and the gateway
#      reconnects through the sentinels to the new master.
# Without a sentinel to ask, the pod stops as it is (a plain restart).
set -u
REDIS_PORT=${REDIS_PORT:-6379}
SENTINEL_PORT=${SENTINEL_PORT:-26379}
MASTER_NAME=${MASTER_NAME:-gateway}
LOCAL=${LOCAL:-127.0.0.1}
WAIT_S=${WAIT_S:-20}
export REDISCLI_AUTH="$REDIS_PASSWORD"

cli() { timeout 3 redis-cli --raw "$@" 2>/dev/null; }
here() { cli -h "$LOCAL" -p "$REDIS_PORT" "$@"; }
peer() { printf "$PEER_FMT" "$1"; }

[ "$(here role | sed -n 1p)" = master ] || exit 0
ordinal=${POD_NAME##*-}
self=$(peer "$ordinal")

here client pause $((WAIT_S * 1000)) write >/dev/null
asked=""
i=0
while [ "$i" -lt "$REPLICAS" ]; do
  if [ "$i" != "$ordinal" ] && [ "$(cli -h "$(peer "$i")" -p "$SENTINEL_PORT" sentinel failover "$MASTER_NAME")" = OK ]
  then
    asked=$(peer "$i")
    break
  fi
  i=$((i + 1))
done
if [ -n "$asked" ]; then
  tries=0
  while [ "$tries" -lt $((WAIT_S * 5)) ]; do
    new=$(cli -h "$asked" -p "$SENTINEL_PORT" sentinel get-master-addr-by-name "$MASTER_NAME" | sed -n 1p)
    if [ -n "$new" ] && [ "$new" != "$self" ]; then
      here replicaof "$new" "$REDIS_PORT" >/dev/null
      echo "handed over to $new"
      break
    fi
    sleep 0.2
    tries=$((tries + 1))
  done
else
  echo "no sentinel took the failover: stopping as master"
fi
here client unpause >/dev/null
exit 0
