#!/usr/bin/env bash
# Hosts on this machine for testing the ring across a real network (issue 23): each host is a
# network namespace with its own address on a bridge, reached by mpirun through a launcher that
# stands in for ssh (`ip netns exec`), so every rank runs in its own host and MPI's messages
# cross veth links over TCP (btl tcp,self: no shared-memory shortcut). Links can be shaped
# (tbf: bandwidth; latency: scripts/nfq_delay.py through an NFQUEUE rule, since netem is
# absent from some kernels) and cut (ip link set down).
#
#   netns-hosts.sh check                   can this machine make hosts? (exit 2 and the reason if not)
#   netns-hosts.sh up NAME N [NET]         hosts NAME-h0..h(N-1) at 10.NET.0.10+i (NET default 77)
#   netns-hosts.sh down NAME               kill everything in them and remove them
#   netns-hosts.sh shape NAME RATE [I..]   egress bandwidth of the hosts' links (tbf), e.g. 100mbit; RATE off removes it
#   netns-hosts.sh delay NAME MS [I..]     one-way latency: the hosts' incoming packets wait MS ms; MS off removes it
#   netns-hosts.sh cut NAME I              take host I's link down (a cable pulled)
#   netns-hosts.sh power-off NAME I        host I is unreachable: link down, the launcher fails like ssh to a dead host
#   netns-hosts.sh pids NAME I             processes running in host I
#   netns-hosts.sh bytes NAME              bytes each host has sent over its link
#   netns-hosts.sh mpirun NAME [mpirun args...]   mpirun over the hosts' hostfile, TCP only
#
# Needs root (CAP_NET_ADMIN) and iproute2; Open MPI for `mpirun`. The kernel must have veth and
# bridge; tbf for `shape`; for `delay` iptables-legacy, the kernel's NFQUEUE and python3.
set -euo pipefail

state_root=${LWM_NETNS_STATE:-/run/lwm-netns}
self=$(readlink -f "$0")

die() { echo "netns-hosts: $*" >&2; exit 1; }
ns_of() { echo "$1-h$2"; }

load() {
  local name=$1
  [ -f "$state_root/$name/env" ] || die "no hosts named '$name' (run: $0 up $name N)"
  # shellcheck disable=SC1090
  . "$state_root/$name/env"
}

case "${1:-}" in
check)
  [ "$(id -u)" = 0 ] || { echo "netns hosts need root (CAP_NET_ADMIN); running as uid $(id -u)" >&2; exit 2; }
  command -v ip >/dev/null || { echo "netns hosts need iproute2 (ip)" >&2; exit 2; }
  probe="lwmprobe$$"
  if ! ip netns add "$probe" 2>/dev/null; then
    echo "this kernel or sandbox refuses 'ip netns add' (no network namespaces)" >&2; exit 2
  fi
  ok=1; why=""
  if ! ip link add "${probe:0:10}a" type veth peer name eth0 netns "$probe" 2>/dev/null; then
    ok=0; why="no veth pairs in this kernel"
  elif ! ip link add "${probe:0:10}b" type bridge 2>/dev/null; then
    ok=0; why="no bridges in this kernel"
  fi
  ip link del "${probe:0:10}a" 2>/dev/null || true
  ip link del "${probe:0:10}b" 2>/dev/null || true
  ip netns del "$probe" 2>/dev/null || true
  [ $ok = 1 ] || { echo "$why" >&2; exit 2; }
  echo "netns hosts: available"
  ;;
