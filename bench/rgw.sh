#!/usr/bin/env bash
# A throwaway single-node Ceph cluster with a RADOS Gateway (radosgw), a real S3 server for
# `python -m bench.archive --s3-endpoint ...`. Not a benchmark itself; nothing here is for production.
#
#   bench/rgw.sh [start] [DIR]   start it under DIR (default /tmp/bench-rgw); the last lines printed are
#                                endpoint=http://127.0.0.1:PORT, access_key=..., secret_key=...
#                                (also written to DIR/s3.env, to `source`)
#   bench/rgw.sh stop [DIR]      stop every daemon of it and remove DIR
#
# Needs Debian's Ceph 16 "pacific" packages, which it does not install itself:
#   apt-get install -y ceph-mon ceph-mgr ceph-osd radosgw
#
# What it starts, all as root, listening on 127.0.0.1 only, everything (config, data, logs, pid files,
# admin sockets) under DIR: one monitor, one manager, one OSD on memstore (objects live in the OSD's
# RAM: a deleted object's space is freed once radosgw's garbage collector has run, within ~10 s here,
# though the OSD's RSS stays near its peak, ~2 GiB after 1 GiB objects), one radosgw (beast frontend)
# and one S3 user with bench-only dummy keys. Authentication between the daemons is off (auth none):
# the cluster is reachable from this machine only and holds nothing but benchmark data.
# Environment: RGW_PORT (default 7480, or the next free port), RGW_MEMSTORE_BYTES (the OSD's
# capacity, default 8 GiB), RGW_READY_SECONDS (how long to wait for each daemon, default 120).
set -euo pipefail

HOST=127.0.0.1
ACCESS_KEY=benchbenchbench
SECRET_KEY=benchbenchbenchbenchsecret
MARKER="# written by bench/rgw.sh"
READY_SECONDS=${RGW_READY_SECONDS:-120}
MEMSTORE_BYTES=${RGW_MEMSTORE_BYTES:-8589934592}

verb=start
case "${1:-}" in
start | stop)
    verb=$1
    shift
    ;;
-h | --help)
    sed -n '2,20p' "$0"
    exit 0
    ;;
esac
DIR=${1:-/tmp/bench-rgw}
CONF=$DIR/ceph.conf

log() { echo "rgw.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# True when something on this machine accepts connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# The first port from $1 up that nothing listens on (100 tries).
free_port_from() {
    local port
    for ((port = $1; port < $1 + 100; port++)); do
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
    done
    die "no free port in $1..$(($1 + 99))"
}

# Run "$@" until it succeeds; give up (and say what) after $1 seconds. Polls every 0.2 s.
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "$what: not ready after ${seconds}s; logs in $DIR/log"
        fi
        sleep 0.2
    done
}

ceph_cli() { ceph -c "$CONF" --connect-timeout 10 "$@"; }

osd_up() { ceph_cli osd dump | grep -q '^osd\.0 up'; }

rgw_answers() { curl -s -o /dev/null --max-time 2 "http://$HOST:$RGW_PORT/"; }

