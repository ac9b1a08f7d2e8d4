#!/usr/bin/env bash
# Installs what the driver compatibility suite (tests/drivers.rs) needs, when it is missing:
#   - Python: psycopg 3, asyncpg and pytest (tests/drivers/requirements.txt) in a venv, and
#     asyncpg's and SQLAlchemy's own test suites from their PyPI sdists (tests/suites.rs),
#   - Node.js: pg and pg-copy-streams (tests/drivers/package.json),
#   - Java: a headless JDK and pgjdbc (Debian's default-jdk-headless, libpostgresql-jdbc-java),
#   - the partition and chaos tests' hosts (tests/common/netns.rs): iproute2 and iptables.
# Idempotent, and quick when everything is there: each step checks first. Everything but the
# Debian packages goes to tests/drivers/.deps (git-ignored). Prints how long each install took.
set -euo pipefail
cd "$(dirname "$0")/.."
deps=tests/drivers/.deps
mkdir -p "$deps"

now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Debian: a JDK (javac) and pgjdbc's jar.
need_apt=()
command -v javac >/dev/null || need_apt+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3 python3-venv)
command -v npm >/dev/null || need_apt+=(nodejs npm)
# `ip` and `iptables` live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
if ((${#need_apt[@]})); then
    t=$(now)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    echo "install-test-deps: apt-get install ${need_apt[*]}: $(took "$t") s"
fi

# Python: a venv whose stamp records the requirements it was made from.
venv=$deps/venv
req=tests/drivers/requirements.txt
if ! cmp -s "$req" "$venv/requirements.installed" 2>/dev/null; then
    t=$(now)
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
    cp "$req" "$venv/requirements.installed"
    echo "install-test-deps: pip install -r $req: $(took "$t") s"
fi

# asyncpg's own test suite, from its PyPI sdist (the version the venv has), for tests/suites.rs.
asyncpg_version=$(sed -n 's/^asyncpg==//p' "$req")
suite=$deps/asyncpg-$asyncpg_version
if [ ! -d "$suite/tests" ]; then
    t=$(now)
    tmp=$(mktemp -d)
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "asyncpg==$asyncpg_version" -d "$tmp"
    tar -xzf "$tmp/asyncpg-$asyncpg_version.tar.gz" -C "$tmp"
    mkdir -p "$suite"
    cp -r "$tmp/asyncpg-$asyncpg_version/tests" "$suite/tests"
    rm -rf "$tmp"
    echo "install-test-deps: asyncpg $asyncpg_version test suite (sdist): $(took "$t") s"
fi

# The other suites of tests/suites.rs, from their sdists (tests/drivers/suites.txt).
grep -v '^#' tests/drivers/suites.txt | while IFS='=' read -r name _ version; do
    [ -n "$name" ] || continue
    dir=$deps/$name-$version
    [ -d "$dir/test" ] && continue
    t=$(now)
    tmp=$(mktemp -d)
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "$name==$version" -d "$tmp"
    tar -xzf "$tmp"/*.tar.gz -C "$tmp"
    rm -rf "$dir"
    mv "$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -1)" "$dir"
    rm -rf "$tmp"
    echo "install-test-deps: $name $version test suite (sdist): $(took "$t") s"
done

# Node.js: node_modules beside package.json, pinned by package-lock.json.
node=tests/drivers
if ! cmp -s "$node/package-lock.json" "$deps/package-lock.installed" 2>/dev/null \
    || [ ! -d "$node/node_modules/pg" ]; then
    t=$(now)
    if [ -f "$node/package-lock.json" ]; then
        (cd "$node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    else
        (cd "$node" && npm install --no-audit --no-fund --loglevel=error >/dev/null)
    fi
    cp "$node/package-lock.json" "$deps/package-lock.installed"
    echo "install-test-deps: npm install (pg, pg-copy-streams): $(took "$t") s"
fi

echo "install-test-deps: drivers ready"
