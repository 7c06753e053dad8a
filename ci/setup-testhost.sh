#!/usr/bin/env bash
# Prepare the appliance test host: podman with a "Debian 12 + systemd as PID 1" image, and a
# virtualenv with molecule, ansible, testinfra and the linters.
#
# Idempotent: whatever already exists is kept. Run as root (CI runs it as root).
# Why each host setting is needed is written down in ../shared/TEST-HOSTS.md; in short:
# crun cannot run on this kernel's hybrid cgroup layout, and podman's default rlimits
# are above what the sandbox may set.
set -euo pipefail

TESTHOST_DIR=${TESTHOST_DIR:-/var/tmp/koerier-testhost}
IMAGE=${TEST_IMAGE:-localhost/debian12-systemd:latest}
TAR=${TAR:-$TESTHOST_DIR/debian12-systemd-rootfs.tar}
VENV=${VENV:-$TESTHOST_DIR/venv}
# debootstrap from the same Debian archive the host's apt uses
APT_SRC=/etc/apt/sources.list.d/debian.sources
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' "$APT_SRC")}
export DEBIAN_FRONTEND=noninteractive
mkdir -p "$TESTHOST_DIR"

log() { printf '[setup-testhost] %s\n' "$*"; }

# 1. Host packages: podman, runc (crun is unusable here), debootstrap, and vagrant
#    (only for `vagrant validate`: no VM runs here).
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
    || ! command -v debootstrap >/dev/null || ! command -v vagrant >/dev/null; then
  log "installing podman, runc, debootstrap, vagrant"
  apt-get update -qq
  apt-get install -y -qq podman runc debootstrap vagrant >/dev/null
fi

# 2. Podman engine settings for this sandbox: runc, and rlimits no higher than ours.
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576
NPROC=$(ulimit -Hu)
if [ "$NPROC" = unlimited ] || [ "$NPROC" -gt 32768 ]; then NPROC=32768; fi
mkdir -p /etc/containers
cat > /etc/containers/containers.conf <<CONF
[containers]
default_ulimits = ["nofile=${NOFILE}:${NOFILE}", "nproc=${NPROC}:${NPROC}"]

[engine]
runtime = "runc"
CONF

# 3. The image: a minimal bookworm rootfs with systemd, imported once and reused by every
#    scenario. Packages the roles install are NOT baked in: the roles must install them.
if ! podman image exists "$IMAGE"; then
  if [ ! -s "$TAR" ]; then
    log "debootstrapping bookworm (about a minute)"
    R=$TESTHOST_DIR/rootfs
    rm -rf "$R"
    debootstrap --variant=minbase \
      --include=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,iproute2,procps,ca-certificates,locales \
      bookworm "$R" "$MIRROR" >/dev/null
    rm -f "$R/etc/apt/sources.list"
    cp "$APT_SRC" "$R/etc/apt/sources.list.d/debian.sources"
    echo debian12 > "$R/etc/hostname"
    : > "$R/etc/machine-id"                      # a fresh machine-id on every boot
    rm -f "$R/var/lib/dbus/machine-id"
    rm -f "$R/etc/systemd/system/getty.target.wants/getty@tty1.service" \
          "$R"/etc/systemd/system/timers.target.wants/apt-daily*.timer \
          "$R/etc/systemd/system/timers.target.wants/e2scrub_all.timer" \
          "$R/etc/systemd/system/timers.target.wants/fstrim.timer" \
          "$R/etc/systemd/system/multi-user.target.wants/e2scrub_reap.service"
    echo 'en_US.UTF-8 UTF-8' > "$R/etc/locale.gen"
    chroot "$R" locale-gen >/dev/null
    echo 'LANG=C.UTF-8' > "$R/etc/default/locale"
    chroot "$R" apt-get clean
    rm -rf "$R"/var/lib/apt/lists/*
    # An old mtime, or apt's cache_valid_time takes the empty lists for fresh ones.
    touch -d 1970-01-02 "$R/var/lib/apt/lists"
    tar -C "$R" --numeric-owner -cf "$TAR" .
    rm -rf "$R"
  fi
  log "importing $IMAGE"
  podman import \
    --change 'CMD ["/sbin/init"]' \
    --change 'ENV container=podman' \
    --change 'STOPSIGNAL SIGRTMIN+3' \
    "$TAR" "$IMAGE" >/dev/null
fi

# 4. The tool venv. Collections come from the PyPI 'ansible' package: Galaxy is unreachable.
#    ansible-core 2.19 is the newest that runs on Python 3.11.
if [ ! -x "$VENV/bin/ansible-lint" ]; then
  log "creating the tool venv at $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q \
    'ansible-core==2.19.14' 'ansible==12.3.0' \
    'molecule==26.10.0' 'molecule-plugins[podman]==26.10.12' 'pytest-testinfra==10.2.2' \
    'ansible-lint==26.10.1' 'yamllint==1.38.0'
fi

log "$(podman --version)"
log "$(PATH="$VENV/bin:$PATH" molecule --version | head -1)"
log "image: $IMAGE  venv: $VENV"
