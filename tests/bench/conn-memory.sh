#!/usr/bin/env bash
# Memory per idle HTTP/1.1 keep-alive connection: Isthmus (outbound listener),
# the bare-Pingora floor (when built), HAProxy and NGINX (Debian's), in the same run.
#
# For each N in CONNS_LIST and each proxy, ROUNDS times (a fresh proxy each time):
#   1. the proxy starts and serves one warm-up request: its RSS is "idle";
#   2. a Python asyncio client opens N connections, each makes one request
#      through the proxy to an NGINX origin and then stays open, idle: after
#      SETTLE seconds the proxy's RSS is "open";
#   3. the client closes them all: AFTER seconds later the RSS is "closed".
# Per connection = (open - idle) / N. The table shows the median of the rounds
# (and the spread of the per-connection cost). RSS is VmRSS summed over the
# proxy's processes (NGINX: master and worker).
#
# Usage: tests/bench/conn-memory.sh
#   CONNS_LIST="1000 5000 10000" ROUNDS=3 SETTLE=2 AFTER=5 by default;
#   PROXIES="isthmus floor haproxy nginx" selects columns;
#   FLOOR_BIN: the bare-Pingora floor (tests/bench/floor), by default
#   target/bench-floor/release/pingora-floor; skipped when missing.
#   ISTHMUS_ENV="NAME=value ..." is put in Isthmus's environment (allocator
#   settings such as GLIBC_TUNABLES or MIMALLOC_PURGE_DELAY).
# Needs a release build (cargo build --release -p isthmus-gateway), haproxy and
# nginx-light (installed with apt-get when missing, as root), and a hard
# RLIMIT_NOFILE above the largest N plus a few hundred.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
CONNS_LIST=${CONNS_LIST:-"1000 5000 10000"}
ROUNDS=${ROUNDS:-3}
SETTLE=${SETTLE:-2}
AFTER=${AFTER:-5}
PROXIES=${PROXIES:-"isthmus floor haproxy nginx"}
FLOOR_BIN=${FLOOR_BIN:-$ROOT/target/bench-floor/release/pingora-floor}
ISTHMUS_ENV=${ISTHMUS_ENV:-}

bench_need haproxy:haproxy nginx:nginx-light python3:python3 curl:curl
bench_isthmus
bench_workdir conn-memory

