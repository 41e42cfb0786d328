#!/usr/bin/env bash
# The demo, end to end on the built-in synthetic scrolls (2 CPU cores, a few minutes):
# synthetic data -> data check -> datalist -> training (demo.json) -> inference on held-out volumes
# -> submission.zip -> competition score table -> PNGs (prediction overlay, loss curves).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo_out}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
CONFIGS="['bundle/configs/train.json','bundle/configs/demo.json']"

echo "== 1/7 synthetic scrolls -> $OUT/data"
python -m custom_components.data.synthetic --out "$OUT/data" --volumes 6 --test 2 --test_labels \
    --profile 34117 --shape 64 64 64 --seed 0 --preview
echo "== 2/7 data check"
python -m custom_components.data.validate_data --data_root "$OUT/data"
echo "== 3/7 datalist (the committed data_lists/demo.json is this file)"
python -m custom_components.data.datalist --data_root "$OUT/data" --out "$OUT/datalist.json" --val_fraction 0.34 --seed 0
cmp -s "$OUT/datalist.json" data_lists/demo.json || echo "note: data_lists/demo.json differs from the datalist just made"
echo "== 4/7 training"
python -m monai.bundle run training --config_file "$CONFIGS" \
    --dataset_dir "$OUT/data" --output_dir "$OUT/run" --overwrite true
echo "== 5/7 inference on the held-out volumes -> $OUT/predictions (+ submission.zip)"
python -m monai.bundle run --config_file "['bundle/configs/inference.json','bundle/configs/demo_inference.json']" \
    --dataset_dir "$OUT/data" --output_dir "$OUT/predictions" \
    --ckpt_path "$OUT/run/models/model.pt"
echo "== 6/7 competition score of the held-out volumes"
python -m custom_components.metrics.evaluate --pred_dir "$OUT/predictions" --label_dir "$OUT/data/test_labels" \
    --out "$OUT/scores.csv" --workers 2
echo "== 7/7 pictures"
python -m custom_components.inference.report --run_dir "$OUT/run" --image_dir "$OUT/data/test_images" \
    --pred_dir "$OUT/predictions" --label_dir "$OUT/data/test_labels" --out "$OUT"
echo "demo done: $OUT/scores.csv, $OUT/predictions/submission.zip, $OUT/overlay.png, $OUT/loss_curves.png"
