#!/usr/bin/env bash
# Federation convergence: GATEWAYS Isthmus gateways (20 by default), real
# `isthmus run` processes on loopback, that together export SERVICES services
# (5,000 by default, spread evenly: 250 per gateway, each a unique
# namespace/name), every gateway peering over `isthmus.federation.v1` (mTLS
# gRPC) with every other one. Measures
#
#   - time to converge: until every gateway's catalog (the
#     `isthmus_catalog_services` gauge on its admin /metrics) holds all
#     SERVICES services, counted from the moment the last process was started,
#     and separately from the moment the last gateway answered /readyz 200
#     (readiness waits for a first sync with every configured peer, or for the
#     grace period, so the two are close by design; negative means the catalogs
#     were complete before the last /readyz turned 200). One poller thread per
#     gateway asks every POLL seconds (0.1); each time is printed with the last
#     poll that still saw the gateway incomplete, so the true value lies between;
#   - the CPU-seconds all gateways spent until then (/proc/<pid>/stat), and how
#     many times each rebuilt its catalog (isthmus_catalog_updates_total);
#   - propagation of one change: one more exported service on gateway 0 (its
#     configuration rewritten, then SIGHUP), until all gateways hold SERVICES+1,
#     and the CPU all gateways spent on it;
#   - the CPU all gateways spend once converged with nothing changing (5 s:
#     every session's lease renewals, lease/3 apart on each side, and the
#     mTLS health probes of every peer gateway);
#   - memory: VmRSS of every gateway RSS_WAIT (2) s after convergence (min/median/max),
#     against the RSS of an idle gateway (same configuration shape: identity,
#     listeners, federation listener, no services, no peers; started and
#     measured alone before the others), and per catalog endpoint. A catalog
#     endpoint ("route") is a local endpoint address of a local service, or one
#     remote gateway serving a remote service, as /debug/catalog lists them
#     (non-headless services carry no endpoint addresses across clusters).
#     Marginal bytes per route = (RSS - idle RSS) / routes in the catalog; the
#     same for anonymous memory only (RssAnon), which leaves out the binary's
#     pages;
#   - a reconnect's resync (RESYNC=1, the default; needs root, nft and
#     setpriv, else skipped): the last gateway, gw-K, is cut off by nftables
#     (its federation port, and its own connections to the others' federation
#     ports, matched by its user: it runs as nobody) while every process stays
#     up, until it sees no live lease and at least PARTITION (5) seconds; one
#     more export is added on it meanwhile; then the cut is healed and the
#     bench waits until every gateway holds that export, and gw-K a live lease
#     with every peer again. It reports the time to resync, gw-K's federation
#     wire bytes from the heal on (nftables counters: TCP and TLS included,
#     handshakes of the new sessions too), how many snapshots and deltas all
#     gateways counted (isthmus_federation_syncs_total) and, in builds that
#     have it, isthmus_federation_sync_bytes_total by kind and direction.
#
# Topology: one shared trust domain (bench.example: one CA, one SVID per
# gateway, each gateway with its own copy of the bundle as on separate hosts),
# so no [[trust.federated]] sections. TOPOLOGY=full (default): every gateway
# dials every other (two sessions per pair, 380 for 20 gateways);
# TOPOLOGY=lower: each dials only the gateways with a lower index (one session
# per pair). Each service: one port (8080, "http") and ENDPOINTS (2) endpoints
# on 127.0.0.1 at a small TCP sink, so active health checks pass. Every gateway
# runs one worker thread and logs at warn; lease LEASE (1.5s, the default), grace GRACE (30s).
#
# The project's rule for benchmarks is ratios against a peer measured in the
# same run. No comparable multi-cluster federation control plane is installable
# here (Debian packages no Consul, Istio, Linkerd or Envoy server), so this
# prints absolute numbers and the idle-gateway baseline only. The machine is
# shared and noisy (2 CPUs: 20 gateways starting at once are CPU-bound): read
# the numbers as an order of magnitude.
#
# Scale: 100 gateways x 10,000 services fit this machine (2 CPUs, 24 GiB):
# file descriptors are raised to the hard limit (each gateway holds two
# sessions per peer), each gateway's federation listener admits as many
# connections from 127.0.0.1 as there are gateways (on separate hosts they
# would come from as many sources), gateways start STAGGER seconds apart, and
# polls and the convergence timeout grow with GATEWAYS (a poll is a /metrics
# render on a gateway: about 2,000 of them a second in all, whatever the size).
#
# Usage: tests/bench/federation-convergence.sh
#   GATEWAYS=20 SERVICES=5000 ENDPOINTS=2 TOPOLOGY=full LEASE=1.5s GRACE=30s
#   TIMEOUT=300 (GATEWAYS*6 above 50) POLL=0.1 (GATEWAYS/200 above 20)
#   PLUS_POLL=0.01 (GATEWAYS/2000 above 20; the polls of the +1 phase)
#   STAGGER=0 (0.02 above 20 gateways) RESYNC=1 PARTITION=5
#   HEALTH_INTERVAL (upstream.health_check.interval; the gateway's default 5s)
#   RSS_WAIT=2 (seconds from convergence to the RSS reading; jemalloc returns
#   the pages of replaced catalogs over some 10 s)
#   KEEP=1 (keeps the work directory and the logs)
#   PERF=DIR (perf record -g of gw-1, a receiving gateway, during convergence
#   and during the +1 phase: DIR/converge.data, DIR/plus-one.data)
#   e.g. GATEWAYS=100 SERVICES=10000 tests/bench/federation-convergence.sh
# Needs a release build (cargo build --release -p isthmus-gateway --bin isthmus)
# or ISTHMUS_BIN, and python3. Exits non-zero, naming the gateways that lag and
# what they see of their peers, when the catalogs do not converge within
# TIMEOUT seconds (or a gateway exits).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
GATEWAYS=${GATEWAYS:-20}
SERVICES=${SERVICES:-5000}
ENDPOINTS=${ENDPOINTS:-2}
TOPOLOGY=${TOPOLOGY:-full}
LEASE=${LEASE:-1.5s}
GRACE=${GRACE:-30s}
# Polls and timeouts grow with the fleet: every poll is a /metrics render on a
# gateway, and 100 gateways polled every 10 ms would load the machine more
# than the federation does (about 2,000 polls a second in all, as 20 gateways
# at the old fixed intervals).
POLL=${POLL:-$(python3 -c "print(max(0.1, $GATEWAYS / 200))")}
PLUS_POLL=${PLUS_POLL:-$(python3 -c "print(max(0.01, $GATEWAYS / 2000))")}
TIMEOUT=${TIMEOUT:-$(( GATEWAYS > 50 ? GATEWAYS * 6 : 300 ))}
STAGGER=${STAGGER:-$(python3 -c "print(0 if $GATEWAYS <= 20 else 0.02)")}
RESYNC=${RESYNC:-1}
PARTITION=${PARTITION:-5}
TD=bench.example

