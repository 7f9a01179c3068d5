#!/usr/bin/env bash
# The whole chain on the built-in synthetic data, on CPU, in minutes:
#   synthetic ImageNet folders -> MoCo smoke pretraining (configs/pretrain/smoke.yaml) -> conversion (Detectron2 + torchvision)
#   -> transfer suite (--preset smoke) for the MoCo weights and a random-init baseline -> tables.
#
#   bash tools/smoke.sh [OUT]          (default OUT: results/smoke)
#
# Full-scale recipes use the same scripts with the paper's configs; see README.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-results/smoke}"
PYTHON="${PYTHON:-python}"
TASKS="${TASKS:-voc07_det,coco_c4_1x,voc_semseg,imagenet_linear,imagenet_linear_fast,imagenet_knn}"
DATA="$OUT/data"

"$PYTHON" tools/make_synthetic_data.py --root "$DATA" --kinds imagenet
"$PYTHON" tools/train_moco.py --config configs/pretrain/smoke.yaml --resume auto \
  data.root="$DATA/imagenet" knn.train_root="$DATA/imagenet/train" knn.val_root="$DATA/imagenet/val" \
  run.output_dir="$OUT/pretrain"
"$PYTHON" tools/convert_to_d2.py "$OUT/pretrain/checkpoint_last.pth" "$OUT/weights/moco_smoke.pkl"
"$PYTHON" tools/convert_to_d2.py "$OUT/pretrain/checkpoint_last.pth" "$OUT/weights/moco_smoke.pth" \
  --format torchvision
# transfer data (VOCdevkit, ImageNet folders) is generated under $OUT/transfer/_synthetic_data
"$PYTHON" transfer/run_all.py --weights "$OUT/weights/moco_smoke.pth" --name moco_smoke \
  --preset smoke --tasks "$TASKS" --output "$OUT/transfer" --no-report
"$PYTHON" transfer/run_all.py --weights random --arch resnet18 --name random \
  --preset smoke --tasks "$TASKS" --output "$OUT/transfer" --no-report
"$PYTHON" tools/make_tables.py "$OUT/transfer" --baseline random
echo "tables: $OUT/transfer/tables.md"
