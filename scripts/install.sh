#!/usr/bin/env bash
# Install beemond as a system service on Raspberry Pi OS / Debian (run as root from the source tree).
#
#   scripts/install.sh [--camera] [--enable-i2c] [--dry-run] [--destdir DIR]
#   scripts/install.sh --uninstall [--purge] [--dry-run] [--destdir DIR]
#
# Install (idempotent: running it again upgrades the package and leaves your config alone):
#   Python libraries from apt wherever Debian / Raspberry Pi OS ship them (numpy, jinja2, cryptography,
#   soundfile, pyserial, gpiozero, lgpio where it exists, ...; with --camera, or when the config has a
#   camera sensor, python3-picamera2 and python3-av too); system user and group `beemond`, member of
#   i2c gpio audio video dialout (created if missing); /etc/beemond (beemond.toml from
#   config/beemond.toml and an empty upload-password, only if absent); /var/lib/beemond (the spool);
#   a venv in /opt/beemond/venv that sees the system's packages (--system-site-packages: picamera2 and
#   libcamera exist only as apt packages), beemond installed into it from this tree, and from PyPI only
#   the requirements apt does not satisfy (pinned so that pip can never shadow an apt package);
#   /etc/systemd/system/beemond.service, /etc/udev/rules.d/99-beemond.rules and
#   /etc/modules-load.d/beemond.conf (the kernel modules the configured sensors need, loaded at boot),
#   then `udevadm control --reload`, `udevadm trigger` and `systemctl daemon-reload` + `enable` (each
#   skipped with a note where udev or systemd is not running). --enable-i2c runs
#   `raspi-config nonint do_i2c 0` where raspi-config exists.
# --uninstall stops and removes the service, unit, rules and /opt/beemond; the config, the spool and
#   the user stay unless --purge is given too.
# --dry-run prints every action (as "+ command") without doing it.
# --destdir DIR installs the files under DIR (packaging, tests): no user, apt, udev, systemd or raspi-config.
# Environment: PIP_* variables reach pip (e.g. PIP_CERT, PIP_INDEX_URL).
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
UNINSTALL=0
PURGE=0
ENABLE_I2C=0
CAMERA=0
DESTDIR=${DESTDIR:-}
GROUPS_WANTED=(i2c gpio audio video dialout)
# The venv's own needs, then the libraries beemond imports that Debian 12 ships at versions that satisfy
# pyproject.toml (checked against bookworm: numpy 1.24, jinja2 3.1, cryptography 38, soundfile 0.12,
# smbus2 0.4, pyserial 3.5, pillow 9.4, tomli-w 1.0, prometheus-client 0.16). Not here, so from PyPI:
# pyrage and sounddevice (not packaged), astral (bookworm's 1.6 has another API), paramiko (bookworm's
# 2.12 lacks the Terrapin fix, CVE-2023-48795), watchdog (2.2: no event_filter), paho-mqtt (1.6: the
# 1.x API), gpiozero on plain Debian (1.6 has no lgpio pin factory; Raspberry Pi OS ships 2.0).
APT_PACKAGES=(python3-venv python3-setuptools python3-wheel python3-packaging libportaudio2 libsndfile1
              python3-numpy python3-jinja2 python3-cryptography python3-soundfile python3-smbus2 python3-serial
              python3-pil python3-tomli-w python3-prometheus-client python3-cffi
              python3-bcrypt python3-nacl python3-colorzero python3-gpiozero)
# Only where the distribution has them (Raspberry Pi OS): the lgpio pin factory's library.
APT_OPTIONAL=(python3-lgpio)
# --camera, or a camera sensor in the config: picamera2 (Raspberry Pi OS only) and PyAV for its clips.
APT_CAMERA=(python3-picamera2 python3-av)

usage() { sed -n '2,20s/^# \{0,1\}//p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --enable-i2c) ENABLE_I2C=1 ;;
        --camera) CAMERA=1 ;;
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
MODULES=$DESTDIR/etc/modules-load.d/beemond.conf
VENV=$OPT/venv

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

# Sensor types configured for real hardware in CONFIG (TOML), one a line; nothing if it cannot be read.
configured_types() {
    [ -r "$1" ] || return 0
    python3 - "$1" <<'EOF' 2>/dev/null || true
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    cfg = tomllib.load(f)
for s in cfg.get("sensors", {}).values():
    if s.get("enabled", True) and s.get("backend", "hardware") == "hardware":
        print(s.get("type", ""))
EOF
}

wants_camera() {
    [ "$CAMERA" = 1 ] || configured_types "$ETC/beemond.toml" | grep -qx camera
}

apt_available() { apt-cache show "$1" >/dev/null 2>&1; }