bench_need python3:python3
bench_isthmus
[ "$GATEWAYS" -ge 2 ] || { echo "GATEWAYS must be at least 2" >&2; exit 1; }
[ "$SERVICES" -ge "$GATEWAYS" ] || { echo "SERVICES must be at least GATEWAYS" >&2; exit 1; }
[ "$ENDPOINTS" -ge 1 ] && [ "$ENDPOINTS" -le 2 ] || { echo "ENDPOINTS must be 1 or 2" >&2; exit 1; }
case "$TOPOLOGY" in full|lower) ;; *) echo "TOPOLOGY must be full or lower" >&2; exit 1 ;; esac

bench_workdir fedbench
# Every gateway holds two sessions per peer (one dialled, one accepted), and
# the poller a connection per gateway.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $(( GATEWAYS * 8 + 256 )) ] || {
  echo "ulimit -n $(ulimit -n) is too low for $GATEWAYS gateways" >&2; exit 1; }

# The resync phase cuts the last gateway off with nftables while every process
# stays up. nftables matches the gateway's own outgoing connections by its
# user, so it runs as nobody (its files readable to it); the table is removed
# on exit.
K=$(( GATEWAYS - 1 ))
NFT_TABLE=isthmus_fedbench_$$
if [ "$RESYNC" = 1 ] && { [ "$(id -u)" != 0 ] || ! command -v nft >/dev/null || ! command -v setpriv >/dev/null; }; then
  echo "the resync phase needs root, nft and setpriv: skipped (RESYNC=0)" >&2
  RESYNC=0
fi
if [ "$RESYNC" = 1 ]; then
  trap 'nft delete table inet "$NFT_TABLE" 2>/dev/null || true; bench_cleanup' EXIT
  chmod 755 "$WORK"
  RUN_K=(setpriv --reuid=nobody --regid=nogroup --clear-groups --)
else
  RUN_K=()
fi

# --- helpers (python: one process polls every gateway, so polling stays cheap) ---
cat > "$WORK/bench.py" <<'PY'
import json, os, statistics, sys, time, urllib.request

