#!/usr/bin/env bash
# Isthmus against HAProxy and NGINX (Debian's), measured in the same run on loopback.
#
#   (a) plain HTTP/1.1 keep-alive proxying:   h2load -> proxy -> origin
#   (b) the two-hop east-west path:           h2load -> proxy A -> mTLS -> proxy B -> origin
#       (HAProxy and NGINX chains use the same SPIFFE certificates; Isthmus and
#        HAProxy multiplex HTTP/2 between the hops, NGINX speaks HTTP/1.1 upstream;
#        only Isthmus's A side verifies B's SVID, see below)
#
# Every proxy runs one worker thread; the origin is NGINX returning a 3-byte body.
# Prints requests/s, p50/p99 latency, CPU-seconds per 10k requests (all processes
# of the proxy, from /proc), RSS, and Isthmus/peer ratios. The machine is shared
# and noisy: compare ratios within one run, not absolute numbers across runs.
#
# Usage: tests/bench/proxy-bench.sh        (REQUESTS=100000 CONNS=32 by default)
# Needs a release build (cargo build --release -p isthmus-gateway), haproxy,
# nginx-light and nghttp2-client (installed with apt-get when missing, as root).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
REQUESTS=${REQUESTS:-100000}
CONNS=${CONNS:-32}
WARMUP=${WARMUP:-5000}

bench_need haproxy:haproxy nginx:nginx-light h2load:nghttp2-client python3:python3
bench_isthmus
bench_workdir proxy-bench

wait_port() { for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# --- PKI: two trust domains, one SVID each (the same files for every chain) ---
"$ISTHMUS" ca init --trust-domain a.example --out "$WORK/ca-a" >/dev/null
"$ISTHMUS" ca init --trust-domain b.example --out "$WORK/ca-b" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-a" --spiffe-id spiffe://a.example/isthmus/gateway/gw-a --out "$WORK/a" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-b" --spiffe-id spiffe://b.example/isthmus/gateway/gw-b --out "$WORK/b" >/dev/null
cat "$WORK/a/svid.crt" "$WORK/a/svid.key" > "$WORK/a/combined.pem"
cat "$WORK/b/svid.crt" "$WORK/b/svid.key" > "$WORK/b/combined.pem"

nginx_conf() { # name, server block
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<NGX
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/$1; proxy_temp_path $WORK/$1; fastcgi_temp_path $WORK/$1;
  uwsgi_temp_path $WORK/$1; scgi_temp_path $WORK/$1;
  $2
}
NGX
  echo "$WORK/$1/nginx.conf"
}

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
start ORIGIN_PID nginx -c "$(nginx_conf origin "server { listen 127.0.0.1:$ORIGIN; location / { return 200 \"ok\n\"; } }")"
wait_port "$ORIGIN"

# --- proxies, path (a) ---
ISA=$(free_port); ISA_ADMIN=$(free_port)
{
  gateway_toml bench bench a.example "$ISA_ADMIN"
  cat <<TOML
[listeners]
outbound = "127.0.0.1:$ISA"
[[services]]
namespace = "bench"
name = "web"
ports = [{ port = 80 }]
endpoints = ["127.0.0.1:$ORIGIN"]
TOML
} > "$WORK/isthmus-a.toml"
start ISTHMUS_A_PID "$ISTHMUS" run --config "$WORK/isthmus-a.toml"

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

NGA=$(free_port)
start NGINX_A_PID nginx -c "$(nginx_conf nginx-a "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$NGA; location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"

# --- proxies, path (b): A -> mTLS -> B ---
IB_EW=$(free_port); IB_ADMIN=$(free_port); IA2=$(free_port); IA2_ADMIN=$(free_port)
{
  gateway_toml gw-b b b.example "$IB_ADMIN" "$WORK/b" "$WORK/ca-b/bundle.pem"
  cat <<TOML
[[trust.federated]]
trust_domain = "a.example"
bundle = "$WORK/ca-a/bundle.pem"
[listeners]
east_west = "127.0.0.1:$IB_EW"
[[services]]
namespace = "bench"
name = "web"
ports = [{ port = 80 }]
endpoints = ["127.0.0.1:$ORIGIN"]
export = true
TOML
} > "$WORK/isthmus-b2.toml"
{
  gateway_toml gw-a a a.example "$IA2_ADMIN" "$WORK/a" "$WORK/ca-a/bundle.pem"
  cat <<TOML
[[trust.federated]]
trust_domain = "b.example"
bundle = "$WORK/ca-b/bundle.pem"
[listeners]
outbound = "127.0.0.1:$IA2"
[[services]]
namespace = "bench"
name = "web"
ports = [{ port = 80 }]
[[peers]]
cluster = "b"
spiffe_id = "spiffe://b.example/isthmus/gateway/gw-b"
address = "127.0.0.1:$IB_EW"
locality = "bench"
services = ["bench/web"]
TOML
} > "$WORK/isthmus-a2.toml"
start ISTHMUS_B2_PID "$ISTHMUS" run --config "$WORK/isthmus-b2.toml"
start ISTHMUS_A2_PID "$ISTHMUS" run --config "$WORK/isthmus-a2.toml"

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
  server gw-b 127.0.0.1:$HPB_EW ssl crt $WORK/a/combined.pem ca-file $WORK/ca-b/ca.crt verify none alpn h2 sni str(outbound_.80_._.web.bench.svc.cluster.local)
HAP
} > "$WORK/haproxy-a2.cfg"
start HAPROXY_B2_PID haproxy -db -f "$WORK/haproxy-b2.cfg"
start HAPROXY_A2_PID haproxy -db -f "$WORK/haproxy-a2.cfg"

