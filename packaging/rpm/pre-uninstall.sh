# %preun: $1 is 0 on erase (not on upgrade): stop and disable the service,
# or `rpm -e` leaves it running.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now isthmus.service >/dev/null 2>&1 || :
fi
