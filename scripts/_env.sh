# shellcheck shell=bash
# Shared by scripts/*: locate the repository and prepare .venv. Sourced, not run.

MCP0_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MCP0_VENV="$MCP0_ROOT/.venv"

# Run by a candidate interpreter: prints its version; exit status 0 for Python >= 3.11
# built for speed that can make a venv, 1 for another Python >= 3.11, 2 for anything else.
# "Built for speed": with profile-guided optimisation (--enable-optimizations: python.org's,
# the official container images', uv's, Fedora's), or the distribution's own interpreter
# under /usr linked statically, as Debian and Ubuntu ship /usr/bin/python3.x (built with
# PGO and LTO; its sysconfig describes the shared build beside it). pyenv's default build
# is neither: every call inside the interpreter goes through libpython's PLT, and the
# server spends ~14% more CPU on it (bench/README.md, "Which Python").
_MCP0_PYTHON_PROBE='
import sys, sysconfig
print("%d.%d.%d" % sys.version_info[:3])
if sys.version_info < (3, 11):
    sys.exit(2)
optimised = "--enable-optimizations" in (sysconfig.get_config_var("CONFIG_ARGS") or "")
try:
    with open("/proc/self/maps") as maps:
        static = "libpython" not in maps.read()
except OSError:
    static = False
try:
    from ensurepip import bootstrap  # (Debian ships it apart: python3.x-venv)
except ImportError:
    sys.exit(1)
sys.exit(0 if optimised or (static and sys.base_prefix == "/usr") else 1)
'

# Prints the interpreter .venv is made with: $MCP0_PYTHON when set; otherwise the first
# Python >= 3.11 built for speed among those on PATH and the system's, else the first
# Python >= 3.11 at all, as before (saying why). Says so when that is not PATH's python3.
mcp0_find_python() {
    local candidate chosen="" status version first=""
    if [[ -n "${MCP0_PYTHON:-}" ]]; then
        status=0
        "$MCP0_PYTHON" -c "$_MCP0_PYTHON_PROBE" >/dev/null 2>&1 || status=$?
        if [[ $status -le 1 ]]; then
            command -v "$MCP0_PYTHON"
            return 0
        fi
        echo "mcp0 setup: MCP0_PYTHON=$MCP0_PYTHON does not run as Python >= 3.11" >&2
        return 1
    fi
    for candidate in python3 python3.13 python3.12 python3.11 python \
        /usr/bin/python3 /usr/local/bin/python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        status=0
        version="$("$candidate" -c "$_MCP0_PYTHON_PROBE" 2>/dev/null)" || status=$?
        [[ -z "$first" && $status -le 1 ]] && first="$(command -v "$candidate") ($version)"
        if [[ $status -eq 0 ]]; then
            chosen="$(command -v "$candidate") ($version)"
            break
        fi
    done
    if [[ -n "$chosen" ]]; then
        if [[ "$chosen" != "$first" ]]; then
            echo "mcp0 setup: making .venv with $chosen, built for speed, rather than" \
                "$first (MCP0_PYTHON chooses)" >&2
        fi
        echo "${chosen% (*}"
        return 0
    fi
    if [[ -n "$first" ]]; then
        echo "mcp0 setup: making .venv with $first; no Python >= 3.11 built for speed" \
            "(with PGO) that can make a venv was found, and the server spends ~14% more" \
            "CPU on one without (MCP0_PYTHON chooses)" >&2
        echo "${first% (*}"
        return 0
    fi
    echo "mcp0 setup: Python >= 3.11 is required; install it (e.g. apt-get install python3)" >&2
    return 1
}

# Creates .venv once; on Debian a missing ensurepip is fixed with python3-venv.
mcp0_ensure_venv() {
    if [[ -x "$MCP0_VENV/bin/python" ]]; then
        if [[ -n "${MCP0_PYTHON:-}" ]]; then
            echo "mcp0 setup: .venv exists; MCP0_PYTHON is used when it is made (remove" \
                ".venv to make it again)" >&2
        fi
        return 0
    fi
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
