# Sourced by .ci/run and examples/demo.sh: sets PYTHON to a working Python 3.12
# (megatron-core >= 0.17 needs it), also where pyenv's python3.12 shim is inactive.
find_python312() {
  local candidate
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
                   /usr/local/bin/python3.12 /usr/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "no working python3.12 found (megatron-core >= 0.17 needs it)" >&2
  return 1
}
PYTHON=$(find_python312)
