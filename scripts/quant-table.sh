#!/usr/bin/env bash
# Reproduces the issue-4 accuracy tables (numbers quoted in models/SOURCES.md and the issue notes).
#   shapes:   FP vs RTN / GPTQ / EfficientQAT at W4g128, W3g128, W2g64 on the default model's standard
#             1000-question test split (`eqat eval --bench shapes`), calibration from the model's world (seed 2,
#             disjoint from the test split), plus the answer-token KL(FP || quantized) on the same questions
#             (teacher-forced ground-truth answers: a finer measure than exact match). W2g128 is an extra row
#             beyond the issue's three settings (SETTINGS overrides the list).
#   stories:  stories260K at W2g64, W3g64 and per-channel W2/W3/W4 (its 172-wide down_proj gets a ragged last group
#             at g64), mean KL(FP || quantized) of the next-token distributions on
#             tinyshakespeare: calibration windows from the first 90 % of the file, evaluation windows from the
#             last 10 % (no overlap).
# Usage: scripts/quant-table.sh [shapes|stories|all] (eqat from build/bin; EQAT=... to override). Besides the
# markdown tables on stdout, every row goes to JSON: RESULTS (default bench/results/quant_table_cpu_DATE.json).
# Settings: SAMPLES (shapes calibration conversations, default 1024), THREADS (default 0: the idle cores),
#           SETTINGS (shapes "bits group;…", default "4 128;3 128;2 64;2 128"), STORIES_SETTINGS (default
#           "2 64;3 64;2 -1;3 -1;4 -1"), SEED (--seed of every quantize: the calibration draw, default 2),
#           METHODS (the columns, default all seven below). EfficientQAT runs five times: eqat's defaults, Block-AP
#           from GPTQ's integers (--init gptq), from GPTQ's unrounded weights (--init gptq-unrounded, the default
#           since 2026-12-03), from the clip search (--init mse) and the paper's recipe (--init minmax --e2e-loss ce).
# Every eval runs with --exact-activations: the scores measure the weights' quantization, not the int8 activations
# of the AVX-512 VNNI serving kernel (measured: GPTQ W2g64's answer KL 0.000401 exact, 0.000411 through VNNI).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EQAT="${EQAT:-$ROOT/build/bin/eqat}"
OUT="$ROOT/build/quant-table"
WHAT="${1:-all}"
SAMPLES="${SAMPLES:-1024}"
SEED="${SEED:-2}"
THREADS="${THREADS:-0}"
SETTINGS="${SETTINGS:-4 128;3 128;2 64;2 128}"
STORIES_SETTINGS="${STORIES_SETTINGS:-2 64;3 64;2 -1;3 -1;4 -1}"
METHODS="${METHODS:-rtn gptq efficientqat efficientqat-gptq efficientqat-gptq-unrounded efficientqat-mse efficientqat-paper}"
RESULTS="${RESULTS:-$ROOT/bench/results/quant_table_cpu_$(date -u +%F).json}"
mkdir -p "$OUT"
: > "$OUT/eval.log"
: > "$OUT/rows.jsonl"
# One JSON row per quantized model: row MODEL SETTING METHOD SCORES_JSON [QUANTIZE_SECONDS]
row_json() {
  python3 - "$@" >> "$OUT/rows.jsonl" <<'PY'
import json, sys
model, setting, method, scores = sys.argv[1:5]
r = {"model": model, "setting": setting, "method": method, "scores": json.load(open(scores))}
if len(sys.argv) > 5:
    r["quantize_seconds"] = int(sys.argv[5])
print(json.dumps(r))
PY
}
write_results() {
  python3 - "$OUT/rows.jsonl" "$RESULTS" "$ROOT" "$SAMPLES" "$THREADS" "$SEED" <<'PY'
import datetime, json, os, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=sys.argv[3]).stdout.strip()
out = {"benchmark": "quant-table", "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
       "commit": commit, "cores": len(os.sched_getaffinity(0)), "shapes_samples": int(sys.argv[4]),
       "threads": int(sys.argv[5]), "seed": int(sys.argv[6]), "command": "scripts/quant-table.sh", "rows": rows}
tmp = sys.argv[2] + ".tmp"
json.dump(out, open(tmp, "w"), indent=1)
os.replace(tmp, sys.argv[2])
PY
}
# The quantize flags of a table column: eqat's methods at their defaults (EfficientQAT distils in E2E-QP), plus
# EfficientQAT from GPTQ's integers, from the clip search (--init mse) and the paper's recipe.
method_flags() {
  case $1 in
    efficientqat-gptq) flags=(--method efficientqat --init gptq) ;;
    efficientqat-mse) flags=(--method efficientqat --init mse) ;;
    efficientqat-gptq-unrounded) flags=(--method efficientqat --init gptq-unrounded) ;;
    efficientqat-paper) flags=(--method efficientqat --init minmax --e2e-loss ce) ;;
    *) flags=(--method "$1") ;;
  esac
}
field() { sed -n "s/^  \"$2\": \([-0-9.e]*\),*\$/\1/p" "$1" | head -1; }

