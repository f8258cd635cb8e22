#!/usr/bin/env bash
# Isthmus's DNS server against NSD (Debian's), serving the same clusterset.local
# zone on loopback, measured with dnsperf in the same run.
#
# Isthmus serves SERVICES exported services (its zone is built from its catalog);
# NSD gets a zone file with exactly the same records (the clusterset IPs are read
# from Isthmus's state file): per service an A record, an SRV record for the
# named port, a PTR for the IP, plus the SOA, NS and dns-version TXT. The query
# mix, the same for both: A 70 %, SRV 10 %, PTR 5 %, TXT 5 %, NXDOMAIN 10 %.
# Both run single-threaded (NSD server-count 1; Isthmus's DNS service runs on
# one runtime thread). dnsperf runs DURATION seconds per server with up to
# OUTSTANDING queries in flight over UDP.
#
# Prints queries/s, average latency and its standard deviation (dnsperf's),
# lost queries, RSS (of the whole gateway process for Isthmus, data plane
# included) and the Isthmus/NSD ratios. Response rate limiting is off in both
# (dnsperf is one source asking far faster than dns.rate_limit allows).
# The machine is shared and noisy: compare the ratios of one run, not absolute
# numbers across runs.
#
# Usage: tests/bench/dns-bench.sh        (SERVICES=1000 DURATION=10 OUTSTANDING=100)
# Needs a release build (cargo build --release -p isthmus-gateway), nsd, dnsperf
# and dig (installed with apt-get when missing, as root).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
SERVICES=${SERVICES:-1000}
DURATION=${DURATION:-10}
OUTSTANDING=${OUTSTANDING:-100}

bench_need /usr/sbin/nsd:nsd dnsperf:dnsperf dig:bind9-dnsutils python3:python3
bench_isthmus
bench_workdir dns-bench

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

ISTHMUS_DNS=$(free_port)
NSD_DNS=$(free_port)
ADMIN=$(free_port)

# --- Isthmus: SERVICES exported services, no identity needed for DNS.
{
  gateway_toml gw-bench bench bench.example "$ADMIN"
  cat <<EOF
[dns]
listen = "127.0.0.1:$ISTHMUS_DNS"
clusterset_ipv4_range = "127.250.0.0/16"
clusterset_listeners = false
state_file = "$WORK/clusterset-ips.json"
ttl = "30s"
rate_limit = 0
EOF
  for i in $(seq 1 "$SERVICES"); do
    printf '[[services]]\nnamespace = "bench"\nname = "svc-%d"\nports = [{ port = 8080, name = "http" }]\nendpoints = ["127.0.0.1:9"]\nexport = true\n' "$i"
  done
} >"$WORK/isthmus.toml"
start ISTHMUS_PID "$ISTHMUS" run --config "$WORK/isthmus.toml"
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { cat "$WORK/ISTHMUS_PID.log"; exit 1; }
for _ in $(seq 1 100); do
  [ -s "$WORK/clusterset-ips.json" ] && dig +short -p "$ISTHMUS_DNS" @127.0.0.1 "svc-$SERVICES.bench.svc.clusterset.local" | grep -q . && break
  sleep 0.2
done

# --- NSD: the same records, from Isthmus's allocations; and the query file.
python3 - "$WORK" "$SERVICES" <<'EOF'
import json, random, sys
work, n = sys.argv[1], int(sys.argv[2])
ips = json.load(open(f"{work}/clusterset-ips.json"))["services"]
zone = ["$ORIGIN clusterset.local.", "$TTL 30",
        "@ IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 28800 7200 604800 30",
        "@ IN NS ns.dns.clusterset.local.",
        'dns-version IN TXT "1.0.0"']
rev = {}
names = []
for key, ip in sorted(ips.items()):
    ns, name = key.split("/")
    a = ip["ipv4"]
    fq = f"{name}.{ns}.svc"
    zone.append(f"{fq} IN A {a}")
    zone.append(f"_http._tcp.{fq} IN SRV 0 100 8080 {fq}.clusterset.local.")
    o = a.split(".")
    rev[f"{o[3]}.{o[2]}"] = f"{fq}.clusterset.local."
    names.append((fq + ".clusterset.local", a))
assert len(names) == n, (len(names), n)
open(f"{work}/clusterset.local.zone", "w").write("\n".join(zone) + "\n")
rz = ["$ORIGIN 250.127.in-addr.arpa.", "$TTL 30",
      "@ IN SOA ns.dns.clusterset.local. hostmaster.clusterset.local. 1 28800 7200 604800 30",
      "@ IN NS ns.dns.clusterset.local."]
rz += [f"{k} IN PTR {v}" for k, v in sorted(rev.items())]
open(f"{work}/250.127.in-addr.arpa.zone", "w").write("\n".join(rz) + "\n")
random.seed(7)
q = []
for _ in range(20000):
    name, a = random.choice(names)
    r = random.random()
    if r < 0.70: q.append(f"{name} A")
    elif r < 0.80: q.append(f"_http._tcp.{name} SRV")
    elif r < 0.85:
        o = a.split("."); q.append(f"{o[3]}.{o[2]}.{o[1]}.{o[0]}.in-addr.arpa PTR")
    elif r < 0.90: q.append("dns-version.clusterset.local TXT")
    else: q.append(f"missing-{random.randrange(10**6)}.bench.svc.clusterset.local A")
