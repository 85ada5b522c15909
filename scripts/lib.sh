# Shared helpers for pg_billing's scripts. Source it; do not run it.
# Everything runs on a fresh Debian 12 machine as root (or a sudo user): it installs what it
# needs, never downloads PostgreSQL itself, and runs PostgreSQL as the `postgres` user.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PGRX_HOME="$REPO/pgrx-config"
# PG_CONFIG may name another PostgreSQL tree (a relocatable one); Debian's 15 by default.
export PG_CONFIG="${PG_CONFIG:-/usr/bin/pg_config}"
PGBIN="$("$PG_CONFIG" --bindir 2>/dev/null || echo /usr/lib/postgresql/15/bin)"
PGXS="$(dirname "$("$PG_CONFIG" --pgxs 2>/dev/null || echo /usr/lib/postgresql/15/lib/pgxs/src/makefiles/pgxs.mk)")/../.."
PGXS="$(cd "$PGXS" 2>/dev/null && pwd || echo /usr/lib/postgresql/15/lib/pgxs)"
export PGBIN
# The Python tests run under Debian's python3 with Debian's python3-psycopg2 and python3-pytest
# (ensure_deps installs both).
PY=/usr/bin/python3
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# Debian packages (PostgreSQL 15, clang, the Python test tools, binutils for nm), cargo-pgrx
# 0.18.1. Idempotent: a second run installs nothing.
ensure_deps() {
    [ "${SKIP_DEPS:-0}" = 1 ] && return 0
    local pkgs=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo binutils python3-psycopg2 python3-pytest)
    local missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if ! cargo pgrx --version 2>/dev/null | grep -q '0.18.1'; then
        log "installing cargo-pgrx 0.18.1 (takes a few minutes)"
        cargo install cargo-pgrx --version 0.18.1 --locked
    fi
}

# Build and install the extension into Debian's PostgreSQL 15. PROFILE=release for benchmarks.
install_extension() {
    [ "${SKIP_INSTALL:-0}" = 1 ] && return 0
    local flags=()
    [ "${PROFILE:-debug}" = "release" ] && flags+=(--release)
    log "building and installing pg_billing (${PROFILE:-debug})"
    (cd "$REPO" && $SUDO env "PATH=$PATH" "PGRX_HOME=$PGRX_HOME" "CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}" \
        "RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}" cargo pgrx install --pg-config "$PG_CONFIG" "${flags[@]}" >/dev/null)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Start a throwaway cluster owned by postgres. Sets PGDATA_DIR, PGPORT, PGHOST, PGUSER.
start_cluster() {
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
    log "PostgreSQL 15 running on port $PGPORT (data in $PGDATA_DIR)"
}

stop_cluster() {
    if [ -n "${PGDATA_DIR:-}" ] && [ -d "$PGDATA_DIR/data" ]; then
        $SUDO runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PGDATA_DIR"
    fi
}

psql_q() { psql -X -v ON_ERROR_STOP=1 -q "$@"; }