if [[ $WHAT == shapes || $WHAT == all ]]; then
  FP="$ROOT/models/shapes-llava"
  # --overwrite: eval would otherwise continue an earlier run's answer file
  "$EQAT" eval --bench shapes --model "$FP" --out "$OUT/shapes-fp" --overwrite --batch-size 32 --no-progress --threads "$THREADS" \
    > /dev/null 2>> "$OUT/eval.log"
  fp=$(field "$OUT/shapes-fp/scores.json" accuracy)
  row_json shapes-llava fp16 fp "$OUT/shapes-fp/scores.json"
  echo "| setting | method | accuracy | Δ vs FP (pt) | answer KL vs FP (± s.e.; median) | answer top-1 agreement % | quantize s |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  echo "| fp16 | — | $fp | — | 0 | 100 | — |"
  IFS=';' read -ra settings <<< "$SETTINGS"
  for setting in "${settings[@]}"; do
    set -- $setting
    for method in $METHODS; do
      q="$OUT/shapes-w$1g$2-$method"
      method_flags "$method"
      t=$SECONDS
      "$EQAT" quantize --out "$q" --overwrite --bits "$1" --group-size "$2" "${flags[@]}" --samples "$SAMPLES" --seed "$SEED" \
        --threads "$THREADS" --no-progress > "$q.log" 2>&1 || { cat "$q.log"; exit 1; }
      dt=$((SECONDS - t))
      "$EQAT" eval --bench shapes --model "$q" --reference "$FP" --out "$q-eval" --overwrite --batch-size 32 --no-progress \
        --threads "$THREADS" --exact-activations > /dev/null 2>> "$OUT/eval.log"
      row_json shapes-llava "W$1g$2" "$method" "$q-eval/scores.json" "$dt"
      acc=$(field "$q-eval/scores.json" accuracy)
      kl=$(field "$q-eval/scores.json" answer_kl_mean)
      se=$(field "$q-eval/scores.json" answer_kl_sem)
      md=$(field "$q-eval/scores.json" answer_kl_median)
      ag=$(field "$q-eval/scores.json" answer_top1_agreement)
      # A few questions carry most of the mean; compare two rows question by question with bench/kl_paired.py.
      echo "| W$1g$2 | $method | $acc | $(awk -v a="$acc" -v b="$fp" 'BEGIN{printf "%+.1f", 100*(a-b)}') |" \
        "$(awk -v k="$kl" -v e="$se" -v m="$md" 'BEGIN{printf "%.2e ± %.1e; %.1e", k, e, m}') |" \
        "$(awk -v k="$ag" 'BEGIN{printf "%.2f", k}') | $dt |"
    done
  done
fi

if [[ $WHAT == stories || $WHAT == all ]]; then
  S="$OUT/stories260K"
  "$EQAT" convert llama2c --checkpoint "$ROOT/tests/data/models/stories260K/stories260K.bin" \
    --tokenizer "$ROOT/tests/data/models/stories260K/tok512.bin" --out "$S" --overwrite > /dev/null 2>> "$OUT/eval.log"
  TXT="$ROOT/tests/data/text/tinyshakespeare.txt"
  n=$(wc -c < "$TXT")
  head -c $((n * 9 / 10)) "$TXT" > "$OUT/shakespeare-calib.txt"
  tail -c $((n - n * 9 / 10)) "$TXT" > "$OUT/shakespeare-eval.txt"
  echo
  echo "| setting |$(for m in $METHODS; do printf ' %s KL |' "$m"; done)"
  echo "|---|$(for m in $METHODS; do printf -- '---:|'; done)"
  IFS=';' read -ra ssettings <<< "$STORIES_SETTINGS"
  for setting in "${ssettings[@]}"; do
    set -- $setting
    bits=$1 group=$2
    row="| W${bits}g${group} |"
    [[ $group == -1 ]] && row="| W$bits per-channel |"
    for method in $METHODS; do
      q="$OUT/stories-w${bits}g$group-$method"
      method_flags "$method"
      "$EQAT" quantize --model "$S" --out "$q" --overwrite --bits "$bits" --group-size "$group" "${flags[@]}" --seed "$SEED" \
        --calib "$OUT/shakespeare-calib.txt" --samples 512 --seq-len 256 --epochs "${STORIES_EPOCHS:-2}" \
        --threads "$THREADS" --no-progress > "$q.log" 2>&1 || { cat "$q.log"; exit 1; }
      "$EQAT" eval --bench kl --model "$q" --reference "$S" --data "$OUT/shakespeare-eval.txt" --seq-len 256 \
        --limit 64 --out "$q-kl" --overwrite --no-progress --threads "$THREADS" --exact-activations > /dev/null 2>> "$OUT/eval.log"
      row_json stories260K "W${bits}g$group" "$method" "$q-kl/scores.json"
      row="$row $(awk -v k="$(field "$q-kl/scores.json" kl_mean)" 'BEGIN{printf "%.4f", k}') |"
    done
    echo "$row"
  done
fi
write_results
echo "rows: $RESULTS" >&2
