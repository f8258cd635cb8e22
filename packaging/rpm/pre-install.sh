# %pre: the isthmus user, before files it owns are unpacked.
if command -v systemd-sysusers >/dev/null 2>&1; then
    echo 'u isthmus - "Isthmus mesh gateway" /var/lib/isthmus /usr/sbin/nologin' | systemd-sysusers - || :
elif ! getent passwd isthmus >/dev/null; then
    useradd --system --home-dir /var/lib/isthmus --no-create-home --shell /usr/sbin/nologin isthmus || :
fi
