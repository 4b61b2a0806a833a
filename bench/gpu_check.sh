#!/usr/bin/env bash
# One-shot GPU check of the pipeline's GPU paths, for a lent GPU machine with no network.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repo root, with .whl/ carried
#   bash bench/gpu_check.sh --cpu-dry  # here, on the CPU: same steps, tiny sizes, our .venv
#
# The GPU machine's python3 has torch, numpy, pandas, pyarrow, ... but not our pins: the wheels in
# .whl/ (transformers 5.24.0 and what it needs in newer versions, zarr + numcodecs + donfig +
# google-crc32c, segment-anything, pycocotools) are installed into /tmp/site first, which goes in
# front of PYTHONPATH. Then each step runs under `timeout`, logs to $OUT/<step>.log, and the script
# goes on whatever it returns; the summary at the end lists every step's exit code and every
# RESULT line. Steps:
#   env         versions of what will be imported, nvidia-smi, torch's view of the GPU
#   pytest_gpu  the gpu-marked tests (tests/test_capture.py, tests/test_devices.py, tests/test_placement.py:
#               its need 2 GPUs and skip on one); the other files named are collected (an import check
#               with the carried packages) and deselected
#   gpu_paths   bench/gpu_paths.py: generate (fp16, bf16; sdpa, flash if importable) and segment
#               stages on the GPU vs eager and CPU references, on the toy models
#   bench_7b    bench/bench_7b.py: LLaVA-1.5-7B-shaped random model, plain vs capture, batches 1 and 8
#   toy_sweep   bench/toy_sweep.py: trains the toy-world LMM configs of bench/toy_sweep_plan.json side by
#               side on the GPU and reports val naming/grounding metrics (with what budget is left)
# A total budget (GPU_CHECK_BUDGET seconds, default 480) caps every step's timeout so that the script
# ends in time; a step that would get under 20 s is skipped. Exit status: 0 when every step returned 0.
set +e
set -o pipefail
cd "$(dirname "$0")/.." || exit 1

MODE=gpu
if [ "${1:-}" = "--cpu-dry" ] || [ "${GPU_CHECK_CPU_DRY:-0}" = 1 ]; then
  MODE=cpu-dry
fi
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-480}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 \
  TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

TEST_FILES="tests/test_capture.py tests/test_devices.py tests/test_generate.py tests/test_toy_lmm.py
  tests/test_sam.py tests/test_segment.py tests/test_llava_next.py tests/test_qwen2_5_vl.py tests/test_attention_store.py
  tests/test_placement.py"
SUMMARY=""
FAILED_STEPS=""

if [ "$MODE" = gpu ]; then
  PY=python3
  echo "=== [install] .whl -> /tmp/site"
  ls -l .whl 2>&1 | tee "$OUT/install.log"
  # The device README's line, verbatim but for the log.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tee -a "$OUT/install.log"
  rc=${PIPESTATUS[0]}
  SUMMARY+="install      rc=$rc\n"
  if [ "$rc" != 0 ]; then
    echo "wheel install failed (rc=$rc); stopping" | tee -a "$OUT/install.log"
    exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
  PATHS_ARGS=""
  BENCH_ARGS=""
  SWEEP_ARGS="--device cuda --parallel 6"
else
  # Here: the project's venv (its own pins; PYTHON=<interpreter> for another one); SITE=<folder> puts
  # a folder of installed wheels in front, as /tmp/site is on the GPU machine.
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python3
  export PYTHONPATH=${SITE:+$SITE:}$PWD
  PATHS_ARGS="--device cpu --dtypes float32,bfloat16 --max-new-tokens 6"
  BENCH_ARGS="--tiny --device cpu --batches 1,2 --repeats 2"
  SWEEP_ARGS="--device cpu --parallel 2 --num-val 4 --workers 2"
fi
echo "mode $MODE, python $PY, PYTHONPATH=$PYTHONPATH, OUT=$OUT, budget ${BUDGET}s"

# step NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of the budget), log, record.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - T0)))
  if [ "$left" -lt 20 ]; then
    echo "=== [$name] SKIPPED: ${left}s of the budget left"
    SUMMARY+="$(printf '%-12s skipped (budget)' "$name")\n"
    FAILED_STEPS+=" $name(skipped)"
    return
  fi
  [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
  echo "=== [$name] $* (timeout ${limit}s)"
  local start=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local took=$(($(date +%s) - start))
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== [$name] TIMED OUT after ${took}s" | tee -a "$OUT/$name.log"
  SUMMARY+="$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$took")\n"
  [ "$rc" = 0 ] || FAILED_STEPS+=" $name"
}

