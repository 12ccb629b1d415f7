# shellcheck shell=bash
# Shared by scripts/*: locate the repository and prepare .venv. Sourced, not run.

MCP0_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MCP0_VENV="$MCP0_ROOT/.venv"

# Prints the first interpreter on PATH that is Python >= 3.11.
mcp0_find_python() {
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "mcp0 setup: Python >= 3.11 is required; install it (e.g. apt-get install python3)" >&2
    return 1
}

# Creates .venv once; on Debian a missing ensurepip is fixed with python3-venv.
mcp0_ensure_venv() {
    [[ -x "$MCP0_VENV/bin/python" ]] && return 0
    local python
    python="$(mcp0_find_python)"
    if ! "$python" -m venv "$MCP0_VENV" 2>/dev/null; then
        rm -rf "$MCP0_VENV"
        if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        fi
        "$python" -m venv "$MCP0_VENV"
    fi
    "$MCP0_VENV/bin/python" -m pip install -q --upgrade pip
}

# Installs the package editable with EXTRA ("dev" or "server"), skipped while
# pyproject.toml is unchanged since the last install of that extra (or of "dev",
# which includes "server").
mcp0_ensure_package() {
    local extra="$1" digest stamp
    digest="$(sha256sum "$MCP0_ROOT/pyproject.toml" | cut -d' ' -f1)"
    for stamp in "$MCP0_VENV/.mcp0-installed-$extra" "$MCP0_VENV/.mcp0-installed-dev"; do
        if [[ -f "$stamp" && "$(cat "$stamp")" == "$digest" ]]; then
            return 0
        fi
    done
    (cd "$MCP0_ROOT" && "$MCP0_VENV/bin/python" -m pip install -q -e ".[$extra]")
    echo "$digest" >"$MCP0_VENV/.mcp0-installed-$extra"
}

# Makes sure the command COMMAND is on PATH: installed from the Debian package
# PACKAGE when it is not and apt-get can (as root), otherwise an error saying so.
mcp0_ensure_command() {
    local command="$1" package="$2"
    command -v "$command" >/dev/null 2>&1 && return 0
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"
        command -v "$command" >/dev/null 2>&1 && return 0
    fi
    echo "mcp0 setup: the tests need '$command': install it (e.g. apt-get install $package)" >&2
    return 1
}
