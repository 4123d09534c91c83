#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp with its Python binding, CPU only) once into a wheel cache and
# installs it, for the GGUF checks (tests/test_gguf.py uses it when present; benchmarks/gguf.py
# needs it). PyPI has it only as a source package: the build compiles llama.cpp with CMake (minutes
# on 2 cores). A second run installs the cached wheel.
#   WHEELS=~/.cache/compress/wheels  (where the wheel is kept)
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
WHEELS=${WHEELS:-$HOME/.cache/compress/wheels}
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
        "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$WHEELS"
    echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
fi
"$PY" -m pip install -q --no-deps "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"$PY" -m pip install -q "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