NGB_EW=$(free_port); NGA2=$(free_port)
# NGINX cannot check a URI-SAN-only certificate (it verifies host names), so
# its A side verifies nothing about B; B still requires and verifies A's SVID.
start NGINX_B2_PID nginx -c "$(nginx_conf nginx-b2 "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$NGB_EW ssl; ssl_certificate $WORK/b/svid.crt; ssl_certificate_key $WORK/b/svid.key;
    ssl_client_certificate $WORK/ca-a/ca.crt; ssl_verify_client on;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"
start NGINX_A2_PID nginx -c "$(nginx_conf nginx-a2 "upstream peer { server 127.0.0.1:$NGB_EW; keepalive 64; }
  server { listen 127.0.0.1:$NGA2; location / { proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_ssl_certificate $WORK/a/svid.crt; proxy_ssl_certificate_key $WORK/a/svid.key;
    proxy_ssl_server_name on; proxy_ssl_name outbound_.80_._.web.bench.svc.cluster.local; proxy_ssl_session_reuse on; } }")"

for p in $ISA $HPA $NGA $IB_EW $IA2 $HPB_EW $HPA2 $NGB_EW $NGA2; do wait_port "$p"; done
for a in $ISA_ADMIN $IB_ADMIN $IA2_ADMIN; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$a/readyz" >/dev/null && break; sleep 0.1; done
done

# All pids of a proxy (nginx masters fork workers).
pids_of() { for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done; }
cpu_ticks() { local t=0; for p in $(pids_of "$@"); do
  [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
rss_kb() { local t=0; for p in $(pids_of "$@"); do
  [ -r "/proc/$p/status" ] && t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }
HZ=$(getconf CLK_TCK)

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
bench() { # path, proxy name, port, pids...
  local path=$1 name=$2 p=$3; shift 3
  local host=web.bench.svc.clusterset.local:80
  h2load --h1 -n "$WARMUP" -c "$CONNS" -H ":authority: $host" "http://127.0.0.1:$p/" >/dev/null 2>&1 || true
  local before; before=$(cpu_ticks "$@")
  local log="$WORK/$name-$path.latency"
  local out; out=$(h2load --h1 -n "$REQUESTS" -c "$CONNS" -H ":authority: $host" --log-file="$log" "http://127.0.0.1:$p/" 2>&1)
  local after; after=$(cpu_ticks "$@")
  local rps failed
  rps=$(echo "$out" | awk '/^finished in/ {print $4}')
  failed=$(echo "$out" | awk '/^requests:/ {for (i=1;i<=NF;i++) if ($(i+1)=="failed,") print $i}')
  python3 - "$log" "$path" "$name" "$rps" "$failed" "$before" "$after" "$HZ" "$REQUESTS" "$(rss_kb "$@")" >>"$RESULTS" <<'PY'
import sys
log, path, name, rps, failed, before, after, hz, n, rss = sys.argv[1:]
lat = sorted(int(l.split()[2]) for l in open(log) if l.strip())
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0
cpu = (int(after) - int(before)) / float(hz)
print("\t".join([path, name, rps.rstrip(","), f"{pct(0.50):.3f}", f"{pct(0.99):.3f}",
                 f"{cpu * 10000 / int(n):.3f}", f"{int(rss) / 1024:.1f}", failed or "0",
                 f"{int(n) / cpu if cpu else 0:.0f}"]))
PY
}

bench a isthmus "$ISA" "$ISTHMUS_A_PID"
bench a haproxy "$HPA" "$HAPROXY_A_PID"
bench a nginx "$NGA" "$NGINX_A_PID"
bench b isthmus "$IA2" "$ISTHMUS_A2_PID" "$ISTHMUS_B2_PID"
bench b haproxy "$HPA2" "$HAPROXY_A2_PID" "$HAPROXY_B2_PID"
bench b nginx "$NGA2" "$NGINX_A2_PID" "$NGINX_B2_PID"

python3 - "$RESULTS" "$REQUESTS" "$CONNS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
print(f"\n{sys.argv[2]} requests, {sys.argv[3]} connections, HTTP/1.1 keep-alive, 1 worker thread per proxy")
print(f"{'path':<5}{'proxy':<9}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU-s/10k':>11}{'RSS MB':>9}{'failed':>8}{'req/CPU-s':>11}")
by = {}
for path, name, rps, p50, p99, cpu, rss, failed, per_cpu in rows:
    by[(path, name)] = (float(rps or 0), float(p99), float(per_cpu))
    print(f"{path:<5}{name:<9}{float(rps or 0):>10.0f}{float(p50):>9.3f}{float(p99):>9.3f}{float(cpu):>11.3f}{float(rss):>9.1f}{failed:>8}{float(per_cpu):>11.0f}")
failed = [f"{path}/{name}" for path, name, *_rest in rows if _rest[5] not in ("0", "")]
print("\nIsthmus / peer ratios (req per CPU-second: higher is better; p99: lower is better)")
for path in ("a", "b"):
    for peer in ("haproxy", "nginx"):
        i, p = by.get((path, "isthmus")), by.get((path, peer))
        if i and p and p[2] and p[1]:
            print(f"  path ({path}) vs {peer:<8} req/CPU-s {i[2] / p[2]:.2f}x   p99 {i[1] / p[1]:.2f}x")
if failed:
    sys.exit(f"requests failed in {', '.join(failed)}: the numbers above are not comparable")
PY
