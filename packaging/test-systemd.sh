#!/usr/bin/env bash
# The .deb under real systemd: a debootstrap'd Debian bookworm booted with
# systemd-nspawn in a network namespace of its own. Installs the package,
# checks a fresh install does not start, configures and starts the unit, then
# under load (h2load from the host, inside that namespace): `systemctl reload`,
# a binary upgrade (`systemctl kill --signal=SIGUSR2`) and a package upgrade
# that must keep an edited conffile. Then `systemctl stop` and purge.
#
#   packaging/test-systemd.sh [DEB]     (default: build one with packaging/build.sh)
#
# Needs root. The Debian root is cached in target/nspawn/bookworm (~50 s once).
set -euo pipefail
cd "$(dirname "$0")/.."

NS=isthmus-nspawn
MACHINE=isthmus-test
ROOT=target/nspawn/bookworm
WORK=$(mktemp -d /tmp/isthmus-nspawn.XXXXXX)
LOAD_SECONDS=24

leader=""
fail() {
    echo "FAIL: $*" >&2
    if [ -n "$leader" ]; then
        echo "-- the unit's journal:" >&2
        inside journalctl -u isthmus.service --no-pager -n 40 -o short-precise >&2 || true
    fi
    exit 1
}
step() { echo; echo "== $*"; }

source packaging/lib.sh
need_tools debootstrap:debootstrap systemd-nspawn:systemd-container h2load:nghttp2-client \
    ip:iproute2 dig:bind9-dnsutils

deb=${1:-}
if [ -z "$deb" ]; then
    step "building the packages"
    deb=$(packaging/build.sh | sed -n 's/^deb: //p')
fi
test -f "$deb" || fail "no package at $deb"

if [ ! -x "$ROOT/usr/lib/systemd/systemd" ] || [ ! -x "$ROOT/bin/kill" ]; then
    step "debootstrap bookworm into $ROOT"
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,adduser,procps \
        bookworm "$ROOT" http://deb.debian.org/debian >/dev/null
fi

# A fresh copy of the root for this run, so runs do not see each other.
step "preparing the container"
cp -a "$ROOT" "$WORK/root"
cp "$deb" "$WORK/root/root/isthmus.deb"
# Version 0.1.0-2 of the same package, for the package upgrade.
dpkg-deb -R "$deb" "$WORK/repack"
sed -i 's/^Version: .*/Version: 0.1.0-2/' "$WORK/repack/DEBIAN/control"
dpkg-deb -b -Zgzip -z1 "$WORK/repack" "$WORK/root/root/isthmus-2.deb" >/dev/null
rm -rf "$WORK/repack"

ip netns add "$NS"
ip -n "$NS" link set lo up
nspawn_pid=""
cleanup() {
    if [ -n "$nspawn_pid" ]; then
        for _ in 1 2 3; do
            kill -TERM "$nspawn_pid" 2>/dev/null || break
            for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break 2; sleep 0.2; done
        done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

step "booting Debian with systemd-nspawn"
systemd-nspawn -q -D "$WORK/root" --register=no --keep-unit --boot --machine="$MACHINE" \
    --console=passive --network-namespace-path="/run/netns/$NS" >"$WORK/console.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: the systemd that nspawn's child turns into.
for _ in $(seq 100); do
    leader=$(pgrep -P "$nspawn_pid" -x systemd | head -n 1 || true)
    [ -n "$leader" ] && break
    sleep 0.1
done
[ -n "$leader" ] || fail "the container did not start: $(cat "$WORK/console.log")"
inside() { nsenter -t "$leader" -m -u -i -n -p -- env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_ns() { ip netns exec "$NS" "$@"; }
state=""
for _ in $(seq 150); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
done
echo "system state: $state ($(inside systemctl --version | head -n 1))"
case "$state" in running|degraded) ;; *) fail "systemd did not finish booting: $state" ;; esac

step "dpkg -i: installs, creates the user, does not start"
inside dpkg -i /root/isthmus.deb
inside getent passwd isthmus
enabled=$(inside systemctl is-enabled isthmus.service || true)
active=$(inside systemctl is-active isthmus.service || true)
echo "is-enabled: $enabled; is-active: $active"
[ "$enabled" = disabled ] || fail "a fresh install enabled the unit"
[ "$active" = inactive ] || fail "a fresh install started the unit"

step "configure, enable --now"
cat >"$WORK/root/etc/isthmus/isthmus.toml" <<'EOF'
# Edited by the operator: must survive the package upgrade.
[gateway]
name = "edge-1"
cluster = "vm-edge"
trust_domain = "edge.example"
[gateway.locality]
region = "test"
[listeners]
outbound = "127.0.0.1:15001"
[dns]
listen = "127.0.0.1:53"
state_file = "/var/lib/isthmus/clusterset-ips.json"
[[services]]
namespace = "ops"
name = "admin"
ports = [{ port = 80 }]
endpoints = ["127.0.0.1:15000"]
EOF
inside systemctl enable --now isthmus.service
inside systemctl show -p ActiveState,SubState,StatusText,MainPID,User,NRestarts isthmus.service
[ "$(inside systemctl is-active isthmus.service)" = active ] || fail "not active"
in_ns curl -fsS -o /dev/null -w 'readyz: %{http_code}\n' http://127.0.0.1:15000/readyz
in_ns curl -fsS -o /dev/null -w 'through the outbound listener: %{http_code}\n' \
    -H 'Host: admin.ops' http://127.0.0.1:15001/healthz
