#!/usr/bin/env bash
# A throw-away one-monitor, one-OSD Ceph cluster on 127.0.0.1, in one scratch directory, without root,
# systemd, /etc/ceph or /var/lib/ceph. The OSD uses the in-memory object store (memstore), so data lives
# in the OSD's RAM. For the kvhost rados plugin's tests and benchmark.
#
#   one-node-cluster.sh start DIR [--memstore-bytes N] [--pool NAME]... [--pg-num N] [--owner-pid PID]
#       Creates DIR (which must be empty or absent), writes DIR/ceph.conf and DIR/keyring (cephx, with
#       the keys of mon., client.admin and osd.0), starts the monitor and the OSD, creates the pools
#       (default: one pool `kvcache`), waits until a probe object can be written, read and removed in
#       each pool, and prints the path of ceph.conf as the last line of stdout. On any failure it stops
#       what it started and exits non-zero with the reason (and the tail of the daemon logs) on stderr.
#       With --owner-pid, a watchdog stops the cluster once process PID has exited (say a test binary
#       that was killed before its cleanup could run).
#   one-node-cluster.sh stop DIR          Stops the OSD, then the monitor (exactly the pids this script
#                                        started, as recorded in DIR/pids/). The directory is kept.
#   one-node-cluster.sh stop-osd DIR      Stops only the OSD, gracefully: memstore saves its contents
#                                        into DIR/osd, so nothing is lost.
#   one-node-cluster.sh start-osd DIR     Starts the OSD again (with what it saved) and waits until every
#                                        pool serves I/O.
#   one-node-cluster.sh status DIR        Prints `mon <pid|stopped>` and `osd <pid|stopped>`.
#
# Ports: the monitor listens on a free port chosen at random in 20000-59999 (checked before use, under a
# lock so clusters started in parallel do not collide); the OSD binds in the 30 ports after it. Only
# msgr2 on 127.0.0.1. Every ceph/rados CLI call has a timeout. Needs ceph-mon, ceph-osd, ceph-common
# (ceph, rados, monmaptool, ceph-authtool) and uuidgen (uuid-runtime).
set -euo pipefail

# The `ceph` CLI is Python and needs Debian's interpreter with its `rados` module: keep a pyenv or venv
# from leaking in.
unset PYTHONHOME PYTHONPATH VIRTUAL_ENV || true
export PATH="/usr/bin:/bin:/usr/sbin:/sbin:${PATH}"

CLI_TIMEOUT=20          # seconds for any one ceph/rados CLI call
READY_TIMEOUT=60        # seconds for a pool to serve its first probe object
STOP_TIMEOUT=15         # seconds a daemon gets to exit after SIGTERM, before SIGKILL
PORT_SPAN=30            # ports above the monitor's for the OSD

die() {
  echo "one-node-cluster: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d' >&2
  exit 2
}

need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install ceph-mon ceph-osd ceph-common uuid-runtime)"
  done
}

