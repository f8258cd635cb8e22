#!/usr/bin/env bash
# Isthmus against the bare-Pingora floor, HAProxy and NGINX (Debian's), measured
# in the same run on loopback.
#
#   (a) plain HTTP/1.1 keep-alive proxying:   h2load -> proxy -> origin
#   (b) the two-hop east-west path:           h2load -> proxy A -> mTLS -> proxy B -> origin
#       (HAProxy and NGINX chains use the same SPIFFE certificates; Isthmus,
#        HAProxy and the floor multiplex HTTP/2 between the hops, NGINX speaks
#        HTTP/1.1 upstream; only Isthmus's A side verifies B's SVID, see below)
#
# Rows: isthmus (access log off: log.level "warn"; tracing off), isthmus+log (the
# same with the access log on: "warn,isthmus::access=info", JSON lines to a file),
# isthmus+tr1% and isthmus+tr100% (access log off, [tracing] on with
# sample_ratio 0.01 and 1.0, spans exported over OTLP/HTTP to a Python sink
# answering 200 to every POST /v1/traces; h2load sends no traceparent, so every
# request is a new trace sampled at that ratio), floor (a
# bare Pingora proxy on the same Pingora version, allocator and release profile:
# tests/bench/floor/), floor+patches (the floor built against the workspace's
# vendored Pingora crates, vendor/pingora-*, with FLOOR_PATCHED=1), haproxy,
# nginx. Every proxy runs one worker thread; the origin is NGINX returning a
# 3-byte body.
#
# ROUNDS interleaved rounds (round 1: every proxy once, round 2: every proxy
# again, ...); for each proxy and path the median and the spread (min-max) of:
# requests/s, p50/p99 latency, CPU-seconds per 10k requests split into user and
# system (all processes of the proxy, /proc/PID/stat), context switches per
# request (voluntary + involuntary, every thread, /proc/PID/task/*/status), RSS.
# Then two separate passes, so that counting does not distort the CPU figures:
# system calls per request (perf stat on the syscalls tracepoints, or strace -c
# where perf cannot), and heap allocations per request (Isthmus and the floor
# built with their `count-allocations` feature; n/a for the others). Ratios
# follow. The machine is shared and noisy: compare ratios within one run.
#
# Usage: tests/bench/proxy-bench.sh
#   REQUESTS=100000 CONNS=32 WARMUP=5000 ROUNDS=3   per measured run
#   SYSCALL_REQUESTS=REQUESTS/5                      the system-call and allocation passes
#   ISTHMUS_BIN=target/release/isthmus               the Isthmus under test
#   ISTHMUS_COUNT_BIN=target/bench-count/release/isthmus
#       the same built with --features count-allocations, for allocations per
#       request (skipped when missing), e.g.:
#       CARGO_TARGET_DIR=target/bench-count cargo build --release -p isthmus-gateway \
#         --bin isthmus --features count-allocations
#   FLOOR_PATCHED=1    also build and measure the floor against vendor/pingora-*
#   COMPARE="label=/path/to/isthmus ..."   more Isthmus builds, each one more row
#       (access log off), interleaved with the rest: how two builds are compared
#   FLOOR_COMPARE="floor-label=/path/to/pingora-floor ..."   the same for floor
#       builds (labels starting with "floor", so the ratios treat them as floors)
#   PASSES=0           skip the system-call and allocation passes
#   KEEP=1             keep the work directory (configurations, logs, raw results)
# The floor is built here (cargo, into target/bench-floor, with a copy of the
# workspace's Cargo.lock). Needs a release build of Isthmus (cargo build --release
# -p isthmus-gateway), haproxy, nginx-light, nghttp2-client and perf (installed
# with apt-get when missing, as root). Exits non-zero if any request fails.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
REQUESTS=${REQUESTS:-100000}
CONNS=${CONNS:-32}
WARMUP=${WARMUP:-5000}
ROUNDS=${ROUNDS:-3}
SYSCALL_REQUESTS=${SYSCALL_REQUESTS:-$((REQUESTS / 5))}
ISTHMUS_COUNT=${ISTHMUS_COUNT_BIN:-$ROOT/target/bench-count/release/isthmus}
FLOOR_PATCHED=${FLOOR_PATCHED:-}
COMPARE=${COMPARE:-}
FLOOR_COMPARE=${FLOOR_COMPARE:-}
PASSES=${PASSES:-1}

