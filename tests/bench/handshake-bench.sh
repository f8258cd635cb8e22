#!/usr/bin/env bash
# What a new gateway-to-gateway connection costs the server: the CPU of the
# Isthmus east-west listener per mTLS connection (TLS 1.3, P-256 SVIDs, the
# client presents its SVID), against HAProxy and NGINX terminating the same
# mTLS with the same certificates, one worker thread each.
#
# A Python client opens HANDSHAKES connections one after another; on each it
# completes the handshake, sends one HTTP/1.1 request (Connection: close) and
# reads the answer to the end (so TLS 1.3 session tickets, if any, arrive). Run
# twice per server: every connection a full handshake, then offering the
# previous connection's session (resumption). The client reports how many
# sessions the server actually resumed: 0 means the listener does not resume.
# CPU is the server's own (utime + stime from /proc/PID/stat, every process)
# per connection; the one small request on each is part of it.
#
# Usage: tests/bench/handshake-bench.sh     (HANDSHAKES=1000, ROUNDS=3)
# Needs a release build (cargo build --release -p isthmus-gateway), haproxy,
# nginx-light (installed with apt-get when missing, as root). KEEP=1 keeps logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
HANDSHAKES=${HANDSHAKES:-1000}
ROUNDS=${ROUNDS:-3}

bench_need haproxy:haproxy nginx:nginx-light python3:python3 curl:curl
bench_isthmus
bench_workdir handshake-bench

"$ISTHMUS" ca init --trust-domain a.example --out "$WORK/ca-a" >/dev/null
"$ISTHMUS" ca init --trust-domain b.example --out "$WORK/ca-b" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-a" --spiffe-id spiffe://a.example/isthmus/gateway/gw-a --out "$WORK/a" >/dev/null
"$ISTHMUS" ca issue --ca "$WORK/ca-b" --spiffe-id spiffe://b.example/isthmus/gateway/gw-b --out "$WORK/b" >/dev/null
cat "$WORK/b/svid.crt" "$WORK/b/svid.key" > "$WORK/b/combined.pem"
SNI=outbound_.80_._.web.bench.svc.cluster.local

