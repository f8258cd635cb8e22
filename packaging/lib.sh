# Shared by the scripts in packaging/ and tests/bench/: `source .../packaging/lib.sh`.
#   need_tools CMD:PACKAGE...  installs the Debian package of each missing command
#                              (as root; CI runs on a fresh machine)

need_tools() {
    local need="" tool
    for tool in "$@"; do
        command -v "${tool%%:*}" >/dev/null || need="$need ${tool##*:}"
    done
    if [ -n "$need" ]; then
        echo "== installing:$need"
        # shellcheck disable=SC2086
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
    fi
}