# The pids in DIR/run/*.pid that are still alive.
live_pids() {
    local file pid
    for file in "$DIR"/run/*.pid; do
        [[ -e $file ]] || continue
        pid=$(<"$file")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            echo "$pid"
        fi
    done
}

stop() {
    [[ -d $DIR ]] || {
        log "nothing at $DIR"
        return 0
    }
    # Never remove a folder this script did not make.
    grep -qxF "$MARKER" "$CONF" 2>/dev/null || die "$DIR has no ceph.conf of bench/rgw.sh: not touching it"
    local pids pid deadline
    # radosgw first, the monitor last, each by the pid it wrote.
    for name in client.rgw.a mgr.x osd.0 mon.a; do
        [[ -e $DIR/run/$name.pid ]] || continue
        pid=$(<"$DIR/run/$name.pid")
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + 30))
    while pids=$(live_pids) && [[ -n $pids ]]; do
        if ((SECONDS >= deadline)); then
            log "still alive after 30 s, killing: $(echo "$pids" | tr '\n' ' ')"
            # shellcheck disable=SC2086 # one pid per word
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    rm -rf -- "$DIR"
    log "stopped; removed $DIR"
}

start() {
    local missing=()
    for bin in ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin monmaptool ceph curl; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    if ((${#missing[@]})); then
        die "missing: ${missing[*]}; install with: apt-get install -y ceph-mon ceph-mgr ceph-osd radosgw curl"
    fi
    if [[ -e $DIR ]]; then
        if [[ -n $(live_pids 2>/dev/null || true) ]]; then
            die "a cluster already runs in $DIR; stop it first: $0 stop $DIR"
        fi
        die "$DIR exists (a start that failed?); clean it with: $0 stop $DIR"
    fi
    # From here on, a failure leaves daemons and files behind: say how to remove them.
    trap 'status=$?; ((status == 0)) || log "start failed; clean up with: $0 stop $DIR"' EXIT

    local started=$SECONDS fsid mon_port
    RGW_PORT=${RGW_PORT:-$(free_port_from 7480)}
    port_in_use "$RGW_PORT" && die "port $RGW_PORT is in use"
    mon_port=$(free_port_from 6789)
    fsid=$(cat /proc/sys/kernel/random/uuid)
    mkdir -p "$DIR"/{run,log,crash,mon/a,osd/0,mgr/x,rgw}

    # One monitor, msgr v1 only (no second port for v2); pools of one replica and few PGs, so the
    # ~8 pools radosgw creates fit on one OSD; no warnings about either.
    cat >"$CONF" <<EOF
$MARKER
[global]
fsid = $fsid
mon host = $HOST:$mon_port
mon initial members = a
public network = $HOST/32
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
osd crush chooseleaf type = 0
run dir = $DIR/run
crash dir = $DIR/crash
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
mon cluster log file = default=$DIR/log/ceph.\$channel.log cluster=$DIR/log/ceph.log
[mon.a]
mon data = $DIR/mon/a
[mgr.x]
mgr data = $DIR/mgr/x
[osd.0]
osd data = $DIR/osd/0
[client.rgw.a]
rgw data = $DIR/rgw
rgw frontends = beast endpoint=$HOST:$RGW_PORT
# Deleted objects are freed within ~10 s, not after the default 2 hours: memstore keeps them in RAM.
rgw gc obj min wait = 0
rgw gc processor period = 10
EOF

    log "monitor on $HOST:$mon_port"
    monmaptool --create --add a "$HOST:$mon_port" --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --setuser root --setgroup root
    ceph-mon -c "$CONF" -i a --setuser root --setgroup root
    wait_for "$READY_SECONDS" "monitor" ceph_cli mon stat

    log "manager and OSD (memstore, $MEMSTORE_BYTES bytes)"
    ceph-mgr -c "$CONF" -i x --setuser root --setgroup root
    [[ $(ceph_cli osd create) == 0 ]] || die "the new OSD did not get id 0"
    # memstore prints an "-1 ... dump" line on mkfs: that is not an error.
    ceph-osd -c "$CONF" -i 0 --mkfs --setuser root --setgroup root >"$DIR/log/osd-mkfs.log" 2>&1 ||
        die "ceph-osd --mkfs failed: $(tail -5 "$DIR/log/osd-mkfs.log")"
    ceph-osd -c "$CONF" -i 0 --setuser root --setgroup root >>"$DIR/log/osd-start.log" 2>&1
    wait_for "$READY_SECONDS" "osd.0" osd_up

    log "radosgw on $HOST:$RGW_PORT"
    radosgw -c "$CONF" -n client.rgw.a --setuser root --setgroup root
    wait_for "$READY_SECONDS" "radosgw" rgw_answers
    radosgw-admin -c "$CONF" user create --uid bench --display-name bench \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" >"$DIR/log/user-create.json"

    cat >"$DIR/s3.env" <<EOF
export AWS_ENDPOINT_URL_S3=http://$HOST:$RGW_PORT
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1
EOF
    log "ready in $((SECONDS - started)) s; stop with: $0 stop $DIR"
    echo "dir=$DIR"
    echo "endpoint=http://$HOST:$RGW_PORT"
    echo "access_key=$ACCESS_KEY"
    echo "secret_key=$SECRET_KEY"
}

"$verb"
