#!/usr/bin/env bash
# The cost-of-safety benchmark on a GPU machine, in one call, from files carried in the tree (no network).
#
#   OUT=/some/dir bash safechat/bench/gpu.sh            # run from the repository root
#
# Written for the lent NVIDIA H200 machine (CUDA 13 + nvcc, python3 3.12 with numpy, jinja2,
# safetensors, tqdm, matplotlib, torch, onnx, onnxscript, onnxruntime, cmake, ninja and
# scikit-build-core already installed). Everything else comes from $GPU_DIR (default .gpu/, a folder
# git ignores: `echo /.gpu/ >> .git/info/exclude`, then name it in the call's `carry`):
#
#   required  model.gguf                         the safe GGUF to measure (the default model is 98 MB,
#             (or model.gguf.part-*)             more than one call's 64 MiB tree: `split -b 60M model.gguf
#                                                model.gguf.part-` and send the parts in calls made while the
#                                                machine is warm; the script joins them; model.gguf.sha256
#                                                beside them, if present, is checked)
#   required  gguf-0.19.0-py3-none-any.whl       unless `import gguf` already works
#   required, one of:
#             llama-cpp-python importable with CUDA already, or
#             llama_cpp_python-0.3.36-*.whl      built with -DGGML_CUDA=on (this script leaves the wheel it
#                                                builds in $OUT when it fits in 16 MiB: carry it next time), or
#             llama_cpp_python-0.3.36.tar.gz     the sdist: built here with nvcc for sm_90 (about 3-5 minutes
#                                                on 16 cores: the longest stage)
#   optional  model.onnx                         the ONNX export of model.gguf; without it the script exports
#                                                one here with torch (SAFECHAT_GPU_ONNX=off skips ONNX rows);
#                                                the CUDA provider is used when onnxruntime has it
#
# Fetch them on a machine with network (Python 3.12 wheels for the GPU image):
#   pip download --no-deps gguf==0.19.0 -d .gpu
#   pip download --no-deps --no-binary=:all: llama-cpp-python==0.3.36 -d .gpu
#   cp "$(python -c 'from runtime.default_model import default_model_path as p; print(p())')" .gpu/model.gguf
#
# Writes to $OUT: overhead.md (the table), overhead.json (raw runs), overhead.png, env.txt, gpu.log.
# Rehearse it on a CPU machine (tiny model, few tokens): REQUIRE_CUDA=0 TOKENS=2 RUNS=1 OUT=... bash safechat/bench/gpu.sh
# Budget: under 8 minutes with the sdist build, about 2 without. Every check of a prerequisite runs
# before the first long step, so a missing file fails in seconds with a message naming it.
set -euo pipefail
cd "$(dirname "$0")/../.."   # the repository root
REPO=$PWD
GPU_DIR=${GPU_DIR:-$REPO/.gpu}
PY=${PYTHON:-python3}
SITE=/tmp/safechat-site
TOKENS=${TOKENS:-128}
RUNS=${RUNS:-5}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}   # 0: a rehearsal on a CPU machine (accepts a CPU llama-cpp-python, no GPU)
T0=$SECONDS

die() { echo "safechat/bench/gpu.sh: $*" >&2; exit 2; }
say() { echo "[gpu.sh $((SECONDS - T0))s] $*"; }

[ -n "${OUT:-}" ] || die "set OUT to the folder that receives the results"
mkdir -p "$OUT" "$SITE"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export SAFECHAT_CACHE=/tmp/safechat-cache

# -- prerequisites (fail fast) ----------------------------------------------------------------
command -v "$PY" >/dev/null || die "no $PY; set PYTHON to an interpreter >= 3.10"
if [ "$REQUIRE_CUDA" = 1 ]; then nvidia-smi -L || die "nvidia-smi found no GPU"; fi
MODEL=$GPU_DIR/model.gguf
if [ ! -f "$MODEL" ]; then
  ls "$GPU_DIR"/model.gguf.part-* >/dev/null 2>&1 || die "missing $MODEL (or its parts model.gguf.part-*)"
  cat "$GPU_DIR"/model.gguf.part-* > /tmp/model.gguf && MODEL=/tmp/model.gguf
fi
if [ -f "$GPU_DIR/model.gguf.sha256" ]; then
  echo "$(cut -d' ' -f1 "$GPU_DIR/model.gguf.sha256")  $MODEL" | sha256sum -c - || die "$MODEL does not match model.gguf.sha256"
fi
if ! "$PY" -c "import gguf" 2>/dev/null; then
  ls "$GPU_DIR"/gguf-0.19.0-*.whl >/dev/null 2>&1 || die "gguf is not installed and $GPU_DIR has no gguf-0.19.0 wheel"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$GPU_DIR"/gguf-0.19.0-*.whl