bench_need haproxy:haproxy nginx:nginx-light h2load:nghttp2-client python3:python3 perf:linux-perf strace:strace curl:curl
bench_isthmus
bench_workdir proxy-bench

# perf opens one event per system call and thread.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# --- the floor: built here, outside the workspace, on the workspace's lock ---
FLOOR_DIR=$ROOT/tests/bench/floor
FLOOR_TARGET=$ROOT/target/bench-floor
build_floor() { # output name, cargo arguments...
  local out=$1
  shift
  cp "$ROOT/Cargo.lock" "$FLOOR_DIR/Cargo.lock"
  echo "== building the floor ($out)" >&2
  if ! CARGO_TARGET_DIR=$FLOOR_TARGET nice cargo build --release --quiet \
    --manifest-path "$FLOOR_DIR/Cargo.toml" "$@" >"$WORK/build-$out.log" 2>&1; then
    cat "$WORK/build-$out.log" >&2
    echo "the floor did not build ($out)" >&2
    exit 1
  fi
  mkdir -p "$FLOOR_TARGET/bin"
  cp "$FLOOR_TARGET/release/pingora-floor" "$FLOOR_TARGET/bin/$out"
  echo "$FLOOR_TARGET/bin/$out"
}
FLOOR=$(build_floor pingora-floor)
FLOOR_COUNT=$(build_floor pingora-floor-count --features count-allocations)
PATCH_ARGS=()
if [ -n "$FLOOR_PATCHED" ]; then
  for d in "$ROOT"/vendor/pingora-*/; do
    [ -f "$d/Cargo.toml" ] || continue
    crate=$(basename "$d")
    PATCH_ARGS+=(--config "patch.crates-io.$crate.path=\"${d%/}\"")
  done
  if [ ${#PATCH_ARGS[@]} -eq 0 ]; then
    echo "FLOOR_PATCHED=1 but no vendored Pingora crate in $ROOT/vendor: no floor+patches row" >&2
  else
    FLOOR_P=$(build_floor pingora-floor-patched "${PATCH_ARGS[@]}")
    FLOOR_P_COUNT=$(build_floor pingora-floor-patched-count "${PATCH_ARGS[@]}" --features count-allocations)
  fi
fi
[ -x "$ISTHMUS_COUNT" ] || {
  echo "no $ISTHMUS_COUNT: Isthmus's allocations per request are skipped (see the header to build it)" >&2
  ISTHMUS_COUNT=
}

# --- PKI: two trust domains, one SVID each (the same files for every chain) ---
"$ISTHMUS" ca init --trust-domain a.example --out "$WORK/ca-a" >/dev/null
"$ISTHMUS" ca init --trust-domain b.example --out "$WORK/ca-b" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-a" --spiffe-id spiffe://a.example/isthmus/gateway/gw-a --out "$WORK/a" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-b" --spiffe-id spiffe://b.example/isthmus/gateway/gw-b --out "$WORK/b" >/dev/null
cat "$WORK/a/svid.crt" "$WORK/a/svid.key" > "$WORK/a/combined.pem"
cat "$WORK/b/svid.crt" "$WORK/b/svid.key" > "$WORK/b/combined.pem"
SNI=outbound_.80_._.web.bench.svc.cluster.local

haproxy_head() { # the global and defaults sections every HAProxy here shares
  cat <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
HAP
}

ORIGIN=$(free_port)
start ORIGIN_PID nginx -c "$(nginx_conf origin 4096 "server { listen 127.0.0.1:$ORIGIN; location / { return 200 \"ok\n\"; } }")"
wait_port "$ORIGIN"

# Every case: "path name port admin-or-stats-port pid..." (admin: Isthmus's admin
# port, stats: the floor's allocation-count port, "-" for the others).
CASES=()
COUNT_CASES=()
case_add() { CASES+=("$*"); }

# --- Isthmus: one gateway for (a), A -> B for (b); BIN, tag, log level ---
isthmus_pair() { # bin, file id, row name, log level, list (CASES or COUNT_CASES), [extra TOML]
  local bin=$1 tag=$2 name=$3 level=$4 list=$5 extra=${6:-}
  local pa padmin pb_ew pb_admin pa2 pa2_admin
  pa=$(free_port); padmin=$(free_port)
  {
    gateway_toml bench bench a.example "$padmin" | sed "s/^level = .*/level = \"$level\"/"
    cat <<TOML
[listeners]
outbound = "127.0.0.1:$pa"
TOML
    web_service "$ORIGIN"
    printf '%s' "$extra"
  } > "$WORK/$tag-a.toml"
  pb_ew=$(free_port); pb_admin=$(free_port); pa2=$(free_port); pa2_admin=$(free_port)
  {
    gateway_toml gw-b b b.example "$pb_admin" "$WORK/b" "$WORK/ca-b/bundle.pem" | sed "s/^level = .*/level = \"$level\"/"
    cat <<TOML
[[trust.federated]]
trust_domain = "a.example"
bundle = "$WORK/ca-a/bundle.pem"
[listeners]
east_west = "127.0.0.1:$pb_ew"
TOML
    web_service "$ORIGIN" export
    printf '%s' "$extra"
  } > "$WORK/$tag-b2.toml"
  {
    gateway_toml gw-a a a.example "$pa2_admin" "$WORK/a" "$WORK/ca-a/bundle.pem" | sed "s/^level = .*/level = \"$level\"/"
    cat <<TOML
[[trust.federated]]
trust_domain = "b.example"
bundle = "$WORK/ca-b/bundle.pem"
[listeners]
outbound = "127.0.0.1:$pa2"
[[services]]
namespace = "bench"
name = "web"
ports = [{ port = 80 }]
[[peers]]
cluster = "b"
spiffe_id = "spiffe://b.example/isthmus/gateway/gw-b"
address = "127.0.0.1:$pb_ew"
locality = "bench"
services = ["bench/web"]
TOML
    printf '%s' "$extra"
  } > "$WORK/$tag-a2.toml"
  local v=${tag//[^a-zA-Z0-9]/_}
  start "${v}_A" "$bin" run --config "$WORK/$tag-a.toml"
  start "${v}_B2" "$bin" run --config "$WORK/$tag-b2.toml"
  start "${v}_A2" "$bin" run --config "$WORK/$tag-a2.toml"
  local a=${v}_A b2=${v}_B2 a2=${v}_A2
  eval "$list+=(\"a $name $pa $padmin ${!a}\" \"b $name $pa2 $pa2_admin,$pb_admin ${!a2} ${!b2}\")"
  READY+=("$padmin" "$pb_admin" "$pa2_admin")
  PORTS+=("$pa" "$pb_ew" "$pa2")
}

# --- the floor: plain for (a), mesh-client -> mesh-server for (b) ---
floor_pair() { # bin, file id, row name, list
  local bin=$1 tag=$2 name=$3 list=$4
  local pa sa pb sb pa2 sa2 v=${2//[^a-zA-Z0-9]/_}
  pa=$(free_port); sa=$(free_port); pb=$(free_port); sb=$(free_port); pa2=$(free_port); sa2=$(free_port)
  start "${v}_A" "$bin" plain --listen "127.0.0.1:$pa" --origin "127.0.0.1:$ORIGIN" --stats "127.0.0.1:$sa"
  start "${v}_B2" "$bin" mesh-server --listen "127.0.0.1:$pb" --cert "$WORK/b/svid.crt" --key "$WORK/b/svid.key" \
    --origin "127.0.0.1:$ORIGIN" --stats "127.0.0.1:$sb"
  start "${v}_A2" "$bin" mesh-client --listen "127.0.0.1:$pa2" --peer "127.0.0.1:$pb" --sni "$SNI" \
    --cert "$WORK/a/svid.crt" --key "$WORK/a/svid.key" --stats "127.0.0.1:$sa2"
  local a=${v}_A b2=${v}_B2 a2=${v}_A2
  eval "$list+=(\"a $name $pa $sa ${!a}\" \"b $name $pa2 $sa2,$sb ${!a2} ${!b2}\")"
  PORTS+=("$pa" "$pb" "$pa2")
}

# The span sink of the tracing rows: an OTLP/HTTP endpoint that takes every
# batch (a collector that keeps up, so the rows measure the gateway's side).
SINK=$(free_port)
start SINK_PID python3 -c '
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
' "$SINK"
wait_port "$SINK"
tracing_toml() { # sample ratio
  printf '[tracing]\nendpoint = "http://127.0.0.1:%s"\nprotocol = "http/protobuf"\nsample_ratio = %s\n' "$SINK" "$1"
}

READY=()
PORTS=()
isthmus_pair "$ISTHMUS" isthmus isthmus warn CASES
isthmus_pair "$ISTHMUS" isthmus-log isthmus+log "warn,isthmus::access=info" CASES
isthmus_pair "$ISTHMUS" isthmus-trace1 "isthmus+tr1%" warn CASES "$(tracing_toml 0.01)"
isthmus_pair "$ISTHMUS" isthmus-trace100 "isthmus+tr100%" warn CASES "$(tracing_toml 1.0)"
floor_pair "$FLOOR" floor floor CASES
[ -z "${FLOOR_P:-}" ] || floor_pair "$FLOOR_P" floor-patched floor+patches CASES
NAMES="isthmus isthmus+log isthmus+tr1% isthmus+tr100%"
for c in $COMPARE; do isthmus_pair "${c#*=}" "cmp-${c%%=*}" "${c%%=*}" warn CASES; NAMES="$NAMES ${c%%=*}"; done
NAMES="$NAMES floor floor+patches"
for c in $FLOOR_COMPARE; do floor_pair "${c#*=}" "cmp-${c%%=*}" "${c%%=*}" CASES; NAMES="$NAMES ${c%%=*}"; done
NAMES="$NAMES haproxy nginx"
[ -z "$ISTHMUS_COUNT" ] || isthmus_pair "$ISTHMUS_COUNT" isthmus-count isthmus warn COUNT_CASES
floor_pair "$FLOOR_COUNT" floor-count floor COUNT_CASES
[ -z "${FLOOR_P_COUNT:-}" ] || floor_pair "$FLOOR_P_COUNT" floor-patched-count floor+patches COUNT_CASES

# --- HAProxy ---
HPA=$(free_port)
{
  haproxy_head
  cat <<HAP
frontend fe
  bind 127.0.0.1:$HPA
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
HAP
} > "$WORK/haproxy-a.cfg"
start HAPROXY_A_PID haproxy -db -f "$WORK/haproxy-a.cfg"
HPB_EW=$(free_port); HPA2=$(free_port)
{
  haproxy_head
  cat <<HAP
frontend ew
  bind 127.0.0.1:$HPB_EW ssl crt $WORK/b/combined.pem ca-file $WORK/ca-a/ca.crt verify required alpn h2,http/1.1
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
HAP
} > "$WORK/haproxy-b2.cfg"
# HAProxy, like NGINX below, refuses a URI-SAN-only certificate on its name
# check (with or without verifyhost), so its A side verifies nothing about B;
# B still requires and verifies A's SVID. Isthmus verifies both ways, so this
# favours the peers slightly.
{
  haproxy_head
  cat <<HAP
frontend fe
  bind 127.0.0.1:$HPA2
  default_backend peer
backend peer
  # HTTP/2 responses carry no reason phrase, and h2load does not count an
  # HTTP/1.1 status line without one: put it back.
  http-response set-status 200 reason OK if { status 200 }
  server gw-b 127.0.0.1:$HPB_EW ssl crt $WORK/a/combined.pem ca-file $WORK/ca-b/ca.crt verify none alpn h2 sni str($SNI)
HAP
} > "$WORK/haproxy-a2.cfg"
start HAPROXY_B2_PID haproxy -db -f "$WORK/haproxy-b2.cfg"
start HAPROXY_A2_PID haproxy -db -f "$WORK/haproxy-a2.cfg"
case_add a haproxy "$HPA" - "$HAPROXY_A_PID"
case_add b haproxy "$HPA2" - "$HAPROXY_A2_PID" "$HAPROXY_B2_PID"

# --- NGINX ---
NGA=$(free_port)
start NGINX_A_PID nginx -c "$(nginx_conf nginx-a 4096 "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$NGA; location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"
NGB_EW=$(free_port); NGA2=$(free_port)
# NGINX cannot check a URI-SAN-only certificate (it verifies host names), so
# its A side verifies nothing about B; B still requires and verifies A's SVID.
start NGINX_B2_PID nginx -c "$(nginx_conf nginx-b2 4096 "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$NGB_EW ssl; ssl_certificate $WORK/b/svid.crt; ssl_certificate_key $WORK/b/svid.key;
    ssl_client_certificate $WORK/ca-a/ca.crt; ssl_verify_client on;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"
start NGINX_A2_PID nginx -c "$(nginx_conf nginx-a2 4096 "upstream peer { server 127.0.0.1:$NGB_EW; keepalive 64; }
  server { listen 127.0.0.1:$NGA2; location / { proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_ssl_certificate $WORK/a/svid.crt; proxy_ssl_certificate_key $WORK/a/svid.key;
    proxy_ssl_server_name on; proxy_ssl_name $SNI; proxy_ssl_session_reuse on; } }")"
case_add a nginx "$NGA" - "$NGINX_A_PID"
case_add b nginx "$NGA2" - "$NGINX_A2_PID" "$NGINX_B2_PID"

for p in "${PORTS[@]}" $HPA $HPB_EW $HPA2 $NGA $NGB_EW $NGA2; do wait_port "$p"; done
for a in "${READY[@]}"; do
  ok=
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$a/readyz" >/dev/null && ok=1 && break; sleep 0.1; done
  [ -n "$ok" ] || { echo "the gateway with admin port $a never became ready" >&2; exit 1; }
done

HOST=web.bench.svc.clusterset.local:80
# Every proxy answers before anything is measured.
for c in "${CASES[@]}" "${COUNT_CASES[@]}"; do
  read -r path name port _ <<<"$c"
  curl -sf -o /dev/null -H "Host: $HOST" "http://127.0.0.1:$port/" ||
    { echo "($path) $name on port $port does not answer 200; logs in $WORK (KEEP=1 keeps them)" >&2; exit 1; }
done

# All pids of a proxy (nginx masters fork workers).
# "utime stime ctxsw rss_kb" summed over the pids, every thread of each.
sample() {
  python3 - $(pids_of "$@") <<'PY'
import glob, os, sys
hz = os.sysconf("SC_CLK_TCK")
ut = st = cs = rss = 0
for pid in sys.argv[1:]:
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        ut += int(f[11]); st += int(f[12])
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
        for t in glob.glob(f"/proc/{pid}/task/*/status"):
            try:
                for line in open(t):
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        cs += int(line.split()[1])
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
print(ut / hz, st / hz, cs, rss)
PY
}

# h2load N requests at PORT; fails the run unless every one got a 2xx.
load() { # path, name, port, requests, extra h2load args...
  local path=$1 name=$2 port=$3 n=$4
  shift 4
  local out
  out=$(h2load --h1 -n "$n" -c "$CONNS" -H ":authority: $HOST" "$@" "http://127.0.0.1:$port/" 2>&1) || true
  local ok2xx
  ok2xx=$(echo "$out" | awk '/^status codes:/ {print $3}')
  if [ "${ok2xx:-0}" != "$n" ]; then
    echo "$out" >&2
    echo "FAILED: ($path) $name: ${ok2xx:-0} of $n requests got a 2xx; logs in $WORK (KEEP=1 keeps them)" >&2
    exit 1
  fi
  echo "$out"
}

RESULTS=$WORK/results.tsv
: > "$RESULTS"
measure() { # round, case...
  local round=$1 path=$2 name=$3 port=$4
  shift 5
  load "$path" "$name" "$port" "$WARMUP" >/dev/null
  local before after out log=$WORK/latency-$path-$name-$round
  before=$(sample "$@")
  out=$(load "$path" "$name" "$port" "$REQUESTS" --log-file="$log")
  after=$(sample "$@")
  local rps
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  python3 - "$log" "$round" "$path" "$name" "${rps%,}" "$before" "$after" >>"$RESULTS" <<'PY'
import sys
log, rnd, path, name, rps, before, after = sys.argv[1:]
lat = sorted(int(l.split()[2]) for l in open(log) if l.strip())
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0
b, a = [float(x) for x in before.split()], [float(x) for x in after.split()]
print("\t".join(map(str, [rnd, path, name, rps, pct(0.50), pct(0.99), a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3]])))
PY
  rm -f "$log"
}

for round in $(seq "$ROUNDS"); do
  for path in a b; do
    for c in "${CASES[@]}"; do
      read -r p name port _ids pids <<<"$c"
      [ "$p" = "$path" ] || continue
      echo "== round $round, path ($path): $name" >&2
      # shellcheck disable=SC2086
      measure "$round" $c
    done
  done
done

# --- system calls per request: a separate pass (counting slows the process) ---
SYSCALLS=$WORK/syscalls.tsv
: > "$SYSCALLS"
PERF_OK=
if timeout 10 perf stat -x, -e raw_syscalls:sys_enter -p "$ORIGIN_PID" sleep 0.2 >/dev/null 2>&1; then PERF_OK=1; fi
for c in "${CASES[@]}"; do
  [ "$PASSES" != 0 ] || break
  read -r path name port _ids pids <<<"$c"
  echo "== system calls, path ($path): $name" >&2
  load "$path" "$name" "$port" "$WARMUP" >/dev/null
  # shellcheck disable=SC2086
  all=$(pids_of $pids | paste -sd,)
  if [ -n "$PERF_OK" ]; then
    perf stat -x, -o "$WORK/perf-$path-$name" -e 'syscalls:sys_enter_*' -p "$all" &
    tracer=$!
    sleep 0.5
    load "$path" "$name" "$port" "$SYSCALL_REQUESTS" >/dev/null
    kill -INT "$tracer"; wait "$tracer" || true
    python3 - "$WORK/perf-$path-$name" "$path" "$name" "$SYSCALL_REQUESTS" >>"$SYSCALLS" <<'PY'
import sys
f, path, name, n = sys.argv[1:]
counts = {}
for line in open(f):
    parts = line.strip().split(",")
    if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_") and parts[0].isdigit():
        counts[parts[2][len("syscalls:sys_enter_"):]] = int(parts[0])
total = sum(counts.values())
top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
print("\t".join([path, name, str(total / int(n)),
                 " ".join(f"{k} {v / int(n):.2f}" for k, v in top if v / int(n) >= 0.01)]))
PY
  else
    tracers=()
    for p in ${all//,/ }; do
      strace -c -f -o "$WORK/strace-$path-$name-$p" -p "$p" &
      tracers+=($!)
    done
    sleep 1
    load "$path" "$name" "$port" "$SYSCALL_REQUESTS" >/dev/null
    kill -INT "${tracers[@]}"; wait "${tracers[@]}" || true
    python3 - "$path" "$name" "$SYSCALL_REQUESTS" "$WORK"/strace-"$path-$name"-* >>"$SYSCALLS" <<'PY'
import sys
path, name, n, *files = sys.argv[1:]
counts = {}
for f in files:
    for line in open(f):
        p = line.split()
        if len(p) >= 5 and p[3].isdigit() and p[-1] not in ("total", "syscall"):
            counts[p[-1]] = counts.get(p[-1], 0) + int(p[3])
total = sum(counts.values())
top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
print("\t".join([path, name, str(total / int(n)),
                 " ".join(f"{k} {v / int(n):.2f}" for k, v in top if v / int(n) >= 0.01)]))
PY
  fi
done

# --- allocations per request: the count-allocations builds, a separate pass ---
ALLOCS=$WORK/allocs.tsv
: > "$ALLOCS"
alloc_count() { # admin-or-stats ports (comma-separated), kind
  local total=0 port n
  for port in ${1//,/ }; do
    if [ "$2" = isthmus ]; then
      n=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '/^isthmus_process_allocations_total / {print $2}')
    else
      n=$(python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",int(sys.argv[1]))); print(s.makefile().read().split()[1])' "$port")
    fi
    case $n in '' | *[!0-9]*) echo "no allocation count on port $port" >&2; exit 1 ;; esac
    total=$((total + n))
  done
  echo $total
}
for c in "${COUNT_CASES[@]}"; do
  [ "$PASSES" != 0 ] || break
  read -r path name port ids pids <<<"$c"
  echo "== allocations, path ($path): $name" >&2
  load "$path" "$name" "$port" "$WARMUP" >/dev/null
  before=$(alloc_count "$ids" "${name%%+*}")
  load "$path" "$name" "$port" "$SYSCALL_REQUESTS" >/dev/null
  after=$(alloc_count "$ids" "${name%%+*}")
  printf '%s\t%s\t%s\n' "$path" "$name" "$(python3 -c "print(($after - $before) / $SYSCALL_REQUESTS)")" >>"$ALLOCS"
done

python3 - "$RESULTS" "$SYSCALLS" "$ALLOCS" "$REQUESTS" "$CONNS" "$ROUNDS" "$SYSCALL_REQUESTS" "${PERF_OK:+perf}" "$NAMES" <<'PY'
import statistics, sys
results, syscalls, allocs, n, conns, rounds, sn, tool, names = sys.argv[1:]
n = int(n)
runs = {}
for l in open(results):
    rnd, path, name, rps, p50, p99, ut, st, cs, rss = l.rstrip("\n").split("\t")
    ut, st = float(ut), float(st)
    runs.setdefault((path, name), []).append({
        "rps": float(rps), "p50": float(p50), "p99": float(p99),
        "user": ut * 10000 / n, "sys": st * 10000 / n, "cpu": (ut + st) * 10000 / n,
        "cs": float(cs) / n, "rss": float(rss) / 1024})
sc = {(l.split("\t")[0], l.split("\t")[1]): l.rstrip("\n").split("\t")[2:] for l in open(syscalls)}
al = {(l.split("\t")[0], l.split("\t")[1]): float(l.split("\t")[2]) for l in open(allocs)}
med = lambda key, k: statistics.median(r[k] for r in runs[key])
def cell(key, k, fmt):
    v = [r[k] for r in runs[key]]
    return f"{fmt(statistics.median(v))} [{fmt(min(v))}-{fmt(max(v))}]"
f0 = lambda x: f"{x:,.0f}"
f2 = lambda x: f"{x:.2f}"
f3 = lambda x: f"{x:.3f}"
print(f"\n{n} requests per run, {conns} connections, HTTP/1.1 keep-alive from h2load, 1 worker thread per proxy,")
print(f"{rounds} interleaved rounds: median [min-max]. CPU-s per 10k requests over every process of the proxy")
print(f"(both hops on path (b)); cs = context switches; system calls ({tool or 'strace -c'}) and allocations")
print(f"per request come from separate passes of {sn} requests (allocations: the count-allocations builds).")
names = names.split()
for path, title in (("a", "plain HTTP/1.1 proxying"), ("b", "A -> mTLS -> B (two processes)")):
    print(f"\npath ({path}): {title}")
    print(f"{'proxy':<14}{'req/s':>24}{'p50 ms':>22}{'p99 ms':>23}{'CPU-s/10k':>22}{'user':>7}{'sys':>7}{'cs/req':>8}{'sysc/req':>9}{'allocs/req':>11}{'RSS MB':>8}")
    for name in names:
        key = (path, name)
        if key not in runs:
            continue
        s = sc.get(key)
        a = al.get(key)
        print(f"{name:<14}{cell(key, 'rps', f0):>24}{cell(key, 'p50', f3):>22}{cell(key, 'p99', f3):>23}"
              f"{cell(key, 'cpu', f3):>22}{med(key, 'user'):>7.3f}{med(key, 'sys'):>7.3f}{med(key, 'cs'):>8.2f}"
              f"{(float(s[0]) if s else float('nan')):>9.2f}{(f'{a:.1f}' if a is not None else 'n/a'):>11}{med(key, 'rss'):>8.1f}")
    for name in names:
        s = sc.get((path, name))
        if s and len(s) > 1 and s[1]:
            print(f"  system calls per request, {name}: {s[1]}")
def ratio(path, x, y, k):
    if (path, x) in runs and (path, y) in runs and med((path, y), k):
        return med((path, x), k) / med((path, y), k)
print("\nRatios (medians). CPU per request: lower is better; req per CPU-s: higher is better; p99: lower is better.")
for path, target in (("a", 1.10), ("b", 1.15)):
    for me in [x for x in names if not x.startswith(("floor", "haproxy", "nginx"))]:
        for fl in ("floor", "floor+patches"):
            r = ratio(path, me, fl, "cpu")
            if r:
                print(f"  ({path}) {me:<12} / {fl:<14} CPU per request {r:.2f}x (target <= {target:.2f}x)   p99 {ratio(path, me, fl, 'p99'):.2f}x")
for path in ("a", "b"):
    for me in [x for x in names if x not in ("haproxy", "nginx")]:
        for peer in ("haproxy", "nginx"):
            r = ratio(path, peer, me, "cpu")  # req per CPU-s of me / of peer
            if r:
                goal = {("a", "haproxy"): " (floor target >= 0.70x)", ("b", "nginx"): " (floor target >= 0.60x)"}.get((path, peer), "") if me.startswith("floor") else ""
                print(f"  ({path}) {me:<14} vs {peer:<8} req per CPU-s {r:.2f}x{goal}   p99 {ratio(path, me, peer, 'p99'):.2f}x"
                      + (" (floor target <= 1.50x)" if (path, peer) == ("b", "nginx") and me.startswith("floor") else ""))
PY
