#!/usr/bin/env bash
# Prints the path of a Python 3.13 interpreter for the second test run, installing one if needed.
#
# Looks, in order, at $PYTHON313, python3.13 on PATH, /usr/bin and /usr/local/bin, pyenv's
# versions, and uv's own interpreters; when none runs, installs Debian's python3.13 package
# (Debian 13 and later have it). uv cannot download interpreters on machines without a route to
# its download host, so it is not asked to. Exits non-zero, saying how to get one, otherwise.
set -euo pipefail

is_313() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; }

candidates() {
    [ -n "${PYTHON313:-}" ] && echo "$PYTHON313"
    command -v python3.13 2>/dev/null || true  # may be a pyenv shim that does not run: checked
    echo /usr/bin/python3.13
    echo /usr/local/bin/python3.13
    local root
    root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    ls -d "$root"/versions/3.13*/bin/python3.13 2>/dev/null | sort -rV || true
    ${UV:-uv} python find --no-project 3.13 2>/dev/null || true
}

find_313() {
    local python
    while read -r python; do
        if [ -n "$python" ] && is_313 "$python"; then
            echo "$python"
            return 0
        fi
    done < <(candidates)
    return 1
}

if find_313; then
    exit 0
fi

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "No Python 3.13 found: installing Debian's python3.13 package" >&2
    apt-get update -q >&2
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.13 >&2 && find_313; then
        exit 0
    fi
fi

cat >&2 <<'EOF'
No Python 3.13 interpreter found, and Debian's python3.13 package could not be installed
(it is in Debian 13 and later). Install one (pyenv install 3.13, uv python install 3.13, or
your OS package) or point PYTHON313 at it: make test PYTHON313=/path/to/python3.13
EOF
exit 1
