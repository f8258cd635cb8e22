# %post: $1 is 1 on install, 2 or more on upgrade. A fresh install does not
# enable or start the service (it has no identity yet); an upgrade of a running
# service hands its listening sockets to the new binary.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 2 ] && systemctl is-active --quiet isthmus.service; then
        systemctl kill --signal=SIGUSR2 --kill-whom=main isthmus.service || :
    fi
fi
