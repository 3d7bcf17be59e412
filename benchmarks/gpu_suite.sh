#!/usr/bin/env bash
# The one-shot GPU suite: everything worth knowing from a short lease on a GPU machine.
#
#   bash benchmarks/gpu_suite.sh [--out DIR] [--dry-run] [--tune]
#
# Stages, each under `timeout` and a share of one wall-clock budget (SUITE_BUDGET_S seconds,
# default 480: the whole suite ends within 8 minutes on an H200):
#   1. install: wheels from a git-ignored wheels/ folder if present (peers such as liger-kernel
#      and cut-cross-entropy for a machine without network), then the package with its CUDA
#      extension: pip install --no-build-isolation --no-deps -e .
#   2. the device and measured ceilings: a large device-to-device copy (GB/s, bytes read plus
#      written) and an 8192^3 bf16 GEMM (TFLOP/s), on random data after warm-up;
#   3. pytest tests/ -m "gpu and not sweep" (the dedicated GPU tests; at most 120 s, and never
#      into the last 200 s, which are the benchmarks'), in parallel workers with pytest-xdist;
#   4. pytest benchmarks/ --full with --benchmark-json into DIR; points that would start after the
#      budget are skipped by the suite itself (--budget-s), so a cut run still writes its JSON;
#   5. benchmarks/report.py: DIR/results.md and plots, from the JSON or, when a cut run wrote
#      none, from DIR/points.jsonl (each point as it finished);
#   6. compute-sanitizer --tool memcheck on benchmarks/cuda_memcheck.py (without torch's caching
#      allocator; at most 45 s, kept free of the benchmarks), when that script exists, the CUDA
#      extension imports, compute-sanitizer is on the PATH and the machine is not gVisor (whose
#      sanitizer refuses the device); then pytest -m sweep (every test of the backend fixture
#      again on device="cuda") in what time is left, if 60 s or more (running out of time there
#      is "cut", not a failure; a second call can run it: pytest tests/ -m sweep). The compact
#      summary table is printed LAST.
# On a leased GPU machine whose outer time limit is L seconds: SUITE_BUDGET_S=$((L - 60)) and
# --out under the folder that comes back; carry wheels/ along for the peers.
# Everything printed is also written to DIR/suite.log. Exit status: 0 when every stage that ran
# passed (a stage skipped for lack of time or tools counts as passed, and says so).
#
# --tune: install and ceilings, then only benchmarks/tune_triton.py (the Triton launch configs
# timed at the Qwen3-8B head, JSON into DIR/tune.json) with the rest of the budget: for a second
# call once the full suite has run.
#
# --dry-run (a machine without a GPU): no installs and no GPU tests; the ceilings on the CPU
# (small sizes), two small CPU benchmark points, the report and the summary, so the script stays
# tested (tests/test_gpu_suite_dryrun.py).
#
# To bring peers to a machine without network, beforehand on one with it: make wheels
#   (the peers liger-kernel, cut-cross-entropy and trl, and what trl's backward imports that the
#   GPU image lacks: datasets, dill, multiprocess; all for the GPU machine's Python 3.12)
set -u -o pipefail

OUT_DIR=""
DRY=0
TUNE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
    --out=*) OUT_DIR="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --tune) TUNE=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1' (use --out DIR, --dry-run, --tune)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
BUDGET="${SUITE_BUDGET_S:-480}"
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_suite.sh: SUITE_BUDGET_S must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
[ -n "$OUT_DIR" ] || OUT_DIR="benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# the last lines reach the log and the caller before the script ends: close the pipe into tee,
# then wait for it to drain
finish() { exec 1>&- 2>&-; wait "$TEE_PID" 2> /dev/null; exit "$1"; }
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
if [ "$DRY" != 1 ]; then  # nvcc (setup.py) and compute-sanitizer where CUDA is not on PATH
  CUDA_DIR="${CUDA_HOME:-/usr/local/cuda}"
  for d in "$CUDA_DIR/bin" "$CUDA_DIR/compute-sanitizer"; do
    [ -d "$d" ] && case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
  done
  export PATH
fi

