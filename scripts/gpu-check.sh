#!/usr/bin/env bash
# GPU check for the kernels (issue 5): build against the device's LibTorch, run the gpu-labelled tests, one
# compute-sanitizer memcheck pass over the CUDA test binary, and the CUDA benchmarks; everything lands in $OUT.
#
# Prepared here, run there. On the dev machine, once:   ../shared/scripts/gpu-deps.sh      (fills .deps/)
# Then through the device tool, from the repo root, in two calls on the same warm machine (the build directory
# stays there between calls):
#   run(command="bash scripts/gpu-check.sh test",  carry=[".deps"], timeout_s=570)   # build, ctest -L gpu, memcheck
#   run(command="bash scripts/gpu-check.sh bench", carry=[".deps"], timeout_s=520)   # (re)build if needed, benchmarks
# or `all` in one call when time allows. Budget (15 min of device time per session, each call ≤ 10 min): build
# ~2–3 min on 16 cores, tests ~1 min, memcheck ≤ 150 s (capped), benchmarks ≤ 2×150 + 120 s (capped). Every step is capped
# with `timeout` so a hang cannot eat the whole call.
#
# The full project needs OpenCV and sentencepiece development files that the device image lacks, so this builds
# scripts/gpu-check/CMakeLists.txt: kernels/, the packed linear + CUDA adapter, the decoder and generation loop
# (for the CUDA-graph decode test, on random weights), their tests and an `eqat` with the bench subcommand only.
#
# Files written to $OUT (at most 8 come back): summary.txt, build.log, ctest.txt, memcheck.txt,
# bench_kernels_cuda.json, bench_decode_cuda.json, bench_decode_unfused_cuda.json, nvidia-smi.txt.
set -uo pipefail
STAGE=${1:-all}
case $STAGE in all | test | bench) ;; *) echo "usage: gpu-check.sh [all|test|bench]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }
step() {  # step NAME TIMEOUT_S LOGFILE CMD...: run, record status and duration
  local name=$1 limit=$2 logf=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logf" 2>&1
  local rc=$?
  log "$name: rc=$rc in $((SECONDS - t0)) s (log: $(basename "$logf"))"
  return $rc
}

log "start on $(hostname)"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
PY=$(command -v python3)
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null) || {
  log "FATAL: python3 has no torch"; exit 1; }
log "torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))' 2>&1)"
DEPS=$ROOT/.deps/prefix/usr
[ -d "$DEPS" ] || log "WARNING: .deps/ missing (run ../shared/scripts/gpu-deps.sh here and carry .deps)"
export LD_LIBRARY_PATH="$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"
B=$ROOT/build-gpu-check
JOBS=$(nproc)

step configure 120 "$OUT/build.log" \
  cmake -S scripts/gpu-check -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEQAT_CUDA_ARCHS=90a \
        "-DCMAKE_PREFIX_PATH=$DEPS;$TORCH_PREFIX" \
        -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" || { log "FATAL: configure failed"; tail -30 "$OUT/build.log" >>"$SUMMARY"; exit 1; }
t0=$SECONDS
timeout 300 cmake --build "$B" -j "$JOBS" >>"$OUT/build.log" 2>&1
rc=$?
log "build: rc=$rc in $((SECONDS - t0)) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log" >>"$SUMMARY"; exit 1; }

if [ "$STAGE" != bench ]; then
# 1. The gpu-labelled tests (CUDA kernels vs the fp32 reference; also the CPU qmatmul/pack tests, all labelled gpu).
(cd "$B" && step ctest 180 "$OUT/ctest.txt" ctest -L gpu --output-on-failure)
grep -E "tests passed|tests failed|Skipped|Failed" "$OUT/ctest.txt" | tail -15 >>"$SUMMARY"

# 2. compute-sanitizer memcheck once over the CUDA tests (the big sweep is slow under memcheck: capped).
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null || true)
if [ -n "$CS" ]; then
  # The full GEMV sweep is slow under memcheck; the Llama shapes, prefill, dequant, backward and graph tests cover
  # every kernel and every bit width with large and odd sizes.
  step memcheck 150 "$OUT/memcheck.txt" "$CS" --tool memcheck --leak-check no --error-exitcode 3 \
    "$B/bin/kernels_tests" --gtest_filter='Kernels.*:-Kernels.GemvMatchesReference_CUDA'
  grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.txt" | tail -5 >>"$SUMMARY"
else
  log "compute-sanitizer not found"
fi

fi

# 3. Benchmarks (JSON with device name and date).
[ "$STAGE" = test ] && { log "done (test stage)"; exit 0; }
step bench_kernels 150 "$OUT/bench_kernels_cuda.json" "$B/bin/eqat" bench kernels --device cuda --json --m 1,4,16,640
step bench_decode 150 "$OUT/bench_decode_cuda.json" "$B/bin/eqat" bench decode --device cuda --json
# The same with q/k/v and gate/up as five separate linears: what the merge (MergedPackedLinear) buys.
step bench_decode_unfused 120 "$OUT/bench_decode_unfused_cuda.json" "$B/bin/eqat" bench decode --device cuda --json \
  --unfused --formats W4g128,W2g64
"$PY" - "$OUT" >>"$SUMMARY" 2>&1 <<'PYEOF'
import json, sys, os
out = sys.argv[1]
try:
    k = json.load(open(os.path.join(out, "bench_kernels_cuda.json")))
    print("kernels:", k["device"], k["date"], "copy GB/s %.0f" % k["d2d_copy_gbps"])
    for r in k["results"]:
        if r["M"] == 1 and r["shape"] == "4096x4096" or (r["M"] == 1 and r["format"] != "fp16"):
            print("  %-11s M=%-3d %-7s %8.1f us %7.0f GB/s %5.1f%% copy  x%.2f" % (
                r["shape"], r["M"], r["format"], r["us"], r["gbps"], r["pct_of_copy_bw"], r["speedup_vs_baseline"]))
except Exception as e:
    print("kernels JSON unreadable:", e)
for name in ("bench_decode_cuda.json", "bench_decode_unfused_cuda.json"):
    try:
        d = json.load(open(os.path.join(out, name)))
        for r in d["results"]:
            print("  decode%s %-7s prefill %.1f ms  %.0f tok/s  %.0f%% copy bw  peak %.1f GB" % (
                "" if d.get("fused_qkv_gate_up", True) else " (unfused)", r["format"], r["prefill_ms"],
                r["decode_tok_s"], r["pct_of_copy_bw"], r["peak_memory_gb"]))
    except Exception as e:
        print(name, "unreadable:", e)
PYEOF
log "done"
