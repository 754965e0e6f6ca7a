#!/usr/bin/env bash
# Reproduce the README's results: meta-train a rater in two corruption settings, run the
# downstream filtering comparison for each, evaluate the earlier implementation's published
# checkpoint with the same code, and draw the figures from the runs' files.
#
#   ./reproduce.sh                 # full run (README numbers), writes results/
#   ./reproduce.sh --quick         # the same pipeline on a tiny budget (< 2 min on 2 CPU cores)
#   ./reproduce.sh --out DIR       # write somewhere else
#
# MNIST is read from $DATARATER_DATA (default ./data; downloaded there if missing).
set -euo pipefail
cd "$(dirname "$0")"

quick=0
out=results
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    *) echo "reproduce.sh: unknown argument $1 (expected --quick or --out DIR)" >&2; exit 2 ;;
  esac
done
data="${DATARATER_DATA:-./data}"
py="${PYTHON:-python}"
start=$(date +%s)

if [ "$quick" = 1 ]; then
  budget=(--train-samples 2000 --batch-size 32 --num-inner-models 2 --meta-steps 10 --eval-every 1
          --downstream-seeds 2)
else
  budget=()  # the reference configuration: the defaults of datarater.py
fi

# 1. The reference's setting: 10% of training images corrupted, f ~ U(0.1, 0.9), drop 10%.
"$py" datarater.py --data-dir "$data" --out-dir "$out/pixels" --overwrite "${budget[@]}"

# 2. A harder setting: half the images corrupted, f ~ U(0.5, 1.0), drop half of each batch.
"$py" datarater.py --data-dir "$data" --out-dir "$out/pixels_hard" --overwrite "${budget[@]}" \
  --corruption-prob 0.5 --corruption-min 0.5 --corruption-max 1.0 --discard-fraction 0.5

# 3. The earlier implementation's published rater, evaluated by the same code.
ref=../shared/reference/seed_data_rater.pt
if [ -f "$ref" ]; then
  "$py" datarater.py --data-dir "$data" --eval-only --load-checkpoint "$ref" "${budget[@]}" \
    > "$out/reference_checkpoint_eval.json"
  "$py" datarater.py --data-dir "$data" --downstream-only --load-checkpoint "$ref" "${budget[@]}" \
    --out-dir "$out/reference_checkpoint" --log false > /dev/null
else
  echo "reproduce.sh: $ref not found; skipping the reference checkpoint" >&2
fi

# 4. Figures, from the files the runs wrote.
"$py" datarater.py --figures "$out/pixels" "$out/pixels_hard" --out-dir "$out"

echo "reproduce.sh: done in $(( $(date +%s) - start )) s; results in $out/"
