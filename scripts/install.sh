#!/usr/bin/env bash
# Install beemond as a system service on Raspberry Pi OS / Debian (run as root from the source tree).
#
#   scripts/install.sh [--enable-i2c] [--dry-run] [--destdir DIR]
#   scripts/install.sh --uninstall [--purge] [--dry-run] [--destdir DIR]
#
# Install (idempotent: running it again upgrades the package and leaves your config alone):
#   system user and group `beemond`, member of i2c gpio audio video dialout (created if missing);
#   /etc/beemond (beemond.toml from config/beemond.toml and an empty upload-password, only if absent);
#   /var/lib/beemond (the spool); a venv in /opt/beemond/venv with beemond installed from this tree;
#   /etc/systemd/system/beemond.service and /etc/udev/rules.d/99-beemond.rules, then
#   `udevadm control --reload`, `udevadm trigger` and `systemctl daemon-reload` + `enable` (each
#   skipped with a note where udev or systemd is not running). --enable-i2c runs
#   `raspi-config nonint do_i2c 0` where raspi-config exists.
# --uninstall stops and removes the service, unit, rules and /opt/beemond; the config, the spool and
#   the user stay unless --purge is given too.
# --dry-run prints every action (as "+ command") without doing it.
# --destdir DIR installs the files under DIR (packaging, tests): no user, apt, udev, systemd or raspi-config.
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
UNINSTALL=0
PURGE=0
ENABLE_I2C=0
DESTDIR=${DESTDIR:-}
GROUPS_WANTED=(i2c gpio audio video dialout)
APT_PACKAGES=(python3-venv libportaudio2 libsndfile1)

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --enable-i2c) ENABLE_I2C=1 ;;
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift ;;
        --destdir=*) DESTDIR=${1#--destdir=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
done
if [ "$PURGE" = 1 ] && [ "$UNINSTALL" = 0 ]; then
    echo "install.sh: --purge goes with --uninstall" >&2
    exit 64
fi

ETC=$DESTDIR/etc/beemond
STATE=$DESTDIR/var/lib/beemond
OPT=$DESTDIR/opt/beemond
UNIT=$DESTDIR/etc/systemd/system/beemond.service
RULES=$DESTDIR/etc/udev/rules.d/99-beemond.rules

# Every change to the system goes through run: printed, and done unless --dry-run.
run() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "$DRY_RUN" = 0 ]; then
        "$@"
    fi
}
note() { printf 'install.sh: %s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
live_system() { [ -z "$DESTDIR" ]; }
systemd_running() { live_system && [ -d /run/systemd/system ] && have systemctl; }
udev_running() { live_system && have udevadm && [ -d /run/udev ]; }

if live_system && [ "$(id -u)" != 0 ] && [ "$DRY_RUN" = 0 ]; then
    echo "install.sh: run as root (sudo $0 $*), or try --dry-run" >&2
    exit 77
fi

install_packages() {
    live_system || return 0
    if ! have apt-get; then
        note "no apt-get: make sure ${APT_PACKAGES[*]} are installed"
        return 0
    fi
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        run apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

create_user() {
    live_system || { note "destdir: skipping user and groups"; return 0; }
    local g
    for g in "${GROUPS_WANTED[@]}"; do
        getent group "$g" >/dev/null || run groupadd --system "$g"
    done
    getent group beemond >/dev/null || run groupadd --system beemond
    if id beemond >/dev/null 2>&1; then
        run usermod --append --groups "$(IFS=,; echo "${GROUPS_WANTED[*]}")" beemond
    else
        run useradd --system --gid beemond --groups "$(IFS=,; echo "${GROUPS_WANTED[*]}")" \
            --home-dir /var/lib/beemond --no-create-home --shell /usr/sbin/nologin \
            --comment "beemond hive recorder" beemond
    fi
}

# chown only on a live system (under --destdir the user does not exist)
owner() {
    if live_system; then
        run chown "$1" "$2"
    fi
}

install_files() {
    run install -d -m 0755 "$OPT"
    if [ ! -x "$OPT/venv/bin/python" ]; then
        run python3 -m venv "$OPT/venv"
    fi
    run "$OPT/venv/bin/pip" install --quiet --upgrade "$SRC"
    run install -m 0644 "$SRC/README.md" "$OPT/README.md"

    run install -d -m 0750 "$ETC"
    owner root:beemond "$ETC"
    if [ -e "$ETC/beemond.toml" ]; then
        note "keeping the existing $ETC/beemond.toml"
    else
        run install -m 0640 "$SRC/config/beemond.toml" "$ETC/beemond.toml"
        owner root:beemond "$ETC/beemond.toml"
    fi
    # LoadCredential= fails the start if its file is missing: an empty one means "no password".
    if [ ! -e "$ETC/upload-password" ]; then
        run install -m 0600 /dev/null "$ETC/upload-password"
    fi
    run install -d -m 0750 "$STATE"
    owner beemond:beemond "$STATE"

    run install -D -m 0644 "$SRC/systemd/beemond.service" "$UNIT"
    run install -D -m 0644 "$SRC/udev/99-beemond.rules" "$RULES"
}

reload_managers() {
    if udev_running; then
        run udevadm control --reload
        run udevadm trigger --action=change --subsystem-match=i2c-dev --subsystem-match=gpio \
            --subsystem-match=video4linux --subsystem-match=media --subsystem-match=dma_heap \
            --subsystem-match=sound --subsystem-match=tty
    else
        note "udev is not running here: skipping udevadm (the rules apply at the next boot)"
    fi
    if systemd_running; then
        run systemctl daemon-reload
        if [ "$UNINSTALL" = 0 ]; then
            run systemctl enable beemond.service
        fi
    else
        note "systemd is not running here: skipping systemctl"
    fi
}

enable_i2c() {
    [ "$ENABLE_I2C" = 1 ] || return 0
    if live_system && have raspi-config; then
        run raspi-config nonint do_i2c 0
    else
        note "--enable-i2c: no raspi-config here; enable I2C with dtparam=i2c_arm=on in config.txt"
    fi
}

uninstall() {
    if systemd_running && systemctl list-unit-files beemond.service >/dev/null 2>&1; then
        run systemctl disable --now beemond.service || true
    fi
    local f
    for f in "$UNIT" "$RULES"; do
        if [ -e "$f" ]; then run rm -f "$f"; fi
    done
    if [ -d "$OPT" ]; then run rm -rf "$OPT"; fi
    reload_managers
    if [ "$PURGE" = 1 ]; then
        if [ -d "$ETC" ]; then run rm -rf "$ETC"; fi
        if [ -d "$STATE" ]; then run rm -rf "$STATE"; fi
        if live_system && id beemond >/dev/null 2>&1; then run userdel beemond; fi
        if live_system && getent group beemond >/dev/null; then run groupdel beemond; fi
    else
        note "kept the config ($ETC), the spool ($STATE) and the user; --purge removes them"
    fi
}

if [ "$DRY_RUN" = 1 ]; then
    note "dry run: nothing is changed"
fi
if [ "$UNINSTALL" = 1 ]; then
    uninstall
else
    install_packages
    create_user
    install_files
    enable_i2c
    reload_managers
    note "installed. Edit $ETC/beemond.toml (recipients, upload), check it with"
    note "  $OPT/venv/bin/beemond check-config $ETC/beemond.toml"
    note "then: systemctl start beemond; journalctl -u beemond -f"
fi