up)
  name=${2:?name}; n=${3:?number of hosts}; net=${4:-77}
  [ ${#name} -le 8 ] || die "name '$name' is longer than 8 characters (interface names are short)"
  "$self" down "$name" 2>/dev/null || true
  dir="$state_root/$name"; mkdir -p "$dir"
  br="${name}br"
  ip link add "$br" type bridge
  ip addr add "10.$net.0.1/24" dev "$br"
  ip link set "$br" up
  : > "$dir/hosts"; : > "$dir/hostfile"
  for ((i = 0; i < n; i++)); do
    ns=$(ns_of "$name" "$i"); addr="10.$net.0.$((10 + i))"
    ip netns add "$ns"
    ip link add "${name}v$i" type veth peer name eth0 netns "$ns"
    ip link set "${name}v$i" master "$br" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    echo "$addr $ns" >> "$dir/hosts"
    echo "$addr slots=1" >> "$dir/hostfile"
  done
  # mpirun's plm_rsh_agent: one executable, called as `agent HOST COMMAND`.
  printf '#!/bin/sh\nexec "%s" agent "%s" "$@"\n' "$self" "$name" > "$dir/agent"
  chmod +x "$dir/agent"
  printf 'NAME=%s\nN=%s\nNET=%s\nBR=%s\n' "$name" "$n" "$net" "$br" > "$dir/env"
  echo "$dir"
  ;;
down)
  name=${2:?name}
  for ns in $(ip netns list 2>/dev/null | awk -v p="$name-h" 'index($1, p) == 1 { print $1 }'); do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
    i=${ns##*-h}
    ip link del "${name}v$i" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "${name}br" 2>/dev/null || true
  rm -rf "${state_root:?}/$name"
  ;;
shape)
  name=${2:?name}; rate=${3:?rate}; shift 3; load "$name"
  hosts=("$@"); [ ${#hosts[@]} -gt 0 ] || hosts=($(seq 0 $((N - 1))))
  for i in "${hosts[@]}"; do
    ns=$(ns_of "$name" "$i")
    if [ "$rate" = off ]; then
      tc -n "$ns" qdisc del dev eth0 root 2>/dev/null || true
    else
      # Token bucket: RATE sustained, a burst of ~1 ms at the rate (at least 64 KiB, so a
      # 10 Gbit/s bucket is not starved by the timer), a queue of 50 ms before drops.
      tc -n "$ns" qdisc replace dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
    fi
  done
  ;;
delay)
  name=${2:?name}; ms=${3:?milliseconds}; shift 3; load "$name"
  hosts=("$@"); [ ${#hosts[@]} -gt 0 ] || hosts=($(seq 0 $((N - 1))))
  # The interpreter itself, not a version manager's shim (a shell script that can take
  # seconds to start on a busy machine, and whose pid is not the program's).
  [ "$ms" = off ] || py=$(python3 -c 'import sys; print(sys.executable)') || die "delay needs python3"
  for i in "${hosts[@]}"; do
    ns=$(ns_of "$name" "$i"); pidf="$state_root/$name/delay-$i.pid"
    if [ -f "$pidf" ]; then
      # The old program must be gone (its queue unbound) before a new one binds.
      old=$(cat "$pidf"); kill "$old" 2>/dev/null || true; rm -f "$pidf"
      for _ in $(seq 50); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    fi
    rule=(PREROUTING -i eth0 -j NFQUEUE --queue-num 0 --queue-bypass)
    while ip netns exec "$ns" iptables-legacy -t mangle -D "${rule[@]}" 2>/dev/null; do :; done
    [ "$ms" = off ] && continue
    # Packets arriving over the link wait in queue 0 for the delay program; with no
    # program bound they pass (bypass). On arrival, not on departure: a packet held on
    # the way out still counts against its socket's TCP small-queue budget (~1 ms of
    # data), which then throttles the sender to a trickle (4.8 Mbit/s at 10 ms; on
    # arrival 1.3 Gbit/s). iptables (legacy): this kernel has xt NFQUEUE but not nft's
    # queue expression.
    command -v iptables-legacy >/dev/null || die "delay needs iptables-legacy (Debian: iptables)"
    ip netns exec "$ns" iptables-legacy -t mangle -A "${rule[@]}" ||
      die "host $i: the kernel refused an NFQUEUE rule (no xt_NFQUEUE / nfnetlink_queue)"
    log="$state_root/$name/delay-$i.log"; : > "$log"  # before the start: the child's own truncation is late
    ip netns exec "$ns" "$py" "$(dirname "$self")/nfq_delay.py" --queue 0 --delay-ms "$ms" >"$log" 2>&1 &
    echo $! > "$pidf"
    for _ in $(seq 100); do grep -q '^nfq_delay:' "$log" 2>/dev/null && break; sleep 0.1; done
    grep -q '^nfq_delay:' "$log" || { cat "$log" >&2; die "host $i: the delay program did not start"; }
  done
  ;;
cut)
  name=${2:?name}; i=${3:?host}; load "$name"
  ip -n "$(ns_of "$name" "$i")" link set eth0 down
  ;;
power-off)
  name=${2:?name}; i=${3:?host}; load "$name"
  ns=$(ns_of "$name" "$i")
  ip -n "$ns" link set eth0 down
  touch "$state_root/$name/off-$i"
  ;;
pids)
  name=${2:?name}; i=${3:?host}; load "$name"
  ip netns pids "$(ns_of "$name" "$i")"
  ;;
bytes)
  name=${2:?name}; load "$name"
  for ((i = 0; i < N; i++)); do
    echo "$i $(cat "/sys/class/net/${name}v$i/statistics/rx_bytes")"
  done
  ;;
agent)
  # As ssh would: `agent NAME HOST COMMAND...`, COMMAND run by a shell on HOST.
  name=${2:?name}; host=${3:?host}; shift 3; load "$name"
  ns=$(awk -v h="$host" '$1 == h { print $2 }' "$state_root/$name/hosts")
  [ -n "$ns" ] || { echo "ssh: Could not resolve hostname $host: Name or service not known" >&2; exit 255; }
  i=${ns##*-h}
  if [ -e "$state_root/$name/off-$i" ]; then
    sleep "${LWM_NETNS_CONNECT_TIMEOUT:-2}"
    echo "ssh: connect to host $host port 22: Connection timed out" >&2
    exit 255
  fi
  # Each host has its own /tmp for Open MPI's session directories, as real hosts do (all
  # hosts here share one hostname, and a stale directory of a killed job would collide).
  mkdir -p "$state_root/$name/tmp-$i"
  exec ip netns exec "$ns" env TMPDIR="$state_root/$name/tmp-$i" /bin/sh -c "$*"
  ;;
mpirun)
  name=${2:?name}; shift 2; load "$name"
  mkdir -p "$state_root/$name/tmp-launch"
  TMPDIR="$state_root/$name/tmp-launch" exec mpirun --allow-run-as-root --hostfile "$state_root/$name/hostfile" \
    --mca plm_rsh_agent "$state_root/$name/agent" \
    --mca btl tcp,self --mca btl_tcp_if_include "10.$NET.0.0/24" \
    --mca oob_tcp_if_include "10.$NET.0.0/24" \
    --mca oob_tcp_keepalive_time 1 --mca oob_tcp_keepalive_intvl 1 --mca oob_tcp_keepalive_probes 2 "$@"
  ;;
*)
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$self"
  exit 2
  ;;
esac