max=0
for n in $CONNS_LIST; do [ "$n" -gt "$max" ] && max=$n; done
# Every proxy started below, and the client, inherit this.
ulimit -n $((2 * max + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
FDS=$(ulimit -n)
[ "$FDS" = unlimited ] && FDS=1048576
if [ "$FDS" -lt $((max + 200)) ]; then
  echo "RLIMIT_NOFILE ($FDS) is below $((max + 200)): lower CONNS_LIST or raise the hard limit" >&2
  exit 1
fi

if [[ " $PROXIES " == *" floor "* ]] && [ ! -x "$FLOOR_BIN" ]; then
  echo "bare-Pingora floor not built ($FLOOR_BIN): its column is skipped" >&2
  PROXIES=${PROXIES//floor/}
fi


# Every NGINX here may hold every connection, and keeps idle ones long.
nginx_here() { # name, worker_connections, server block
  nginx_conf "$1" "$2" "keepalive_timeout 300s;
  $3" "worker_rlimit_nofile $FDS;"
}

ORIGIN=$(free_port)
start ORIGIN_PID nginx -c "$(nginx_here origin 4096 "server { listen 127.0.0.1:$ORIGIN; location / { return 200 \"ok\n\"; } }")"
wait_port "$ORIGIN"

# The client: opens N connections through the proxy (at most 64 requests in
# flight, so the proxy's upstream connections stay few), keeps them open, and
# reads the proxy's RSS idle, open and after close.
cat > "$WORK/client.py" <<'PY'
import asyncio, resource, sys, time

port, n, settle, after = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pids = [int(p) for p in sys.argv[5].split(",")]
host = "web.bench.svc.clusterset.local"
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []

def rss_kib():
    total = 0
    for p in pids:
        for q in [p] + children(p):
            try:
                with open(f"/proc/{q}/status") as f:
                    total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
    return total

REQ = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

async def one(reader, writer):
    writer.write(REQ)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length:
        await reader.readexactly(length)
    if status != b"200":
        raise RuntimeError(f"status {status!r}")

async def main():
    idle = rss_kib()
    gate = asyncio.Semaphore(64)
    conns = []
    failed = 0

    async def open_one():
        nonlocal failed
        async with gate:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await asyncio.wait_for(one(reader, writer), 30)
                conns.append((reader, writer))
            except Exception as e:
                failed += 1
                if failed <= 3:
                    print(f"connection failed: {e!r}", file=sys.stderr)

    await asyncio.gather(*(open_one() for _ in range(n)))
    await asyncio.sleep(settle)
    # Still open? A proxy that closed idle connections would look cheap.
    closed = sum(1 for r, _ in conns if r.at_eof())
    opened = rss_kib()
    # A new request still gets through while they are open.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(one(reader, writer), 30)
    writer.close()
    for _, w in conns:
        w.close()
    await asyncio.sleep(after)
    closed_rss = rss_kib()
    print(idle, opened, closed_rss, len(conns) - closed, failed)

asyncio.run(main())
PY

# Starts proxy $1 on a fresh port; sets PORT and PROXY_PID.
start_proxy() {
  PORT=$(free_port)
  case $1 in
    isthmus)
      local admin; admin=$(free_port)
      {
        gateway_toml bench bench a.example "$admin"
        cat <<TOML
[listeners]
outbound = "127.0.0.1:$PORT"
[limits.outbound]
connections = 1000000
connections_per_source = 1000000
TOML
        web_service "$ORIGIN"
      } > "$WORK/isthmus.toml"
      # shellcheck disable=SC2086
      start PROXY_PID env $ISTHMUS_ENV "$ISTHMUS" run --config "$WORK/isthmus.toml"
      for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
      ;;
    floor)
      start PROXY_PID "$FLOOR_BIN" plain --listen "127.0.0.1:$PORT" --origin "127.0.0.1:$ORIGIN"
      ;;
    haproxy)
      cat > "$WORK/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn $((max + 100))
  # It reserves two descriptors per connection; with upstream reuse it needs
  # one and a few: run on what the limit allows.
  no strict-limits
defaults
  mode http
  timeout connect 2s
  timeout client 300s
  timeout server 30s
  timeout http-keep-alive 300s
  http-reuse always
frontend fe
  bind 127.0.0.1:$PORT
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
HAP
      start PROXY_PID haproxy -db -f "$WORK/haproxy.cfg"
      ;;
    nginx)
      # NGINX closes idle keep-alive connections when it runs short of
      # worker connections: leave it plenty.
      start PROXY_PID nginx -c "$(nginx_here nginx-proxy $((2 * max + 1000)) "upstream origin { server 127.0.0.1:$ORIGIN; keepalive 64; }
  server { listen 127.0.0.1:$PORT; location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }")"
      ;;
  esac
  wait_port "$PORT"
  # One warm-up request, then the process settles.
  curl -sf -o /dev/null -H "Host: web.bench.svc.clusterset.local" "http://127.0.0.1:$PORT/"
  sleep 1
}

stop_proxy() {
  kill "$PROXY_PID" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$PROXY_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$PROXY_PID" 2>/dev/null || true
}

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
  for n in $CONNS_LIST; do
    for proxy in $PROXIES; do
      start_proxy "$proxy"
      read -r idle open closed held failed < <(python3 "$WORK/client.py" "$PORT" "$n" "$SETTLE" "$AFTER" "$PROXY_PID")
      stop_proxy
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$proxy" "$n" "$round" "$idle" "$open" "$closed" "$held" "$failed" >>"$RESULTS"
      echo "round $round, $n connections, $proxy: idle $idle KiB, open $open KiB, closed $closed KiB ($held held, $failed failed)" >&2
    done
  done
done

python3 - "$RESULTS" "$ROUNDS" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
by = {}
for proxy, n, _round, idle, opened, closed, held, failed in rows:
    by.setdefault((proxy, int(n)), []).append(
        (int(idle), int(opened), int(closed), int(held), int(failed)))
print(f"\nIdle HTTP/1.1 keep-alive connections, each after one request; median of {sys.argv[2]} rounds")
print(f"{'proxy':<9}{'conns':>7}{'idle MB':>9}{'open MB':>9}{'closed MB':>10}"
      f"{'KiB/conn':>10}{'(min-max)':>14}{'closed/idle':>12}{'held':>7}{'failed':>7}")
bad = []
for (proxy, n), runs in by.items():
    med = lambda i: statistics.median(r[i] for r in runs)
    per = [(r[1] - r[0]) / n for r in runs]
    ratio = statistics.median(r[2] / r[0] for r in runs)
    held, failed = min(r[3] for r in runs), max(r[4] for r in runs)
    if held < n or failed:
        bad.append(f"{proxy}/{n}")
    print(f"{proxy:<9}{n:>7}{med(0) / 1024:>9.1f}{med(1) / 1024:>9.1f}{med(2) / 1024:>10.1f}"
          f"{statistics.median(per):>10.2f}{f'{min(per):.2f}-{max(per):.2f}':>14}{ratio:>11.2f}x"
          f"{held:>7}{failed:>7}")
if bad:
    sys.exit(f"connections failed or were closed early in {', '.join(bad)}: those rows understate the cost")
PY