open(f"{work}/queries.txt", "w").write("\n".join(q) + "\n")
EOF
cat >"$WORK/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1
  port: $NSD_DNS
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  pidfile: "$WORK/nsd.pid"
  database: ""
  xfrdfile: "$WORK/xfrd.state"
  zonelistfile: "$WORK/zone.list"
  logfile: "$WORK/nsd.log"
  server-count: 1
  hide-version: yes
  verbosity: 0
  # Response rate limiting would throttle a benchmark's repeated names.
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: "clusterset.local."
  zonefile: "clusterset.local.zone"
zone:
  name: "250.127.in-addr.arpa."
  zonefile: "250.127.in-addr.arpa.zone"
EOF
start NSD_PID /usr/sbin/nsd -d -c "$WORK/nsd.conf"
for _ in $(seq 1 50); do
  dig +short -p "$NSD_DNS" @127.0.0.1 dns-version.clusterset.local TXT | grep -q 1.0.0 && break
  sleep 0.2
done

# Both must give the same answers before they are compared.
for q in "svc-1.bench.svc.clusterset.local A" "_http._tcp.svc-2.bench.svc.clusterset.local SRV" \
         "dns-version.clusterset.local TXT" "missing.bench.svc.clusterset.local A"; do
  # shellcheck disable=SC2086
  a=$(dig +noall +answer +comments -p "$ISTHMUS_DNS" @127.0.0.1 $q | grep -E 'status:|IN' | sed 's/id: [0-9]*//' | sort)
  # shellcheck disable=SC2086
  b=$(dig +noall +answer +comments -p "$NSD_DNS" @127.0.0.1 $q | grep -E 'status:|IN' | sed 's/id: [0-9]*//' | sort)
  if [ "$a" != "$b" ]; then
    echo "answers differ for $q:"; echo "isthmus: $a"; echo "nsd:     $b"; exit 1
  fi
done

run() { # name port pid -> "qps avg_ms stddev_ms lost rss_kb"
  local out
  out=$(dnsperf -s 127.0.0.1 -p "$2" -d "$WORK/queries.txt" -l "$DURATION" -q "$OUTSTANDING" -c 1 2>&1 || true)
  echo "$out" >"$WORK/dnsperf-$1.txt"
  local qps avg sd lost
  qps=$(echo "$out" | awk '/Queries per second/ {printf "%.0f", $4}')
  avg=$(echo "$out" | awk '/Average Latency/ {printf "%.3f", $4*1000}')
  sd=$(echo "$out" | awk '/Latency StdDev/ {printf "%.3f", $4*1000}')
  lost=$(echo "$out" | awk '/Queries lost/ {print $3}')
  [ -n "$qps" ] || { echo "dnsperf against $1 printed no statistics:" >&2; echo "$out" | tail -20 >&2; exit 1; }
  echo "$qps $avg $sd $lost $(rss_kb "$3")"
}

# Warm up both, then measure one after the other.
dnsperf -s 127.0.0.1 -p "$ISTHMUS_DNS" -d "$WORK/queries.txt" -l 2 -q "$OUTSTANDING" >/dev/null 2>&1 || true
dnsperf -s 127.0.0.1 -p "$NSD_DNS" -d "$WORK/queries.txt" -l 2 -q "$OUTSTANDING" >/dev/null 2>&1 || true
read -r I_QPS I_AVG I_SD I_LOST I_RSS <<<"$(run isthmus "$ISTHMUS_DNS" "$ISTHMUS_PID")"
read -r N_QPS N_AVG N_SD N_LOST N_RSS <<<"$(run nsd "$NSD_DNS" "$NSD_PID")"

echo
echo "DNS: $SERVICES services, ${DURATION}s per server, $OUTSTANDING in flight, UDP, same zone and query mix"
printf '%-8s %12s %10s %10s %10s %10s\n' server "queries/s" "avg ms" "stddev ms" lost "RSS MiB"
printf '%-8s %12s %10s %10s %10s %10.1f\n' isthmus "$I_QPS" "$I_AVG" "$I_SD" "$I_LOST" "$(awk "BEGIN {print $I_RSS/1024}")"
printf '%-8s %12s %10s %10s %10s %10.1f\n' nsd "$N_QPS" "$N_AVG" "$N_SD" "$N_LOST" "$(awk "BEGIN {print $N_RSS/1024}")"
python3 - "$I_QPS" "$N_QPS" "$I_AVG" "$N_AVG" <<'EOF'
import sys
iq, nq, ia, na = map(float, sys.argv[1:])
print(f"ratio isthmus/nsd: throughput {iq/nq:.2f}x, average latency {ia/na:.2f}x")
EOF
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^isthmus_dns_queries_total' | sort | head -20