ORIGIN=$(free_port)
start ORIGIN_PID nginx -c "$(nginx_conf origin 1024 "server { listen 127.0.0.1:$ORIGIN; location / { return 200 \"ok\n\"; } }")"

# Isthmus: gateway B's east-west listener, exporting one service.
IB_EW=$(free_port); IB_ADMIN=$(free_port)
{
  gateway_toml gw-b b b.example "$IB_ADMIN" "$WORK/b" "$WORK/ca-b/bundle.pem"
  cat <<TOML
[[trust.federated]]
trust_domain = "a.example"
bundle = "$WORK/ca-a/bundle.pem"
[listeners]
east_west = "127.0.0.1:$IB_EW"
TOML
  web_service "$ORIGIN" export
} > "$WORK/isthmus-b.toml"
start ISTHMUS_PID "$ISTHMUS" run --config "$WORK/isthmus-b.toml"

HP=$(free_port)
cat > "$WORK/haproxy.cfg" <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend ew
  bind 127.0.0.1:$HP ssl crt $WORK/b/combined.pem ca-file $WORK/ca-a/ca.crt verify required alpn http/1.1
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
HAP
start HAPROXY_PID haproxy -db -f "$WORK/haproxy.cfg"

NG=$(free_port)
start NGINX_PID nginx -c "$(nginx_conf nginx 1024 "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 16; }
  server { listen 127.0.0.1:$NG ssl; ssl_certificate $WORK/b/svid.crt; ssl_certificate_key $WORK/b/svid.key;
    ssl_client_certificate $WORK/ca-a/ca.crt; ssl_verify_client on; ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:s:1m;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"

for p in $ORIGIN $IB_EW $HP $NG; do wait_port "$p"; done
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$IB_ADMIN/readyz" >/dev/null && break; sleep 0.1; done

cpu_s() { python3 - $(pids_of "$@") <<'PY'
import os, sys
t = 0
for pid in sys.argv[1:]:
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        t += int(f[11]) + int(f[12])
    except FileNotFoundError:
        pass
print(t / os.sysconf("SC_CLK_TCK"))
PY
}

# Prints "connections resumed client-ms-per-connection"; fails unless every
# connection got an HTTP answer.
client() { # port, resume (0/1), connections
  python3 - "$1" "$2" "$3" "$WORK/a/svid.crt" "$WORK/a/svid.key" "$SNI" <<'PY'
import socket, ssl, sys, time
port, resume, n, cert, key, sni = sys.argv[1:]
n = int(n)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False          # a URI-SAN-only SVID: Python checks host names only
ctx.verify_mode = ssl.CERT_NONE     # (the server's side of the handshake is what is measured)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
req = b"GET / HTTP/1.1\r\nHost: web.bench.svc.clusterset.local\r\nConnection: close\r\n\r\n"
session, resumed, failed = None, 0, 0
t0 = time.perf_counter()
for _ in range(n):
    raw = socket.create_connection(("127.0.0.1", int(port)))
    s = ctx.wrap_socket(raw, server_hostname=sni, session=session if resume == "1" else None)
    resumed += s.session_reused
    s.sendall(req)
    body = b""
    while chunk := s.recv(65536):
        body += chunk
    if not body.startswith(b"HTTP/1.1 "):
        failed += 1
    if resume == "1":
        session = s.session
    s.close()
ms = (time.perf_counter() - t0) * 1000 / n
if failed:
    sys.exit(f"{failed} of {n} connections got no HTTP answer")
print(n, resumed, f"{ms:.3f}")
PY
}

RESULTS=$WORK/results.tsv
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  for server in isthmus haproxy nginx; do
    case $server in
      isthmus) port=$IB_EW pids=$ISTHMUS_PID ;;
      haproxy) port=$HP pids=$HAPROXY_PID ;;
      nginx) port=$NG pids=$NGINX_PID ;;
    esac
    for resume in 0 1; do
      echo "== round $round: $server, resumption $([ $resume = 1 ] && echo offered || echo off)" >&2
      client "$port" "$resume" 20 >/dev/null # warm-up
      before=$(cpu_s $pids)
      read -r n resumed ms < <(client "$port" "$resume" "$HANDSHAKES")
      after=$(cpu_s $pids)
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$resume" "$n" "$resumed" "$ms" \
        "$(python3 -c "print(($after - $before) * 1000 / $n)")" >>"$RESULTS"
    done
  done
done

python3 - "$RESULTS" "$HANDSHAKES" "$ROUNDS" <<'PY'
import statistics, sys
rows = {}
for l in open(sys.argv[1]):
    server, resume, n, resumed, ms, cpu = l.split("\t")
    rows.setdefault((server, resume), []).append((int(resumed), float(ms), float(cpu)))
print(f"\n{sys.argv[2]} TLS 1.3 mTLS connections (one HTTP/1.1 request each), {sys.argv[3]} rounds: median [min-max]")
print(f"{'server':<10}{'resumption':<12}{'server CPU ms/conn':>26}{'client ms/conn':>18}{'resumed':>10}  (fewest resumed in a round)")
for (server, resume), v in rows.items():
    cpu = [x[2] for x in v]
    print(f"{server:<10}{'offered' if resume == '1' else 'off':<12}"
          f"{f'{statistics.median(cpu):.3f} [{min(cpu):.3f}-{max(cpu):.3f}]':>26}"
          f"{statistics.median(x[1] for x in v):>18.3f}{min(x[0] for x in v):>10}")
full = {s: statistics.median(x[2] for x in rows[(s, '0')]) for s in ("isthmus", "haproxy", "nginx")}
print(f"\nIsthmus / HAProxy server CPU per full handshake {full['isthmus'] / full['haproxy']:.2f}x, "
      f"Isthmus / NGINX {full['isthmus'] / full['nginx']:.2f}x")
for s in ("isthmus", "haproxy", "nginx"):
    if max(x[0] for x in rows[(s, "1")]) == 0:
        print(f"{s}: no session resumed (the listener does not resume sessions for this client)")
PY