echo "DNS on port 53 (CAP_NET_BIND_SERVICE): dns-version.clusterset.local TXT $(in_ns dig +short @127.0.0.1 dns-version.clusterset.local TXT)"
inside ls -ld /var/lib/isthmus /run/isthmus

step "journald: structured fields"
inside journalctl -u isthmus.service -o json --no-pager | python3 -c '
import json, sys
records = [json.loads(l) for l in sys.stdin if l.strip()]
start = [r for r in records if r.get("MESSAGE") == "isthmus starting"]
assert start, "no isthmus starting record"
r = start[-1]
for field in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TARGET", "GATEWAY", "CLUSTER", "SPIFFE_ID", "VERSION"):
    assert field in r, "no %s in %s" % (field, r)
    print("%s=%s" % (field, r[field]))
'

step "under load: reload, binary upgrade, package upgrade"
main_before=$(inside systemctl show -p MainPID --value isthmus.service)
# h2load sets Host from :authority (a Host header of its own would be a second one).
in_ns timeout $((LOAD_SECONDS + 30)) h2load --h1 -c 4 -D "$LOAD_SECONDS" --warm-up-time=1 \
    -H ':authority: admin.ops' http://127.0.0.1:15001/healthz >"$WORK/h2load.txt" 2>&1 &
load_pid=$!
sleep 4
echo "t=4s: systemctl reload"
inside systemctl reload isthmus.service
sleep 4
echo "t=8s: systemctl kill --signal=SIGUSR2 --kill-whom=main (binary upgrade)"
inside systemctl kill --signal=SIGUSR2 --kill-whom=main isthmus.service
for _ in $(seq 100); do
    main_now=$(inside systemctl show -p MainPID --value isthmus.service)
    [ "$main_now" != "$main_before" ] && break
    sleep 0.1
done
echo "MainPID $main_before -> $main_now"
[ "$main_now" != "$main_before" ] || fail "the upgraded process did not become the main PID"
sleep 8
echo "t=16s: dpkg -i isthmus 0.1.0-2 (postinst hands the sockets to the new binary)"
inside dpkg -i /root/isthmus-2.deb
wait "$load_pid" || true
main_after=$(inside systemctl show -p MainPID --value isthmus.service)
echo "MainPID after the package upgrade: $main_after"
grep -E '^(finished|requests|status codes|traffic)' "$WORK/h2load.txt" || fail "h2load: $(cat "$WORK/h2load.txt")"
grep -q 'Edited by the operator' "$WORK/root/etc/isthmus/isthmus.toml" || fail "the edited conffile was replaced"
echo "conffile kept: $(head -n 1 "$WORK/root/etc/isthmus/isthmus.toml")"
inside dpkg-query -W isthmus
inside systemctl show -p ActiveState,SubState,StatusText,NRestarts isthmus.service
[ "$(inside systemctl is-active isthmus.service)" = active ] || fail "not active after the upgrades"
[ "$main_after" != "$main_now" ] || fail "the package upgrade did not hand over to the new binary"
read -r total started done ok failed errored timeout < <(sed -n \
    's/^requests: \([0-9]*\) total, \([0-9]*\) started, \([0-9]*\) done, \([0-9]*\) succeeded, \([0-9]*\) failed, \([0-9]*\) errored, \([0-9]*\) timeout.*/\1 \2 \3 \4 \5 \6 \7/p' \
    "$WORK/h2load.txt")
non2xx=$(sed -n 's/^status codes: [0-9]* 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx/\1 \2 \3/p' "$WORK/h2load.txt")
echo "load: $ok succeeded, $failed failed, $errored errored, $timeout timeout; 3xx/4xx/5xx: $non2xx"
[ "${ok:-0}" -gt 0 ] || fail "no request succeeded"
[ "$failed" = 0 ] && [ "$errored" = 0 ] && [ "$timeout" = 0 ] || fail "requests failed under reload/upgrade"
[ "$non2xx" = "0 0 0" ] || fail "non-2xx answers: $non2xx"

step "systemctl stop"
inside systemctl stop isthmus.service
inside systemctl show -p ActiveState,Result,ExecMainStatus isthmus.service
[ "$(inside systemctl show -p Result --value isthmus.service)" = success ] || fail "stop was not clean"
inside journalctl -u isthmus.service --no-pager -n 4 -o cat

step "dpkg --purge"
inside dpkg --purge isthmus
for path in /etc/isthmus /var/lib/isthmus /usr/bin/isthmus; do
    [ ! -e "$WORK/root$path" ] || fail "$path left after purge"
done
echo "purged: /etc/isthmus, /var/lib/isthmus and /usr/bin/isthmus are gone"
echo
echo "systemd test passed"
