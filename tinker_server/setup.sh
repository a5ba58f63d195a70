#!/usr/bin/env bash
# Set up SkyRL's Tinker-compatible API server (JAX backend, runs on CPU) in its own
# Python 3.12 venv, once, outside the project's venv: it is about 6.7 GB and needs 3.12
# (jaxlib), which the project does not. Idempotent: a finished venv is left as it is.
# Prints the venv's path on its last line.
set -euo pipefail
SKYRL_VERSION=${SKYRL_VERSION:-0.4.0}
VENV=${SKYRL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/promptdistill/skyrl-$SKYRL_VERSION}

if [ -f "$VENV/.installed" ]; then echo "$VENV"; exit 0; fi

# Python 3.12: $PYTHON312, else python3.12 on PATH, else pyenv's newest 3.12. Each is
# tried by running it: a pyenv shim is on PATH even when 3.12 is not the active version.
is312() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
PY=
for c in "${PYTHON312:-}" "$(command -v python3.12 || true)" \
         "$(command -v pyenv >/dev/null && v=$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1) \
            && [ -n "$v" ] && echo "$(pyenv root)/versions/$v/bin/python3.12")"; do
  if is312 "$c"; then PY=$c; break; fi
done
if [ -z "$PY" ]; then
  echo "make test-tinker needs Python 3.12 for SkyRL's server (jaxlib); none found." >&2
  echo "Install it (e.g. 'pyenv install 3.12' or your OS's python3.12) or set PYTHON312=/path/to/python3.12." >&2
  exit 2
fi

echo "setting up SkyRL $SKYRL_VERSION (Tinker API server, JAX on CPU) in $VENV with $PY; about 6.7 GB, once" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# aiohttp: the server imports it, the extras do not pull it.
"$VENV/bin/python" -m pip install --quiet "skyrl[tinker,jax]==$SKYRL_VERSION" aiohttp
touch "$VENV/.installed"
echo "$VENV"