install_packages() {
    live_system || return 0
    if ! have apt-get; then
        note "no apt-get: make sure ${APT_PACKAGES[*]} are installed"
        return 0
    fi
    local wanted=("${APT_PACKAGES[@]}") missing=() p
    for p in "${APT_OPTIONAL[@]}"; do
        if apt_available "$p"; then wanted+=("$p"); fi
    done
    if wants_camera; then
        for p in "${APT_CAMERA[@]}"; do
            if apt_available "$p"; then
                wanted+=("$p")
            else
                note "camera: no $p in this distribution's archive (python3-picamera2 is Raspberry Pi OS's)"
            fi
        done
    fi
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
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

# The venv must see the system's packages; one made by an older install.sh did not: make it anew.
make_venv() {
    if [ -x "$VENV/bin/python" ] && ! grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null; then
        note "$VENV does not see the system's packages: making it anew"
        run rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ] || [ "$DRY_RUN" = 1 ]; then
        run python3 -m venv --system-site-packages "$VENV"
    fi
}

# The requirements of the installed beemond that nothing installed satisfies, one a line; with an
# argument, also writes there a pin (name==version) for every other distribution outside the venv.
unsatisfied() {
    "$VENV/bin/python" - "$@" <<'EOF'
import sys, sysconfig
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
missing = []
for line in metadata.requires("beemond") or ():
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (the test tools)
    try:
        ok = req.specifier.contains(metadata.version(req.name), prereleases=True)
    except metadata.PackageNotFoundError:
        ok = False
    if not ok:
        missing.append(req)
print("\n".join(map(str, missing)))
if len(sys.argv) > 1:
    venv = sysconfig.get_paths()["purelib"]
    skip = {canonicalize_name(r.name) for r in missing}
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if d.metadata["Name"] and canonicalize_name(d.metadata["Name"]) not in skip
                   and not str(d.locate_file("")).startswith(venv)})
    with open(sys.argv[1], "w") as f:
        f.write("\n".join(pins) + "\n")
EOF
}

# beemond itself without dependencies, then from PyPI only the requirements nothing installed satisfies.
# Every other distribution of the system's site-packages is pinned to its installed version in a
# constraints file, so a PyPI package that wants a newer numpy (say) makes the install fail loudly
# instead of shadowing the apt numpy that picamera2's compiled parts are built against.
pip_install() {
    local constraints="$OPT/apt-constraints.txt" missing isolation=()
    # apt's setuptools and wheel build beemond where they are there: a re-install needs no package index
    if "$VENV/bin/python" -c "import setuptools, wheel" 2>/dev/null; then
        isolation=(--no-build-isolation)
    fi
    run "$VENV/bin/pip" install --quiet --no-deps "${isolation[@]}" --upgrade "$SRC"
    if [ "$DRY_RUN" = 1 ]; then
        note "dry run: then pip installs what apt does not satisfy, pinned by $constraints"
        return 0
    fi
    missing=$(unsatisfied "$constraints")
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086  # one requirement a word
        note "from PyPI (nothing installed satisfies them):" $missing
        # shellcheck disable=SC2086
        run "$VENV/bin/pip" install --quiet --constraint "$constraints" $missing
        missing=$(unsatisfied)
        if [ -n "$missing" ]; then
            echo "install.sh: still unsatisfied after pip:" "$missing" >&2
            exit 1
        fi
    fi
}

install_files() {
    run install -d -m 0755 "$OPT"
    make_venv
    pip_install
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
    install_modules_load
}

# /etc/modules-load.d/beemond.conf: DeviceAllow=char-CLASS is resolved when the unit starts, so a class
# whose driver loads later (a USB-serial adapter plugged in after boot) stays denied until a restart.
# Loading those drivers at boot, before the unit, registers their device classes in time.
install_modules_load() {
    local types tmp
    types=$(configured_types "$ETC/beemond.toml")
    [ -e "$ETC/beemond.toml" ] || types=$(configured_types "$SRC/config/beemond.toml")
    tmp=$(mktemp)
    {
        echo "# Written by beemond's scripts/install.sh from the sensors in /etc/beemond/beemond.toml;"
        echo "# run it again after adding a sensor type. Loaded at boot by systemd-modules-load.service."
        echo "i2c-dev"
        if grep -qx ds18b20 <<<"$types"; then echo "w1-gpio"; echo "w1-therm"; fi
        if grep -qx scale <<<"$types"; then echo "usbserial"; echo "cdc_acm"; fi
        if grep -qx audio <<<"$types"; then echo "snd"; fi
        if wants_camera; then echo "videodev"; fi
    } >"$tmp"
    run install -D -m 0644 "$tmp" "$MODULES"
    if [ "$DRY_RUN" = 1 ]; then grep -v '^#' "$tmp" | sed 's/^/    /'; fi
    rm -f "$tmp"
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
            # the modules now, not only at the next boot (a container has no modules to load)
            if ! systemd-detect-virt --quiet --container; then
                run systemctl restart systemd-modules-load.service || note "some module of $MODULES did not load"
            fi
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
    for f in "$UNIT" "$RULES" "$MODULES"; do
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