def get(port, path, timeout=2.0):
    """(status, body) of GET http://127.0.0.1:port/path; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except Exception:
        return 0, b""

class Admin:
    """A keep-alive connection to one gateway's admin port: with 100 gateways
    polled many times a second, a new connection per poll would cost the
    gateways and the poller more than the answers."""
    def __init__(self, port):
        self.port, self.conn = port, None

    def get(self, path, timeout=2.0):
        import http.client
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                return r.status, r.read()
            except Exception:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return 0, b""

def cpu_ticks(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except OSError:
        return 0

def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

def rss_kib(pid):
    return status_kib(pid, "VmRSS")

def ports_pids(args):
    return [(int(a.split(":")[0]), int(a.split(":")[1])) for a in args]

def lagging(gws, counts, target):
    """Prints what each lagging gateway sees of its peers."""
    for i, (port, pid) in enumerate(gws):
        if counts[i] is not None and counts[i] >= target:
            continue
        running = alive(pid)
        status, body = get(port, "/debug/peers", timeout=5)
        detail = "no /debug/peers answer"
        if status == 200:
            doc = json.loads(body)
            peers = doc.get("peers", [])
            synced = sum(1 for p in peers if p.get("synced"))
            states = {}
            for p in peers:
                states[p.get("state")] = states.get(p.get("state"), 0) + 1
            nacks = sum(p.get("nacks_sent", 0) + p.get("nacks_received", 0) for p in peers)
            detail = (f"{len(peers)} peers known, {synced} synced, states {states}, "
                      f"{len(doc.get('never_connected', []))} never connected, {nacks} NACKs")
        print(f"  gw-{i}: catalog {counts[i]} of {target} services, "
              f"{'running' if running else 'EXITED'}; {detail}", file=sys.stderr)

def metric(body, series):
    """The value of one unlabelled series (a byte search: /metrics of a
    gateway with 99 peers is large, and it is polled often)."""
    at = body.find(b"\n" + series.encode() + b" ")
    if at < 0:
        return None
    line = body[at + 1:body.find(b"\n", at + 1)]
    return int(float(line.split(b" ")[1]))

def series(body, name):
    """Every sample of metric `name`: [(labels dict, value)]."""
    import re
    out = []
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
            out.append((labels, float(value)))
    return out

def counters(out, gws):
    """Sums over every gateway of the peering counters the resync phase
    compares: syncs and (when this build has it) sync bytes by kind and
    direction, refusals by reason, and each gateway's live peers."""
    res = {"syncs": {}, "sync_bytes": None, "refused": {}, "live": []}
    for port, _pid in gws:
        status, body = get(port, "/metrics", timeout=30)
        if status != 200:
            res["live"].append(None)
            continue
        for key, name in [("syncs", "isthmus_federation_syncs_total"),
                          ("sync_bytes", "isthmus_federation_sync_bytes_total")]:
            for labels, v in series(body, name):
                sums = res[key] = res[key] or {}
                k = f"{labels.get('kind')}/{labels.get('direction')}"
                sums[k] = sums.get(k, 0) + v
        for labels, v in series(body, "isthmus_federation_refused_total"):
            res["refused"][labels.get("reason")] = res["refused"].get(labels.get("reason"), 0) + v
        live = [v for labels, v in series(body, "isthmus_federation_peers") if labels.get("state") == "live"]
        res["live"].append(int(live[0]) if live else 0)
    json.dump(res, open(out, "w"))

def converge(start, target, timeout, track_ready, out, gws, pause):
    """Polls until every gateway's catalog holds `target` services, one thread
    per gateway so that a busy gateway does not delay the others' polls. For
    each gateway it records when it was first seen complete (`done`) and when
    it was last seen incomplete (`before`): it converged in between. Times
    count from `start`: "file:PATH", the time on the first line written there
    (this waits for the file; its second line lists the gateways as
    admin-port:pid), "hup:PID", sending SIGHUP to PID now, or "run:COMMAND",
    running the shell COMMAND now (the resync phase heals its partition)."""
    import threading
    kind, _, arg = start.partition(":")
    if kind == "file":
        while not os.path.exists(arg):
            time.sleep(0.001)
        first, second = open(arg).read().splitlines()[:2]
        t0, gws = float(first), ports_pids(second.split())
        cpu0 = 0
    else:
        import signal, subprocess
        cpu0 = sum(cpu_ticks(pid) for _, pid in gws)
        t0 = time.time()
        if kind == "hup":
            os.kill(int(arg), signal.SIGHUP)
        else:
            subprocess.run(arg, shell=True, check=True)
    n = len(gws)
    ready, ready_before = [None] * n, [0.0] * n
    done, before = [None] * n, [0.0] * n
    counts, updates = [None] * n, [None] * n
    polls = [[] for _ in range(n)]
    deadline = t0 + timeout
    stop = threading.Event()

    def poll(i, port):
        admin = Admin(port)
        while not stop.is_set():
            p0 = time.time()
            if track_ready and ready[i] is None:
                status = admin.get("/readyz")[0]
                now = time.time() - t0
                if status == 200:
                    ready[i] = now
                elif status:
                    ready_before[i] = now
            if done[i] is None:
                status, body = admin.get("/metrics")
                now = time.time() - t0
                if status == 200:
                    counts[i] = metric(body, "isthmus_catalog_services")
                    updates[i] = metric(body, "isthmus_catalog_updates_total")
                    if counts[i] is not None and counts[i] >= target:
                        done[i] = now
                    elif counts[i] is not None:
                        before[i] = now
            polls[i].append(time.time() - p0)
            if done[i] is not None and (not track_ready or ready[i] is not None):
                return
            stop.wait(pause)

    threads = [threading.Thread(target=poll, args=(i, port), daemon=True) for i, (port, _) in enumerate(gws)]
    for t in threads:
        t.start()
    cpu = None
    while True:
        if cpu is None and all(d is not None for d in done):
            cpu = sum(cpu_ticks(pid) for _, pid in gws) - cpu0
        if not any(t.is_alive() for t in threads):
            break
        dead = [i for i, (_, pid) in enumerate(gws) if not alive(pid)]
        if time.time() > deadline or dead:
            stop.set()
            if dead:
                print(f"\ngateways exited: {', '.join(f'gw-{i}' for i in dead)}", file=sys.stderr)
            print(f"\nNOT CONVERGED after {time.time() - t0:.1f} s (timeout {timeout:g} s): "
                  f"{sum(d is not None for d in done)} of {n} gateways hold {target} services", file=sys.stderr)
            lagging(gws, counts, target)
            json.dump({"converged": False}, open(out, "w"))
            sys.exit(1)
        time.sleep(0.002)
    if cpu is None:
        cpu = sum(cpu_ticks(pid) for _, pid in gws) - cpu0
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"converged": True, "ready": ready, "ready_before": ready_before, "done": done,
               "before": before, "counts": counts, "updates": updates, "cpu_ticks": cpu,
               "poller_cpu": ru.ru_utime + ru.ru_stime,
               "rounds": [x for p in polls for x in p]}, open(out, "w"))