fi
HAS_CUDA_LLAMA="import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() or not $REQUIRE_CUDA else 1)"
LLAMA_SRC=""
if ! "$PY" -c "$HAS_CUDA_LLAMA" 2>/dev/null; then
  WHL=$(ls "$GPU_DIR"/llama_cpp_python-0.3.36-*.whl 2>/dev/null | head -1 || true)
  SDIST=$(ls "$GPU_DIR"/llama_cpp_python-0.3.36.tar.gz 2>/dev/null | head -1 || true)
  if [ -n "$WHL" ]; then LLAMA_SRC=$WHL
  elif [ -n "$SDIST" ]; then
    command -v nvcc >/dev/null || die "building llama-cpp-python from $SDIST needs nvcc (CUDA toolkit)"
    "$PY" -c "import scikit_build_core, cmake, ninja" 2>/dev/null \
      || die "building from the sdist needs scikit-build-core, cmake and ninja in $PY"
    LLAMA_SRC=$SDIST
  else
    die "llama-cpp-python with CUDA is not installed and $GPU_DIR has neither llama_cpp_python-0.3.36-*.whl (CUDA) nor llama_cpp_python-0.3.36.tar.gz"
  fi
fi
ONNX_MODE=${SAFECHAT_GPU_ONNX:-auto}
if [ "$ONNX_MODE" != off ]; then
  "$PY" -c "import onnxruntime" 2>/dev/null || { say "no onnxruntime: ONNX rows skipped"; ONNX_MODE=off; }
fi
if [ "$ONNX_MODE" != off ] && [ ! -f "$GPU_DIR/model.onnx" ]; then
  "$PY" -c "import torch, onnx, onnxscript" 2>/dev/null || { say "no model.onnx and no torch/onnx/onnxscript to export one: ONNX rows skipped"; ONNX_MODE=off; }
fi
say "prerequisites present"

# -- install / build ----------------------------------------------------------------------------
if [ -n "$LLAMA_SRC" ]; then
  if [[ $LLAMA_SRC == *.tar.gz ]]; then
    say "building llama-cpp-python with CUDA (sm_90) from $LLAMA_SRC"
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 420 "$PY" -m pip wheel --no-index --no-deps \
      --no-build-isolation -w /tmp/llama-wheel "$LLAMA_SRC" || die "building llama-cpp-python failed (log above)"
    LLAMA_SRC=$(ls /tmp/llama-wheel/llama_cpp_python-*.whl)
    if [ "$(stat -c %s "$LLAMA_SRC")" -lt $((16 * 1024 * 1024)) ]; then cp "$LLAMA_SRC" "$OUT/"; fi
  fi
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$LLAMA_SRC"
  "$PY" -c "$HAS_CUDA_LLAMA" || die "the installed llama-cpp-python has no GPU offload (built without CUDA?)"
fi
if ! "$PY" -c "import runtime._native" 2>/dev/null; then  # *.so is git-ignored: built here, in place
  say "building the runtime's native module"
  "$PY" setup.py -q build_ext --inplace >/dev/null 2>&1 || say "native module did not build: native rows will be skipped"
fi

{ nvidia-smi || true; "$PY" -VV
  "$PY" -c "import llama_cpp, numpy, onnxruntime as o; print('llama-cpp-python', llama_cpp.__version__, 'numpy', numpy.__version__, 'onnxruntime', o.__version__, o.get_available_providers())" || true
} > "$OUT/env.txt" 2>&1

ONNX_ARGS=()
if [ "$ONNX_MODE" != off ]; then
  ONNX=$GPU_DIR/model.onnx
  if [ ! -f "$ONNX" ]; then
    say "exporting ONNX (float32) from $MODEL"
    mkdir -p /tmp/onnx && cp "$MODEL" /tmp/onnx/model.gguf && ONNX=/tmp/onnx/model.onnx
    timeout 180 "$PY" -m safechat.convert onnx /tmp/onnx/model.gguf "$ONNX" || { say "ONNX export failed: ONNX rows skipped"; ONNX=""; }
  elif [ ! -f "$GPU_DIR/model.gguf" ]; then  # the ONNX backend reads its vocabulary from model.gguf beside it
    mkdir -p /tmp/onnx && cp "$GPU_DIR/model.onnx" /tmp/onnx/ && cp "$MODEL" /tmp/onnx/model.gguf && ONNX=/tmp/onnx/model.onnx
  fi
  if [ -n "$ONNX" ]; then ONNX_ARGS=(--onnx "$ONNX"); fi
fi

# -- the benchmark ------------------------------------------------------------------------------
say "safechat bench overhead (n_gpu_layers 999, $TOKENS tokens, $RUNS runs)"
timeout $((480 - (SECONDS - T0) > 60 ? 480 - (SECONDS - T0) : 60)) "$PY" -m safechat.bench overhead --model "$MODEL" \
  --n-gpu-layers 999 --tokens "$TOKENS" --runs "$RUNS" "${ONNX_ARGS[@]}" \
  --json "$OUT/overhead.json" --png "$OUT/overhead.png" | tee "$OUT/overhead.md"
say "done"
