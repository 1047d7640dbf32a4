#!/usr/bin/env bash
# The demo behind `make demo` (after setup and build). Argument: the eqat binary.
# The main job, on the embedded default model (models/shapes-llava):
#   1. EfficientQAT W2g64 (Block-AP on image-text calibration data from the model's world, then E2E-QP), with the
#      progress shown;
#   2. the demo questions answered by the full-precision and the 2-bit model side by side;
#   3. both models' accuracy on the standard 1000-question test split and their size on disk.
# Then a real pretrained Llama (stories260K, llama2.c format) is converted and tells a story.
# DEMO_SAMPLES (default 1024) sets the calibration conversations.
set -euo pipefail
EQAT="${1:-build/bin/eqat}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/build/demo"
FP="$ROOT/models/shapes-llava"
Q="$OUT/shapes-llava-w2g64"
mkdir -p "$OUT"
hr() { printf '\n== %s ==\n' "$1"; }
t0=$SECONDS

hr "eqat quantize: EfficientQAT W2g64 of the default model (Block-AP + E2E-QP)"
"$EQAT" quantize --out "$Q" --overwrite --bits 2 --group-size 64 --samples "${DEMO_SAMPLES:-1024}"

hr "the demo questions: full precision vs EfficientQAT W2g64"
for img in "$FP"/demo/*.png; do
  echo "image: ${img#$ROOT/}"
  # Questions every image can answer, asked plainly (the model also learned LLaVA's answer-format lines, but a
  # quarter of its stage-2 training questions came without them).
  for q in "Describe the image in one sentence." "How many shapes are there?" "Is there a red square in the image?"; do
    fp=$("$EQAT" ask --image "$img" --max-new-tokens 48 "$q" 2>/dev/null)
    w2=$("$EQAT" ask --model "$Q" --image "$img" --max-new-tokens 48 "$q" 2>/dev/null)
    printf '  Q: %s\n     fp16 : %s\n     W2g64: %s\n' "$q" "$fp" "$w2"
  done
done

hr "accuracy on the standard shapes test split (1000 questions) and size on disk"
acc() { sed -n 's/^  "accuracy": \([0-9.]*\),*$/\1/p' "$1/scores.json" | head -1; }
for m in fp16 W2g64; do
  dir=$FP; [[ $m == W2g64 ]] && dir=$Q
  "$EQAT" eval --bench shapes --model "$dir" --out "$OUT/eval-$m" --overwrite --batch-size 32 --no-progress > /dev/null
done
printf '%-8s %10s %22s\n' model accuracy "model.safetensors (B)"
printf '%-8s %10s %22s\n' fp16 "$(acc "$OUT/eval-fp16")" "$(stat -c %s "$FP/model.safetensors")"
printf '%-8s %10s %22s\n' W2g64 "$(acc "$OUT/eval-W2g64")" "$(stat -c %s "$Q/model.safetensors")"
echo "(decoder linears at W2g64: 2.28 bits per weight; embeddings, lm_head, vision tower and projector stay fp16)"
echo "per-family scores: $OUT/eval-*/scores.json; quantization summary: $Q/eqat_quantize_summary.json"

hr "eqat convert llama2c: stories260K (a real pretrained Llama, GQA, shared classifier) tells a story"
"$EQAT" convert llama2c --checkpoint "$ROOT/tests/data/models/stories260K/stories260K.bin" \
  --tokenizer "$ROOT/tests/data/models/stories260K/tok512.bin" --out "$OUT/stories260K" --overwrite > /dev/null
"$EQAT" generate --model "$OUT/stories260K" --max-new-tokens 200 ""
echo
echo "demo finished in $((SECONDS - t0)) s"