def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def wait_ready(port, pid, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if get(port, "/readyz")[0] == 200:
            return
        if not alive(pid):
            sys.exit(f"the gateway with admin port {port} exited")
        time.sleep(0.05)
    sys.exit(f"the gateway with admin port {port} never became ready")

def sink(ports):
    """Accepts and closes TCP connections: the services' endpoints."""
    import selectors, socket
    sel = selectors.DefaultSelector()
    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(p)))
        s.listen(1024)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                conn, _ = key.fileobj.accept()
                conn.close()
            except OSError:
                pass

def free_ports(n):
    import socket
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))

def measure(out, gws):
    """RSS of every gateway (before anything else asks it for a large document)."""
    json.dump({"rss_kib": [rss_kib(pid) for _, pid in gws],
               "anon_kib": [status_kib(pid, "RssAnon") for _, pid in gws],
               "file_kib": [status_kib(pid, "RssFile") for _, pid in gws],
               "threads": [int(next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("Threads:"))) for _, pid in gws]},
              open(out, "w"))

def idle_cpu(out, seconds, gws):
    """CPU all gateways spend with nothing changing: lease renewals of every
    session (each side renews every lease/3), health checks, timers."""
    c0, t0 = sum(cpu_ticks(pid) for _, pid in gws), time.time()
    time.sleep(seconds)
    json.dump({"ticks": sum(cpu_ticks(pid) for _, pid in gws) - c0, "seconds": time.time() - t0},
              open(out, "w"))

