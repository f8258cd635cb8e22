# Shared by the benchmark scripts in this folder: `source "$(dirname "$0")/lib.sh"`.
# It sets ROOT and ISTHMUS (ISTHMUS_BIN or the release build) and defines:
#   bench_need CMD:PACKAGE...  installs each missing command's Debian package (as root)
#   bench_isthmus              fails unless the Isthmus binary exists
#   bench_workdir NAME         makes WORK (a fresh /tmp directory) and, on exit, kills
#                              every pid in PIDS, then removes WORK (KEEP=1 keeps it)
#   start VAR CMD...           runs CMD in the background, logs to $WORK/VAR.log,
#                              records its pid in VAR and in PIDS
#   free_port                  a loopback TCP port the kernel has just handed out
#   wait_port PORT             waits (up to 10 s) until a loopback PORT accepts
#   pids_of PID...             each PID and its children (NGINX masters fork workers)
#   nginx_conf NAME WORKER_CONNECTIONS HTTP_BLOCK [MAIN_DIRECTIVES]
#                              writes $WORK/NAME/nginx.conf (one worker, foreground,
#                              no access log, keep-alive without a request limit,
#                              HTTP_BLOCK inside http {}) and prints its path
#   gateway_toml NAME CLUSTER TD ADMIN_PORT [SVID_DIR BUNDLE [ZONE]]
#                              prints the tables every bench gateway starts with:
#                              [gateway] (region "bench", zone ZONE if given),
#                              [identity] from SVID_DIR/svid.{crt,key} and BUNDLE
#                              when given, [admin], [log] (warn, json), [runtime]
#                              (one thread); the caller appends the rest
#   web_service ORIGIN_PORT [export]
#                              prints the service every bench proxies, bench/web on
#                              port 80 with the origin as its endpoint (exported
#                              when a second argument is given)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
ISTHMUS=${ISTHMUS_BIN:-$ROOT/target/release/isthmus}
PIDS=()

# shellcheck source=../../packaging/lib.sh
source "$ROOT/packaging/lib.sh"
bench_need() { need_tools "$@"; }

bench_isthmus() {
  [ -x "$ISTHMUS" ] || {
    echo "build first: cargo build --release -p isthmus-gateway --bin isthmus (or set ISTHMUS_BIN)" >&2
    exit 1
  }
}

bench_cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.5
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}

bench_workdir() {
  WORK=$(mktemp -d "/tmp/isthmus-$1.XXXXXX")
  trap bench_cleanup EXIT
}

start() {
  local var=$1
  shift
  "$@" >"$WORK/$var.log" 2>&1 &
  PIDS+=($!)
  printf -v "$var" '%s' "$!"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
  for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 never opened" >&2
  return 1
}

pids_of() { for p in "$@"; do echo "$p"; pgrep -P "$p" || true; done; }

nginx_conf() {
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<NGX
worker_processes 1;
${4:-}
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections $2; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/$1; proxy_temp_path $WORK/$1; fastcgi_temp_path $WORK/$1;
  uwsgi_temp_path $WORK/$1; scgi_temp_path $WORK/$1;
  $3
}
NGX
  echo "$WORK/$1/nginx.conf"
}

gateway_toml() {
  local name=$1 cluster=$2 td=$3 admin=$4 svid=${5:-} bundle=${6:-} zone=${7:-}
  printf '[gateway]\nname = "%s"\ncluster = "%s"\ntrust_domain = "%s"\n' "$name" "$cluster" "$td"
  printf '[gateway.locality]\nregion = "bench"\n'
  [ -z "$zone" ] || printf 'zone = "%s"\n' "$zone"
  [ -z "$svid" ] || printf '[identity]\ncert = "%s"\nkey = "%s"\nbundle = "%s"\n' \
    "$svid/svid.crt" "$svid/svid.key" "$bundle"
  printf '[admin]\nlisten = "127.0.0.1:%s"\n' "$admin"
  printf '[log]\nlevel = "warn"\nformat = "json"\n[runtime]\nthreads = 1\n'
}

web_service() {
  printf '[[services]]\nnamespace = "bench"\nname = "web"\nports = [{ port = 80 }]\nendpoints = ["127.0.0.1:%s"]\n' "$1"
  [ -z "${2:-}" ] || printf 'export = true\n'
}