# A pid we started, still alive and still our daemon (not a recycled pid, not a zombie).
alive() {
  local pid=$1 dir=$2 state
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
  [ "$state" != Z ] && [ "$state" != X ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/ceph.conf"
}

pid_of() {
  local file="$1/pids/$2.pid"
  [ -f "$file" ] && cat "$file" || true
}

# Stops one daemon we started: SIGTERM, wait, SIGKILL. A zombie counts as stopped.
stop_daemon() {
  local dir=$1 name=$2 signal=${3:-TERM} pid i
  pid=$(pid_of "$dir" "$name")
  if alive "$pid" "$dir"; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
      alive "$pid" "$dir" || break
      sleep 0.1
    done
    if alive "$pid" "$dir"; then
      echo "one-node-cluster: $name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        alive "$pid" "$dir" || break
        sleep 0.1
      done
    fi
  fi
  rm -f "$dir/pids/$name.pid"
}

ceph_cli() {
  local dir=$1
  shift
  timeout "$CLI_TIMEOUT" ceph -c "$dir/ceph.conf" --connect-timeout "$CLI_TIMEOUT" "$@"
}

rados_cli() {
  local dir=$1
  shift
  timeout "$CLI_TIMEOUT" rados -c "$dir/ceph.conf" "$@"
}

port_busy() {
  # A connect that succeeds means something listens there.
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
  local tries port p busy
  for ((tries = 0; tries < 200; tries++)); do
    port=$((20000 + RANDOM % 40000))
    busy=0
    for ((p = port; p <= port + PORT_SPAN; p++)); do
      if port_busy "$p"; then
        busy=1
        break
      fi
    done
    if [ "$busy" = 0 ]; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

tail_logs() {
  local dir=$1 f
  for f in "$dir"/log/*.log "$dir"/log/*.out; do
    [ -f "$f" ] || continue
    echo "--- tail of $f" >&2
    tail -n 20 "$f" >&2 || true
  done
}

active_count() {
  grep -c 'state: booting -> active' "$1/log/osd.0.log" 2>/dev/null || true
}

# Starts the OSD and waits until it reports itself active (a client that asks for the map earlier waits
# for its next 5 s tick to notice the OSD).
start_osd() {
  local dir=$1 before deadline
  before=$(active_count "$dir")
  ceph-osd -c "$dir/ceph.conf" -i 0 -f </dev/null >>"$dir/log/osd.0.out" 2>&1 &
  echo $! >"$dir/pids/osd.pid"
  deadline=$((SECONDS + READY_TIMEOUT))
  while [ "$(active_count "$dir")" -le "${before:-0}" ]; do
    alive "$(pid_of "$dir" osd)" "$dir" || die "the OSD exited during start-up (see $dir/log)"
    [ "$SECONDS" -lt "$deadline" ] || die "the OSD did not become active within ${READY_TIMEOUT}s"
    sleep 0.05
  done
}

# Waits until a probe object can be put, read back and removed in `pool`.
wait_ready() {
  local dir=$1 pool=$2 deadline probe
  deadline=$((SECONDS + READY_TIMEOUT))
  probe="$dir/probe.in"
  echo "probe $pool $$" >"$probe"
  while :; do
    alive "$(pid_of "$dir" mon)" "$dir" || die "the monitor exited (see $dir/log)"
    alive "$(pid_of "$dir" osd)" "$dir" || die "the OSD exited (see $dir/log)"
    if timeout 10 rados -c "$dir/ceph.conf" -p "$pool" put kvhost-probe "$probe" 2>/dev/null &&
      timeout 10 rados -c "$dir/ceph.conf" -p "$pool" get kvhost-probe "$dir/probe.out" 2>/dev/null &&
      cmp -s "$probe" "$dir/probe.out" &&
      timeout 10 rados -c "$dir/ceph.conf" -p "$pool" rm kvhost-probe 2>/dev/null; then
      rm -f "$probe" "$dir/probe.out"
      return 0
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "pool $pool did not serve a probe object within ${READY_TIMEOUT}s"
    sleep 0.2
  done
}

cmd_start() {
  local dir=$1
  shift
  local memstore_bytes=$((1 << 30)) pg_num=8 pools=() owner_pid=
  while [ $# -gt 0 ]; do
    case $1 in
      --memstore-bytes) memstore_bytes=$2; shift 2 ;;
      --pool) pools+=("$2"); shift 2 ;;
      --pg-num) pg_num=$2; shift 2 ;;
      --owner-pid) owner_pid=$2; shift 2 ;;
      *) die "start: unknown argument $1" ;;
    esac
  done
  [ ${#pools[@]} -gt 0 ] || pools=(kvcache)
  need ceph-mon ceph-osd ceph rados monmaptool ceph-authtool uuidgen timeout flock
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir" 2>/dev/null)" ]; then
    die "start: $dir exists and is not empty"
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  mkdir -p "$dir/run" "$dir/log" "$dir/pids" "$dir/mon" "$dir/osd/osd.0"

  # On any failure from here on: stop what was started, show the logs.
  trap 'rc=$?; if [ $rc -ne 0 ]; then tail_logs "$dir"; stop_daemon "$dir" osd KILL; stop_daemon "$dir" mon KILL; fi' EXIT

  local fsid osd_uuid port
  fsid=$(uuidgen)
  osd_uuid=$(uuidgen)

  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' \
    --cap mgr 'allow profile osd' >/dev/null

  # Choose the port and start the monitor under one lock, so parallel starts cannot pick the same one.
  exec 9>"${TMPDIR:-/tmp}/kvhost-one-node-cluster.lock"
  flock -w 120 9 || die "could not take the port lock"
  port=$(pick_port) || die "no free port range found on 127.0.0.1"
  cat >"$dir/ceph.conf" <<EOF
# Written by tests/ceph/one-node-cluster.sh: a one-mon, one-OSD memstore cluster on 127.0.0.1.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind port min = $((port + 1))
ms bind port max = $((port + PORT_SPAN))
keyring = $dir/keyring
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
mon cluster log file = $dir/log/cluster.log
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
osd crush initial weight = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
osd objectstore = memstore
memstore device bytes = $memstore_bytes
paxos propose interval = 0.05
osd fast shutdown = false
osd fast shutdown notify mon = false
mon data avail warn = 1
# The monitor refuses to start below 5% free disk by default; its store here is a few MiB, so a crowded
# build disk must not fail the tests.
mon data avail crit = 0
mon warn on pool no redundancy = false
mon warn on pool no app = false
mon mgr mkfs grace = 31536000
mon warn on insecure global id reclaim allowed = false
[mon]
admin socket = $dir/run/\$name.asok
[osd]
admin socket = $dir/run/\$name.asok
[client]
# Many client processes share this configuration: no admin socket, one log file.
admin socket =
log file = $dir/log/client.log
EOF
  monmaptool --create --addv a "[v2:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring" \
    >>"$dir/log/mon.a.out" 2>&1 || die "ceph-mon --mkfs failed"
  ceph-mon -c "$dir/ceph.conf" -i a -f </dev/null >>"$dir/log/mon.a.out" 2>&1 &
  echo $! >"$dir/pids/mon.pid"
  flock -u 9
  exec 9>&-

  ceph_cli "$dir" osd new "$osd_uuid" 0 >/dev/null || die "ceph osd new failed"
  local pool
  for pool in "${pools[@]}"; do
    ceph_cli "$dir" osd pool create "$pool" "$pg_num" >/dev/null 2>&1 || die "creating pool $pool failed"
  done
  ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/osd.0.out" 2>&1 ||
    die "ceph-osd --mkfs failed"
  start_osd "$dir"
  for pool in "${pools[@]}"; do
    wait_ready "$dir" "$pool"
  done
  if [ -n "$owner_pid" ]; then
    start_watchdog "$dir" "$owner_pid"
  fi
  trap - EXIT
  echo "$dir/ceph.conf"
}

# Stops the cluster when `owner` exits. Runs detached, with its pid in DIR/pids/watchdog.pid (stop ends it).
start_watchdog() {
  local dir=$1 owner=$2
  kill -0 "$owner" 2>/dev/null || die "--owner-pid $owner: no such process"
  setsid bash -c '
    while kill -0 "$1" 2>/dev/null && [ -f "$2/pids/mon.pid" ]; do sleep 1; done
    [ -f "$2/pids/mon.pid" ] && exec "$3" stop "$2" --from-watchdog
  ' one-node-cluster-watchdog "$owner" "$dir" "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" \
    </dev/null >>"$dir/log/watchdog.out" 2>&1 &
  echo $! >"$dir/pids/watchdog.pid"
}

cmd_stop() {
  local dir=$1 watchdog
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  watchdog=$(pid_of "$dir" watchdog)
  if [ "${2:-}" != --from-watchdog ] && [ -n "$watchdog" ] && [ -d "/proc/$watchdog" ] &&
    tr '\0' ' ' <"/proc/$watchdog/cmdline" 2>/dev/null | grep -qF one-node-cluster-watchdog; then
    kill "$watchdog" 2>/dev/null || true
  fi
  rm -f "$dir/pids/watchdog.pid"
  # OSD first (a monitor stopped first makes the OSD wait at shutdown), with SIGKILL: the cluster is
  # thrown away, and a graceful memstore shutdown would first write everything it holds to disk.
  stop_daemon "$dir" osd KILL
  stop_daemon "$dir" mon TERM
}

# A graceful stop (SIGTERM, `osd fast shutdown = false`): memstore writes what it holds into the OSD's
# data directory, and start-osd brings it back. (After a crash memstore would come back without the PGs
# created since mkfs, and the pools would hang: this script offers no crash.)
cmd_stop_osd() {
  local dir=$1
  dir=$(cd "$dir" && pwd)
  stop_daemon "$dir" osd TERM
}

# The OSD reloads what memstore saved at its graceful stop, so it serves the same PGs and objects again.
cmd_start_osd() {
  local dir=$1 pool
  dir=$(cd "$dir" && pwd)
  alive "$(pid_of "$dir" mon)" "$dir" || die "start-osd: the monitor of $dir is not running"
  alive "$(pid_of "$dir" osd)" "$dir" && die "start-osd: the OSD of $dir is running"
  start_osd "$dir"
  for pool in $(ceph_cli "$dir" osd pool ls); do
    wait_ready "$dir" "$pool"
  done
}

cmd_status() {
  local dir=$1 name pid
  dir=$(cd "$dir" && pwd)
  for name in mon osd; do
    pid=$(pid_of "$dir" "$name")
    if alive "$pid" "$dir"; then
      echo "$name $pid"
    else
      echo "$name stopped"
    fi
  done
}

[ $# -ge 2 ] || usage
command=$1
dir=$2
shift 2
case $command in
  start) cmd_start "$dir" "$@" ;;
  stop) cmd_stop "$dir" "$@" ;;
  stop-osd) cmd_stop_osd "$dir" "$@" ;;
  start-osd) cmd_start_osd "$dir" ;;
  status) cmd_status "$dir" ;;
  *) usage ;;
esac