T0=$SECONDS
STAGES=()
FAILED=0
left() { echo $(( BUDGET - (SECONDS - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# stage NAME CAP_SECONDS RESERVE_SECONDS cmd...: run cmd under timeout min(CAP, left - RESERVE);
# skipped when that leaves under MIN_S seconds (default 5; a pytest stage needs ~60 to collect
# and run anything); with SOFT=1 running out of time is "cut (budget)", not a failure, unless
# pytest had already reported a FAILED or ERROR test: "cut, N failed"
stage() {
  local name="$1" cap="$2" reserve="$3"; shift 3
  local lim t1 rc
  lim=$(min "$cap" $(( $(left) - reserve )))
  if [ "$lim" -lt "${MIN_S:-5}" ]; then
    echo "== $name: skipped (time budget: $(left)s left)"
    STAGES+=("$(printf '%-12s %-28s %5s' "$name" "skipped (budget)" "0")")
    return 0
  fi
  echo "== $name (limit ${lim}s, $(left)s of ${BUDGET}s left)"
  t1=$SECONDS
  # the output is also kept, to count what pytest failed before a cut
  local log; log="$(mktemp)"
  timeout --signal=INT --kill-after=15 "$lim" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local failed; failed=$(grep -cE '^(FAILED|ERROR) ' "$log"); rm -f "$log"
  local status="ok"
  if { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "${failed:-0}" -gt 0 ]; then
    status="cut, $failed failed, after ${lim}s"; FAILED=1
  elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "${SOFT:-0}" = 1 ]; then status="cut (budget) after ${lim}s"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${lim}s"; FAILED=1
  elif [ "$rc" != 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
  STAGES+=("$(printf '%-12s %-28s %5s' "$name" "$status" "$(( SECONDS - t1 ))")")
  return 0
}

note() {  # a stage that did not need to run
  echo "== $1: $2"
  STAGES+=("$(printf '%-12s %-28s %5s' "$1" "$2" "0")")
}

echo "spot-kernels GPU suite  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  budget ${BUDGET}s  out $OUT_DIR$( [ "$DRY" = 1 ] && echo '  (dry run)')"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')  python $($PY -c 'import sys; print(sys.version.split()[0])')"

# 1. install --------------------------------------------------------------------------------
do_install() {
  set -e
  # a system Python that marks itself externally managed (PEP 668) still takes the install
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  if compgen -G "wheels/*.whl" > /dev/null; then
    echo "installing wheels/: $(cd wheels && ls *.whl | tr '\n' ' ')"
    # a peer that does not install costs its benchmark points, not the package's own build,
    # nor the other peers: when the batch fails, each wheel alone
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation wheels/*.whl ||
      for w in wheels/*.whl; do
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$w" ||
          echo "!! $w did not install: the points that need it will be skipped"
      done
  fi
  # Hopper only unless told otherwise: a quarter of the 4-arch nvcc time
  SPOT_CUDA_ARCHS="${SPOT_CUDA_ARCHS:-90}" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  "$PY" -c "import spot_kernels as sk; print('spot_kernels', sk.__version__, 'backends on cuda:', sk.available_backends('cuda'))"
}
export PY DRY OUT_DIR
export -f do_install
if [ "$DRY" = 1 ]; then
  note install "skipped (dry run)"
else
  stage install 180 60 bash -c do_install
  # setup.py falls back to pure Python when nvcc fails; then say so once, as a failed stage,
  # and let the cuda tests skip with that reason instead of failing one by one
  if CUDA_ERR="$("$PY" -c "import spot_kernels._cuda" 2>&1)"; then
    CUDA_EXT=1
  else
    echo "!! the CUDA extension was not built: $(echo "$CUDA_ERR" | tail -1)"
    STAGES+=("$(printf '%-12s %-28s %5s' cuda-ext "NOT BUILT" "0")")
    FAILED=1
    export SPOT_KERNELS_BUILD_CUDA=0
  fi
fi

# 2. device and ceilings ----------------------------------------------------------------------
do_ceilings() {
  "$PY" - "$DRY" "$OUT_DIR/ceilings.json" <<'EOF'
import json, statistics, sys, time
import torch

dry, path = sys.argv[1] == "1", sys.argv[2]
cuda = torch.cuda.is_available() and not dry
out = {"torch": torch.__version__}
from importlib import metadata
for dist in ("transformers", "liger-kernel", "cut-cross-entropy", "trl"):  # the peers' releases
    try:
        out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        out[dist] = None
if cuda:
    p = torch.cuda.get_device_properties(0)
    out.update(device=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 1e9, 1),
               l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
               cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}")
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    copy_bytes, gemm, dtype, dev = 4 * 2**30, 8192, torch.bfloat16, "cuda"
    # a float32 sum of bf16 GEMMs in one call (spot_kernels/_gemm.py), or each product rounded
    acc = torch.zeros(64, 64, device=dev)
    x = torch.randn(64, 64, device=dev, dtype=dtype)
    try:
        torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
        out["fp32_out_addmm"] = True
    except Exception as exc:
        out["fp32_out_addmm"] = f"no ({type(exc).__name__})"
else:
    import os
    out.update(device=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    copy_bytes, gemm, dtype, dev = 64 * 2**20, 512, torch.float32, "cpu"

def timed(fn, reps, warm):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

src = torch.randn(copy_bytes // 4, device=dev)
dst = torch.empty_like(src)
s = timed(lambda: dst.copy_(src), 10 if cuda else 3, 3 if cuda else 1)
out["copy_gbps"] = round(2 * copy_bytes / s / 1e9, 1)
del src, dst
a = torch.randn(gemm, gemm, device=dev, dtype=dtype)
b = torch.randn(gemm, gemm, device=dev, dtype=dtype)
s = timed(lambda: a @ b, 10 if cuda else 3, 3 if cuda else 1)
out["gemm"] = f"{gemm}^3 {str(dtype).replace('torch.', '')}"
out["gemm_tflops"] = round(2 * gemm**3 / s / 1e12, 3)
print(" ".join(f"{k}={v}" for k, v in out.items()))
with open(path, "w") as f:
    json.dump(out, f, indent=1)
EOF
}
export -f do_ceilings
stage ceilings 60 30 bash -c do_ceilings
if command -v nvidia-smi > /dev/null && [ "$DRY" = 0 ]; then
  timeout 10 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader || true
fi

# --tune: only the launch-config timings -------------------------------------------------------
if [ "$TUNE" = 1 ]; then
  TUNE_ARGS=(--out "$OUT_DIR/tune.json")
  [ "$DRY" = 1 ] && TUNE_ARGS+=(--dry-run)
  TLEFT=$(( $(left) - 15 ))
  stage tune "$TLEFT" 15 "$PY" benchmarks/tune_triton.py "${TUNE_ARGS[@]}" \
    --budget-s "$(( TLEFT > 60 ? TLEFT - 40 : TLEFT / 2 ))"
  echo
  echo "================================ summary ================================"
  printf '%-12s %-28s %5s\n' stage status s
  for s in "${STAGES[@]}"; do echo "$s"; done
  echo "total $(( SECONDS - T0 ))s of ${BUDGET}s; files in $OUT_DIR"
  finish $FAILED
fi

# 3. GPU tests ------------------------------------------------------------------------------
# With pytest-xdist (the GPU image has it) the tests run in parallel worker processes sharing
# the one GPU: most of their time is Triton compiling each kernel specialisation on the CPU,
# and a worker that a device fault kills is replaced instead of poisoning the CUDA context of
# every later test. Half the cores, at most 8 (each worker holds a CUDA context and a few GB).
XDIST=()
if "$PY" -c "import xdist" 2> /dev/null; then
  NW=$(( $(nproc 2> /dev/null || echo 2) / 2 ))
  [ "$NW" -gt 8 ] && NW=8
  [ "$NW" -ge 2 ] && XDIST=(-n "$NW")
fi
if [ "$DRY" = 1 ]; then
  note gpu-tests "skipped (dry run: no GPU)"
else
  # the dedicated GPU tests (real sizes, every CUDA kernel, the trainer); the sweep of the whole
  # backend fixture on device="cuda" runs last, with what time the benchmarks leave. At least
  # 200 s stay after them for the benchmarks, the numbers this short lease exists for, with the
  # report (20 s) and memcheck (50 s where it runs) taken out of those (tests cut by that cap
  # are "cut", not failed: the failures before the cut are printed; rerun: pytest -m gpu)
  MIN_S=60 SOFT=1 stage gpu-tests 120 200 "$PY" -m pytest tests/ -m "gpu and not sweep" -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
fi

# 4. benchmarks -----------------------------------------------------------------------------
BENCH_JSON="$OUT_DIR/bench.json"
POINTS="$OUT_DIR/points.jsonl"  # each point as it finishes: survives a kill of the whole call
rm -f "$BENCH_JSON" "$POINTS"
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(benchmarks/test_bench_kernels.py -k "test_fwd and not bwd and N256 and (naive or torch) and not lce" --rounds 1)
else
  BENCH_ARGS=(benchmarks/ --full)
fi
# whether memcheck (stage 6) can run here, decided once: why not, or empty
if [ ! -f benchmarks/cuda_memcheck.py ]; then MEMCHECK_SKIP="skipped (no cuda_memcheck.py)"
elif [ "$DRY" = 1 ]; then MEMCHECK_SKIP="skipped (dry run)"
elif ! command -v compute-sanitizer > /dev/null; then MEMCHECK_SKIP="skipped (no compute-sanitizer)"
elif [ "${CUDA_EXT:-0}" != 1 ]; then MEMCHECK_SKIP="skipped (CUDA extension not built)"
# gVisor reports kernel 4.4.0; compute-sanitizer refuses the device there
elif [ "$(uname -r)" = "4.4.0" ]; then MEMCHECK_SKIP="skipped (gVisor: no sanitizer)"
else MEMCHECK_SKIP=""; fi
MEMCHECK_S=$([ -z "$MEMCHECK_SKIP" ] && echo 50 || echo 0)  # kept free after the benchmarks
BLEFT=$(( $(left) - 20 - MEMCHECK_S ))
# cut by the budget is "cut", not a failure: the points before it are kept (a point started just
# before --budget-s may outrun the 45 s margin: a first Triton compile, the trainer step)
SOFT=1 stage benchmarks "$BLEFT" $(( 20 + MEMCHECK_S )) "$PY" -m pytest "${BENCH_ARGS[@]}" -q -rs -p no:cacheprovider \
  --budget-s "$(( BLEFT > 60 ? BLEFT - 45 : BLEFT / 2 ))" --benchmark-json "$BENCH_JSON" \
  --points "$POINTS" --benchmark-columns=median,rounds

# 5. report and summary (before memcheck and the sweep, so that a kill there keeps them) ----------
SUMMARY=""
SRC=""
# the JSON is written at the end of the run (a kill while writing leaves it cut short): it is
# used only when it parses, else each point as it finished
if [ -s "$BENCH_JSON" ] && "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$BENCH_JSON" 2> /dev/null; then
  SRC="$BENCH_JSON"
elif [ -s "$POINTS" ]; then
  SRC="$POINTS"
fi
if [ -n "$SRC" ]; then
  # results.md (the table and the targets) is written before the plots import matplotlib, whose
  # font cache a fresh machine builds first: a timeout there costs the plots only
  # a report that fails (or runs out of time) is a failed stage of its own: the figures are
  # still in the JSON, but results.md or the summary's targets are missing
  timeout 20 "$PY" benchmarks/report.py "$SRC" --output "$OUT_DIR" > /dev/null ||
    { FAILED=1; note report "FAILED (results.md)"; }
  SUMMARY="$(timeout 15 "$PY" benchmarks/report.py "$SRC" --summary)" ||
    { FAILED=1; note summary "FAILED (report --summary)"; }
else
  SUMMARY="no benchmark points were written"
fi

# 6. CUDA memcheck (after the report: a slow sanitizer costs no benchmark point) -------------
if [ -n "$MEMCHECK_SKIP" ]; then
  note memcheck "$MEMCHECK_SKIP"
else
  # no caching allocator: each tensor its own cudaMalloc, so a read past one is seen
  # API errors are not reported (CUDA 13's loader probes cuGetProcAddress and fails some
  # calls on purpose); device memory errors still fail the stage. Under 30 s it cannot start
  # torch and cuBLAS under the sanitizer: skipped then, and cut (not failed) by the budget
  MIN_S=30 SOFT=1 stage memcheck 45 5 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 1 \
    "$PY" benchmarks/cuda_memcheck.py
fi

# the sweep: every test of the backend fixture again on device="cuda", in what time is left
if [ "$DRY" = 1 ]; then
  note gpu-sweep "skipped (dry run: no GPU)"
else
  MIN_S=60 SOFT=1 stage gpu-sweep 90 10 "$PY" -m pytest tests/ -m sweep -q -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"}
fi

echo
echo "================================ summary ================================"
[ -s "$OUT_DIR/ceilings.json" ] && echo "ceilings: $("$PY" -c 'import json, sys; print(" ".join(f"{k}={v}" for k, v in json.load(open(sys.argv[1])).items()))' "$OUT_DIR/ceilings.json")"
# why benchmark points were skipped (a peer not installed, out of memory, wrong values, the
# budget), as pytest -rs grouped them: a missing row below is explained here
grep '^SKIPPED \[' "$LOG" | sed -e 's/^SKIPPED \[\([0-9]*\)\] [^ ]*: /skipped x\1: /' | cut -c1-160 | head -15
printf '%-12s %-28s %5s\n' stage status s
for s in "${STAGES[@]}"; do echo "$s"; done
echo "total $(( SECONDS - T0 ))s of ${BUDGET}s; files in $OUT_DIR"
echo "$SUMMARY"
finish $FAILED
