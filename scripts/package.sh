#!/usr/bin/env bash
# `make package PG=17`: an installable tarball for one PostgreSQL major version, in dist/:
# pg_billing-<version>-pg<N>-linux-x86_64.tar.gz with lib/pg_billing.so, extension/ (the control
# file, the install script `cargo pgrx package` generates and every upgrade script) and
# install.sh, which copies them into the server that PG_CONFIG (or pg_config on PATH) names.
# A release build (PROFILE=debug for a quick one).
source "$(dirname "$0")/lib.sh"
ensure_deps
VERSION="$(sed -nE 's/^version = "([^"]+)"/\1/p' "$REPO/Cargo.toml" | head -n 1)"
NAME="pg_billing-$VERSION-pg$PG_MAJOR-linux-x86_64"
STAGE="$REPO/.tmp/package-pg$PG_MAJOR"
rm -rf "$STAGE"; mkdir -p "$STAGE" "$REPO/dist"
flags=("${PG_FEATURE_ARGS[@]}")
[ "${PROFILE:-release}" = debug ] && flags+=(--debug)
cfg=(); [ "$PG_MAJOR" = 15 ] || cfg=("PGRX_PG_CONFIG_PATH=$PG_CONFIG")
log "cargo pgrx package for PostgreSQL $PG_MAJOR ($PG_CONFIG)"
(cd "$REPO" && env "${cfg[@]}" cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$STAGE/pgrx" "${flags[@]}" >/dev/null)
mkdir -p "$STAGE/$NAME/lib" "$STAGE/$NAME/extension"
find "$STAGE/pgrx" -name 'pg_billing.so' -exec cp {} "$STAGE/$NAME/lib/" \;
find "$STAGE/pgrx" \( -name 'pg_billing.control' -o -name 'pg_billing--*.sql' \) -exec cp {} "$STAGE/$NAME/extension/" \;
cp "$REPO"/sql/pg_billing--*--*.sql "$STAGE/$NAME/extension/"    # every upgrade script
[ -f "$STAGE/$NAME/lib/pg_billing.so" ] && [ -f "$STAGE/$NAME/extension/pg_billing--$VERSION.sql" ] \
    || { echo "cargo pgrx package did not produce the library and install script" >&2; exit 1; }
cat > "$STAGE/$NAME/install.sh" <<SH
#!/bin/sh
# Installs pg_billing $VERSION into a PostgreSQL $PG_MAJOR server: PG_CONFIG=/path/to/pg_config sh install.sh
set -eu
cd "\$(dirname "\$0")"
PG_CONFIG="\${PG_CONFIG:-pg_config}"
major="\$("\$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\\1/')"
[ "\$major" = $PG_MAJOR ] || { echo "this package is for PostgreSQL $PG_MAJOR; \$PG_CONFIG is \$major" >&2; exit 1; }
install -m 755 lib/pg_billing.so "\$("\$PG_CONFIG" --pkglibdir)/"
install -m 644 extension/* "\$("\$PG_CONFIG" --sharedir)/extension/"
echo "pg_billing $VERSION installed; in each database: CREATE EXTENSION pg_billing; (or ALTER EXTENSION pg_billing UPDATE;)"
SH
chmod 755 "$STAGE/$NAME/install.sh"
tar czf "$REPO/dist/$NAME.tar.gz" -C "$STAGE" "$NAME"
log "wrote dist/$NAME.tar.gz"
tar tzf "$REPO/dist/$NAME.tar.gz"