def endpoints(out, gws):
    """Catalog routes from /debug/catalog: of every gateway, or of ten
    evenly spread ones above 20 gateways (a loaded gateway takes seconds
    to render 10,000 services)."""
    res = []
    step = max(1, len(gws) // 10) if len(gws) > 20 else 1
    for i in range(0, len(gws), step):
        port, _pid = gws[i]
        status, body = get(port, "/debug/catalog", timeout=30)
        doc = json.loads(body)
        svcs = doc["services"]
        local = sum(len(s.get("local_endpoints") or []) for s in svcs)
        remote = sum(len(s.get("remote") or []) for s in svcs)
        res.append({"gw": i, "services": len(svcs), "local": local, "remote": remote,
                    "conflicts": len(doc.get("conflicts") or []), "json_bytes": len(body)})
    json.dump(res, open(out, "w"))

def resync_summary(work, k, hz):
    """The resync phase's lines, when it ran."""
    if not os.path.exists(f"{work}/resync-after.json"):
        print("resync phase                     skipped (RESYNC=0, or it needs root, nft and setpriv)")
        return
    r = json.load(open(f"{work}/resync.json"))
    b, a = json.load(open(f"{work}/resync-before.json")), json.load(open(f"{work}/resync-after.json"))
    wire = [x["rule"]["expr"] for x in json.load(open(f"{work}/resync-wire.json"))["nftables"] if "rule" in x]
    wire_bytes = sum(e["counter"]["bytes"] for expr in wire for e in expr if "counter" in e)
    wire_packets = sum(e["counter"]["packets"] for expr in wire for e in expr if "counter" in e)
    cut = float(open(f"{work}/resync-cut-seconds").read())
    d = lambda key: {k: int(v - (b[key] or {}).get(k, 0)) for k, v in a[key].items() if v - (b[key] or {}).get(k, 0)}
    print(f"resync: gw-{k} cut off (nftables drop of its federation traffic) for {cut:.1f} s in all, one export added meanwhile, healed")
    print(f"  healed -> all gws hold it      {max(r['done']) * 1000:8.0f} ms  (median {statistics.median(r['done']) * 1000:.0f} ms;"
          f" CPU {r['cpu_ticks'] / hz * 1000:.0f} CPU-ms, all gws)")
    print(f"  gw-{k}'s federation wire bytes {wire_bytes:8d} B   ({wire_packets} packets, TCP/TLS included, from the heal until"
          f" gw-{k} holds a live lease with every peer, +2 s)")
    print(f"  syncs in the resync, all gws   {json.dumps(d('syncs'), sort_keys=True)}   (kind/direction: count)")
    if a["sync_bytes"] is not None:
        print(f"  sync bytes in the resync       {json.dumps(d('sync_bytes'), sort_keys=True)}"
              "   (isthmus_federation_sync_bytes_total, kind/direction)")
    else:
        print("  sync bytes                     (isthmus_federation_sync_bytes_total not in this build: wire bytes only)")

def summary(work, gateways, services, endpoints_per, topology, sessions, hz, k):
    c = json.load(open(f"{work}/converge.json"))
    c1 = json.load(open(f"{work}/plus-one.json"))
    m = json.load(open(f"{work}/rss.json"))
    e = json.load(open(f"{work}/endpoints.json"))
    b = json.load(open(f"{work}/baseline.json"))
    base, base_anon, base_file = b["rss_kib"][0], b["anon_kib"][0], b["file_kib"][0]
    rss = m["rss_kib"]
    med = statistics.median
    t_started_conv = max(c["done"])
    t_ready_all = max(c["ready"])
    eps = [x["local"] + x["remote"] for x in e]
    # The gateways whose routes were counted (every one, or a sample).
    rss_all, rss = rss, [rss[x["gw"]] for x in e]
    anon_kib = [m["anon_kib"][x["gw"]] for x in e]
    per_gw = [r * 1024 / n for r, n in zip(rss, eps)]
    marginal = [(r - base) * 1024 / n for r, n in zip(rss, eps)]
    print()
    print("=== Isthmus federation convergence (loopback) ===")
    print(f"gateways                         {gateways} ({topology} mesh, {sessions} peering sessions, one trust domain)")
    print(f"services                         {services} exported in total ({services // gateways}-{-(-services // gateways)} per gateway), "
          f"{endpoints_per} endpoint(s) each")
    print(f"catalog routes per gateway       {min(eps)}-{max(eps)} (local endpoints + remote gateways;"
          f" {'every gateway' if len(e) == gateways else f'{len(e)} gateways counted'})")
    print(f"catalog conflicts                {sum(x['conflicts'] for x in e)}")
    print()
    between = lambda xs, bs: f"{max(bs):.2f}-{max(xs):.2f} s"
    rnd = lambda c: (f"{med(c['rounds']) * 1000:.0f} ms median, {max(c['rounds']) * 1000:.0f} ms max, "
                     f"{len(c['rounds'])} polls; the poller used {c['poller_cpu']:.2f} CPU-s")
    print(f"converged, from last start       {t_started_conv:8.2f} s   (last gateway converged in {between(c['done'], c['before'])};"
          f" first {min(c['done']):.2f} s, median {med(c['done']):.2f} s)")
    print(f"all /readyz 200, from last start {t_ready_all:8.2f} s   (in {between(c['ready'], c['ready_before'])}; first {min(c['ready']):.2f} s)")
    print(f"converged, from all ready        {t_started_conv - t_ready_all:8.2f} s")
    print(f"CPU until converged, all gws     {c['cpu_ticks'] / hz:8.2f} CPU-s ({c['cpu_ticks'] / hz / gateways:.2f} per gateway)")
    print(f"catalog rebuilds per gateway     {med(c['updates']):8.0f}     (median, until converged; min {min(c['updates'])}, max {max(c['updates'])})")
    print(f"  (one gateway's poll took {rnd(c)})")
    print(f"+1 service on gw-0 -> all gws    {max(c1['done']) * 1000:8.0f} ms  (last gateway in {max(c1['before']) * 1000:.0f}-{max(c1['done']) * 1000:.0f} ms;"
          f" first {min(c1['done']) * 1000:.0f} ms, median {med(c1['done']) * 1000:.0f} ms)")
    print(f"CPU for the +1 change, all gws   {c1['cpu_ticks'] / hz * 1000:8.0f} CPU-ms (SIGHUP until all converged)")
    print(f"  (from SIGHUP with the new configuration to /metrics; one gateway's poll took {rnd(c1)})")
    print()
    ic = json.load(open(f"{work}/idle-cpu.json"))
    print(f"CPU converged, nothing changing  {ic['ticks'] / hz / ic['seconds']:8.2f} CPUs in all"
          f"   ({ic['ticks'] / hz / ic['seconds'] / sessions * 1e6:.0f} CPU-us a second per session: lease renewals, health probes of peers)")
    print()
    print(f"RSS idle gateway (empty catalog) {base / 1024:8.1f} MiB")
    print(f"RSS converged  min/median/max    {min(rss_all) / 1024:.1f} / {med(rss_all) / 1024:.1f} / {max(rss_all) / 1024:.1f} MiB"
          f"   (total {sum(rss_all) / 1024:.1f} MiB; threads {med(m['threads']):.0f} per gateway)")
    print(f"RSS over idle  median            {(med(rss_all) - base) / 1024:8.1f} MiB"
          f"   (anonymous {(med(m['anon_kib']) - base_anon) / 1024:.1f} MiB, file-backed {(med(m['file_kib']) - base_file) / 1024:.1f} MiB;"
          f" idle: {base_anon / 1024:.1f} + {base_file / 1024:.1f} MiB)")
    print(f"RSS per catalog route            {sum(rss) * 1024 / sum(eps):8.0f} B    (total RSS / sum of routes, counted gws)")
    print(f"RSS per route, per gw min/med/max {min(per_gw):.0f} / {med(per_gw):.0f} / {max(per_gw):.0f} B")
    print(f"marginal B per route min/med/max {min(marginal):.0f} / {med(marginal):.0f} / {max(marginal):.0f} B   ((RSS - idle RSS) / routes)")
    anon = [(a - base_anon) * 1024 / n for a, n in zip(anon_kib, eps)]
    print(f"  anonymous memory only          {min(anon):.0f} / {med(anon):.0f} / {max(anon):.0f} B   ((RssAnon - idle RssAnon) / routes)")
    print(f"/debug/catalog size per gateway  {med([x['json_bytes'] for x in e]) / 1024:8.0f} KiB")
    refused = json.load(open(f"{work}/refused.json"))["refused"]
    print(f"peering refusals, all gws        {json.dumps({k: int(v) for k, v in refused.items() if v}, sort_keys=True) if any(refused.values()) else 'none'}")
    print()
    resync_summary(work, k, hz)
    print("No peer federation product runs here: absolute numbers and the idle-gateway baseline only.")

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "free-ports":
    free_ports(int(args[0]))
elif cmd == "sink":
    sink(args)
elif cmd == "wait-ready":
    wait_ready(int(args[0]), int(args[1]), float(args[2]))
elif cmd == "converge":
    start, target, timeout, track, out = args[0], int(args[1]), float(args[2]), args[3] == "1", args[4]
    converge(start, target, timeout, track, out, ports_pids(args[6:]), float(args[5]))
elif cmd == "measure":
    measure(args[0], ports_pids(args[1:]))
elif cmd == "idle-cpu":
    idle_cpu(args[0], float(args[1]), ports_pids(args[2:]))
elif cmd == "counters":
    counters(args[0], ports_pids(args[1:]))
elif cmd == "endpoints":
    endpoints(args[0], ports_pids(args[1:]))
elif cmd == "summary":
    summary(args[0], int(args[1]), int(args[2]), int(args[3]), args[4], int(args[5]), int(args[6]), int(args[7]))
PY
py() { python3 "$WORK/bench.py" "$@"; }

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs" >&2

# --- ports: 4 per gateway (admin, outbound, east-west, federation), the idle
# gateway's 4, the sink's 2 ---
read -r -a PORTS <<<"$(py free-ports $(( (GATEWAYS + 1) * 4 + 2 )))"
SINK1=${PORTS[-2]}; SINK2=${PORTS[-1]}
admin() { echo "${PORTS[$(( $1 * 4 ))]}"; }
outbound() { echo "${PORTS[$(( $1 * 4 + 1 ))]}"; }
east_west() { echo "${PORTS[$(( $1 * 4 + 2 ))]}"; }
fed() { echo "${PORTS[$(( $1 * 4 + 3 ))]}"; }
IDLE=$GATEWAYS # index of the idle gateway's ports

start SINK_PID python3 "$WORK/bench.py" sink "$SINK1" "$SINK2"
if [ "$ENDPOINTS" -eq 2 ]; then EPS="\"127.0.0.1:$SINK1\", \"127.0.0.1:$SINK2\""; else EPS="\"127.0.0.1:$SINK1\""; fi

# --- PKI: one trust domain, one SVID per gateway ---
"$ISTHMUS" ca init --trust-domain "$TD" --out "$WORK/ca" >/dev/null
# Each gateway gets its own copy of the bundle, as on separate hosts (every
# gateway watches the directories of its certificate files).
for i in $(seq 0 "$GATEWAYS"); do
  "$ISTHMUS" ca issue --ca "$WORK/ca" --spiffe-id "spiffe://$TD/isthmus/gateway/gw-$i" --out "$WORK/tls-$i" >/dev/null
  cp "$WORK/ca/bundle.pem" "$WORK/tls-$i/bundle.pem"
done
[ "$RESYNC" = 1 ] && chown -R nobody "$WORK/tls-$K"

# Services of gateway $1: its share of SERVICES, plus $2 extra ones.
share() { local i=$1; echo $(( SERVICES / GATEWAYS + (i < SERVICES % GATEWAYS ? 1 : 0) )); }
services_toml() {
  local i=$1 n j
  n=$(( $(share "$i") + $2 ))
  for (( j = 0; j < n; j++ )); do
    printf '[[services]]\nnamespace = "bench-%d"\nname = "svc-%d"\nports = [{ port = 8080, name = "http" }]\nendpoints = [%s]\nexport = true\n' \
      "$i" "$j" "$EPS"
  done
}
# Configuration of gateway $1 with $2 extra services; $3=none: no peers and no services.
config() {
  local i=$1 extra=${2:-0} mode=${3:-}
  gateway_toml "gw-$i" "c$i" "$TD" "$(admin "$i")" "$WORK/tls-$i" "$WORK/tls-$i/bundle.pem" "z$(( i % 3 ))"
  cat <<TOML
[listeners]
outbound = "127.0.0.1:$(outbound "$i")"
east_west = "127.0.0.1:$(east_west "$i")"
[federation]
listen = "127.0.0.1:$(fed "$i")"
lease = "$LEASE"
grace = "$GRACE"
[federation.limits]
# Every peer connects from 127.0.0.1 here: on separate hosts these would be
# GATEWAYS sources, each far under the default cap of 16.
max_connections_per_source = $(( GATEWAYS * 2 + 16 ))
TOML
  # Each gateway probes every peer gateway with an mTLS handshake per interval.
  [ -z "${HEALTH_INTERVAL:-}" ] || printf '[upstream.health_check]\ninterval = "%s"\n' "$HEALTH_INTERVAL"
  [ "$mode" = none ] && return 0
  local j
  for (( j = 0; j < GATEWAYS; j++ )); do
    [ "$j" -eq "$i" ] && continue
    [ "$TOPOLOGY" = lower ] && [ "$j" -gt "$i" ] && continue
    printf '[[federation.peers]]\naddress = "127.0.0.1:%s"\nspiffe_id = "spiffe://%s/isthmus/gateway/gw-%d"\nclusters = ["c%d"]\n' "$(fed "$j")" "$TD" "$j" "$j"
  done
  # In the lower topology the higher-numbered gateways dial this one: accept
  # them as gateways of the trust domain, each bound to its own cluster name.
  if [ "$TOPOLOGY" = lower ] && [ "$i" -lt $(( GATEWAYS - 1 )) ]; then
    printf '[[federation.accept]]\ntrust_domain = "%s"\nclusters = [' "$TD"
    for (( j = i + 1; j < GATEWAYS; j++ )); do
      printf '"c%d"%s' "$j" "$([ "$j" -lt $(( GATEWAYS - 1 )) ] && echo ', ')"
    done
    printf ']\n'
  fi
  services_toml "$i" "$extra"
}
write_config() { # path, contents on stdin: write aside, then rename
  cat > "$1.tmp" && mv "$1.tmp" "$1"
}

# --- baseline: an idle gateway, alone ---
config "$IDLE" 0 none | write_config "$WORK/idle.toml"
start IDLE_PID "$ISTHMUS" run --config "$WORK/idle.toml"
py wait-ready "$(admin "$IDLE")" "$IDLE_PID" 30 || { cat "$WORK/IDLE_PID.log" >&2; exit 1; }
sleep 2
py measure "$WORK/baseline.json" "$(admin "$IDLE"):$IDLE_PID"
kill "$IDLE_PID"
wait "$IDLE_PID" 2>/dev/null || true

# --- the federation ---
GW_PIDS=()
GWS=()
for (( i = 0; i < GATEWAYS; i++ )); do config "$i" | write_config "$WORK/gw-$i.toml"; done
[ "$TOPOLOGY" = full ] && SESSIONS=$(( GATEWAYS * (GATEWAYS - 1) )) || SESSIONS=$(( GATEWAYS * (GATEWAYS - 1) / 2 ))
echo "starting $GATEWAYS gateways, $SERVICES services, $TOPOLOGY mesh ($SESSIONS sessions)..." >&2
# The poller starts first (python takes a while to start) and counts from the
# time in the t0 file, written once every gateway has been started.
py converge "file:$WORK/t0" "$SERVICES" "$TIMEOUT" 1 "$WORK/converge.json" "$POLL" &
POLLER=$!
PIDS+=("$POLLER")
sleep 0.5
for (( i = 0; i < GATEWAYS; i++ )); do
  if [ "$i" -eq "$K" ]; then
    start "GW_$i" "${RUN_K[@]}" "$ISTHMUS" run --config "$WORK/gw-$i.toml"
  else
    start "GW_$i" "$ISTHMUS" run --config "$WORK/gw-$i.toml"
  fi
  [ "$STAGGER" = 0 ] || sleep "$STAGGER"
  pid_var="GW_$i"
  GW_PIDS+=("${!pid_var}")
  GWS+=("$(admin "$i"):${!pid_var}")
done
printf '%s\n%s\n' "$(date +%s.%N)" "${GWS[*]}" > "$WORK/t0.tmp" && mv "$WORK/t0.tmp" "$WORK/t0"
# perf_start NAME / perf_stop: a profile of gw-1 while a phase runs.
perf_start() {
  [ -n "${PERF:-}" ] || return 0
  mkdir -p "$PERF"
  perf record -F 499 -g -o "$PERF/$1.data" -p "${GW_PIDS[1]}" 2>"$PERF/$1.log" &
  PERF_PID=$!
  PIDS+=("$PERF_PID")
}
perf_stop() {
  [ -n "${PERF:-}" ] || return 0
  kill -INT "$PERF_PID"
  wait "$PERF_PID" 2>/dev/null || true
}
perf_start converge
wait "$POLLER" || {
  for (( i = 0; i < GATEWAYS; i++ )); do
    # Leaves out the warning every session logs in a shared trust domain.
    lines=$(grep -v 'peer sent a bundle for a trust domain other than its own' "$WORK/GW_$i.log" | tail -3 || true)
    if [ -n "$lines" ]; then echo "--- gw-$i log (last lines) ---" >&2; echo "$lines" >&2; fi
  done
  exit 1
}
perf_stop
echo "converged; measuring RSS after ${RSS_WAIT:-2} s" >&2
sleep "${RSS_WAIT:-2}"
py measure "$WORK/rss.json" "${GWS[@]}"
py idle-cpu "$WORK/idle-cpu.json" 5 "${GWS[@]}"
# Routes per catalog, after the RSS (this asks each gateway for a large document).
py endpoints "$WORK/endpoints.json" "${GWS[@]}"
py counters "$WORK/refused.json" "${GWS[@]}"

# --- one more service on gateway 0 ---
config 0 1 | write_config "$WORK/gw-0.toml"
perf_start plus-one
sleep "$([ -n "${PERF:-}" ] && echo 0.5 || echo 0)"
py converge "hup:${GW_PIDS[0]}" $(( SERVICES + 1 )) 60 0 "$WORK/plus-one.json" "$PLUS_POLL" "${GWS[@]}"
perf_stop

# --- a reconnect's resync: gateway K cut off, one export changed, healed ---
if [ "$RESYNC" = 1 ]; then
  FED_PORTS=$(for (( i = 0; i < GATEWAYS; i++ )); do [ "$i" -eq "$K" ] || printf '%s, ' "$(fed "$i")"; done)
  # Counters first (they stay through the heal: the resync's wire bytes),
  # the drops after them in their own chain, removed to heal.
  nft -f - <<NFT
table inet $NFT_TABLE {
  chain count {
    type filter hook output priority -10; policy accept;
    tcp dport $(fed "$K") counter
    tcp sport $(fed "$K") counter
    meta skuid nobody tcp dport { ${FED_PORTS%, } } counter
  }
  chain cut {
    type filter hook output priority 0; policy accept;
    tcp dport $(fed "$K") drop
    tcp sport $(fed "$K") drop
    meta skuid nobody tcp dport { ${FED_PORTS%, } } drop
  }
}
NFT
  echo "gw-$K cut off (nftables); waiting for its leases to lapse" >&2
  # Until gw-K sees no live peer, and at least PARTITION seconds.
  CUT_AT=$(date +%s.%N)
  while :; do
    py counters "$WORK/cut.json" "$(admin "$K"):${GW_PIDS[$K]}"
    python3 -c "import json,sys; sys.exit(json.load(open('$WORK/cut.json'))['live'][0] != 0)" && break
    python3 -c "import time; exit(time.time() - $CUT_AT > 120)" || { echo "gw-$K still sees live peers after 120 s" >&2; exit 1; }
    sleep 0.5
  done
  sleep "$(python3 -c "import time; print(max(0, $PARTITION - (time.time() - $CUT_AT)))")"
  # One more export on gw-K while it is cut off.
  config "$K" 1 | write_config "$WORK/gw-$K.toml"
  kill -HUP "${GW_PIDS[$K]}"
  sleep 1
  py counters "$WORK/resync-before.json" "${GWS[@]}"
  nft reset counters table inet "$NFT_TABLE" >/dev/null
  py converge "run:nft delete chain inet $NFT_TABLE cut" $(( SERVICES + 2 )) 120 0 "$WORK/resync.json" "$POLL" "${GWS[@]}"
  # Until gw-K holds a live lease with every peer again, then the counters.
  for _ in $(seq 600); do
    py counters "$WORK/healed.json" "$(admin "$K"):${GW_PIDS[$K]}"
    python3 -c "import json,sys; sys.exit(json.load(open('$WORK/healed.json'))['live'][0] < $GATEWAYS - 1)" && break
    sleep 0.2
  done
  sleep 2
  nft -j list chain inet "$NFT_TABLE" count > "$WORK/resync-wire.json"
  py counters "$WORK/resync-after.json" "${GWS[@]}"
  echo "$(python3 -c "import time; print(time.time() - $CUT_AT)")" > "$WORK/resync-cut-seconds"
fi

py summary "$WORK" "$GATEWAYS" "$SERVICES" "$ENDPOINTS" "$TOPOLOGY" "$SESSIONS" "$(getconf CLK_TCK)" "$K"
for (( i = 0; i < GATEWAYS; i++ )); do
  kill -0 "${GW_PIDS[$i]}" 2>/dev/null || { echo "gw-$i exited during the run" >&2; exit 1; }
done