env_report() {
  echo "uname: $(uname -a)"
  echo "nproc: $(nproc)"
  if [ "$MODE" = gpu ]; then
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: skipped (--cpu-dry)"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, importlib.util, sys
print("python", sys.version.split()[0], sys.executable)
names = ["torch", "torchvision", "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate",
         "peft", "numpy", "pandas", "pyarrow", "zarr", "numcodecs", "donfig", "google-crc32c", "pillow",
         "segment-anything", "pycocotools", "regex", "typing-extensions", "packaging", "pyyaml", "tqdm",
         "filelock", "typer", "pytest", "pytest-xdist", "flash-attn"]
for name in names:
    try:
        dist = md.distribution(name)
        where = str(dist.locate_file("")).replace("/site-packages", "/s-p")
        print(f"  {name:18s} {dist.version:14s} {where}")
    except md.PackageNotFoundError:
        print(f"  {name:18s} (not installed)")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"  {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability "
          f"{p.major}.{p.minor}, cudnn {torch.backends.cudnn.version()}, bf16 {torch.cuda.is_bf16_supported()}")
    print("  tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn tf32", torch.backends.cudnn.allow_tf32)
    print("  sdpa flash", torch.backends.cuda.flash_sdp_enabled(), "mem-efficient",
          torch.backends.cuda.mem_efficient_sdp_enabled())
import transformers, zarr, numcodecs, segment_anything, pycocotools.mask   # the carried packages import
from transformers import LlavaForConditionalGeneration                  # noqa: F401
import stages.generate, stages.segment, stages.capture                 # noqa: F401
print("imports OK: transformers", transformers.__version__, "zarr", zarr.__version__, "from",
      transformers.__file__)
print("flash_attn importable:", importlib.util.find_spec("flash_attn") is not None)
EOF
}

export MODE PY
export -f env_report
step env 60 bash -c env_report

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# shellcheck disable=SC2086
step pytest_gpu 120 "$PY" -m pytest -p no:cacheprovider -q -m gpu -rs $TEST_FILES
# shellcheck disable=SC2086
step gpu_paths 150 "$PY" bench/gpu_paths.py --workdir /tmp/aas-gpu-paths $PATHS_ARGS
# shellcheck disable=SC2086
step bench_7b 240 "$PY" bench/bench_7b.py $BENCH_ARGS
# The toy world's training sweep (bench/toy_sweep_plan.json) with whatever budget is left.
step toy_sweep 400 "$PY" bench/toy_sweep.py --out /tmp/aas-toy-sweep --plan "${SWEEP_PLAN:-bench/toy_sweep_plan.json}" \
  $SWEEP_ARGS

{
  echo
  echo "================ SUMMARY ($MODE, $(($(date +%s) - T0)) s) ================"
  printf "%b" "$SUMMARY"
  echo "--- pytest"
  for f in pytest_gpu; do
    [ -f "$OUT/$f.log" ] && echo "$f: $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/$f.log" | tail -1)"
    [ -f "$OUT/$f.log" ] && grep -E '^(FAILED|ERROR|SKIPPED)' "$OUT/$f.log" | head -20
  done
  echo "--- gpu_paths"
  [ -f "$OUT/gpu_paths.log" ] && grep '^RESULT' "$OUT/gpu_paths.log"
  echo "--- toy_sweep"
  [ -f "$OUT/toy_sweep.log" ] && grep -E '^(RESULT|drew)' "$OUT/toy_sweep.log"
  echo "--- bench_7b"
  [ -f "$OUT/bench_7b.log" ] && sed -n '/^RESULT bench_7b/,$p' "$OUT/bench_7b.log" | grep -v '^  runs'
  [ -f "$OUT/bench_7b.log" ] && grep -E '^(built|init|batch [0-9]|eager check)' "$OUT/bench_7b.log"
} 2>&1 | tee "$OUT/summary.txt"
echo "steps not OK:${FAILED_STEPS:- none}" | tee -a "$OUT/summary.txt"
[ -z "$FAILED_STEPS" ]
