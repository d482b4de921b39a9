#!/bin/sh
# preStop of the redis container: a master hands over to a replica before it stops, so a node drain or a
# rollout costs one promotion (a second or two of waiting writes) instead of down-after-milliseconds plus
# the promotion, and loses no acknowledged write:
#   1. find another pod's sentinel (this pod's own is being stopped alongside) that knows every replica
#      attached here, and sees one it could promote now (synced, link up): one restarted moments ago (a
#      rollout) learns them only from its next INFO (10 s), and a failover it led would leave the replicas
#      it does not know following this pod;
#   2. pause writes here (clients wait; replication keeps flowing, so the replicas catch up), and ask
#      that sentinel to fail over;
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
AWARE_S=${AWARE_S:-12}
export REDISCLI_AUTH="$REDIS_PASSWORD"

cli() { timeout 3 redis-cli --raw "$@" 2>/dev/null; }
here() { cli -h "$LOCAL" -p "$REDIS_PORT" "$@"; }
peer() { printf "$PEER_FMT" "$1"; }

[ "$(here role | sed -n 1p)" = master ] || exit 0
ordinal=${POD_NAME##*-}
self=$(peer "$ordinal")

attached() { here info replication | tr -d '\r' | sed -n 's/^connected_slaves://p'; }
known() {  # replicas the sentinel at $1 knows for this master (SENTINEL MASTER: key and value lines)
  cli -h "$1" -p "$SENTINEL_PORT" sentinel master "$MASTER_NAME" | awk 'prev == "num-slaves" {print; exit} {prev = $0}'
}
promotable() {  # replicas the sentinel at $1 would promote now: flags exactly "slave" and the link to us up
  # (a replica restarted moments ago is still syncing, or the sentinel has not re-read its INFO, up to 10 s:
  # a failover asked then answers NOGOODSLAVE)
  cli -h "$1" -p "$SENTINEL_PORT" sentinel replicas "$MASTER_NAME" | awk '
    $0 == "name" && n++ { if (f == "slave" && l == "ok") c++; f = ""; l = "" }
    prev == "flags" { f = $0 } prev == "master-link-status" { l = $0 } { prev = $0 }
    END { if (n && f == "slave" && l == "ok") c++; print c + 0 }'
}
asked=""
waited=0
while [ -z "$asked" ] && [ "$waited" -le "$AWARE_S" ]; do
  need=$(attached)
  i=0
  while [ "$i" -lt "$REPLICAS" ]; do
    if [ "$i" != "$ordinal" ]; then
      k=$(known "$(peer "$i")")
      if [ -n "$k" ] && [ -n "$need" ] && [ "$k" -ge "$need" ] && [ "$(promotable "$(peer "$i")")" -ge 1 ]; then
        asked=$(peer "$i")
        break
      fi
    fi
    i=$((i + 1))
  done
  if [ -z "$asked" ]; then
    sleep 1
    waited=$((waited + 1))
  fi
done
if [ -z "$asked" ]; then
  echo "no sentinel knows every replica: stopping as master (the sentinels fail over after down-after)"
  exit 0
fi

here client pause $((WAIT_S * 1000)) write >/dev/null
# A refusal (NOGOODSLAVE: the sentinel's view of a replica is a moment old; INPROG) is retried for ~3 s.
tries=0
until [ "$(cli -h "$asked" -p "$SENTINEL_PORT" sentinel failover "$MASTER_NAME")" = OK ]; do
  tries=$((tries + 1))
  if [ "$tries" -ge 12 ]; then
    asked=""
    break
  fi
  sleep 0.25
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
