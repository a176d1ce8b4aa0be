#!/usr/bin/env bash
# The GPU measurements the open issues wait for, as one script for a machine with one CUDA GPU and a short lease:
# the GPU-only tests, benchmarks/speed.py on the authors' network at the paper's size (issue 11, item 2), the data
# time of NYUv2-size files read by loader workers against a step (item 2d), one epoch of the paper preset for STN,
# One-Net and MTSL (item 3's wall-clock, a first look), and the compact network compiled. Every step has its own
# time limit and writes its output to $OUT/<step>.txt, so a step that fails or runs out of time leaves the others.
#
#   OUT=gpu-results bash benchmarks/gpu_checks.sh              # on the GPU machine, from the repository root
#   OUT=/tmp/dry bash benchmarks/gpu_checks.sh --dry-run        # the same commands on the CPU at toy sizes
#
# Needs the package installed (README, Install); checkpoints are deleted at the end (only the numbers matter).
set -uo pipefail
OUT=${OUT:?set OUT to the folder the results go to}
mkdir -p "$OUT"
if [[ "${1:-}" == "--dry-run" ]]; then
  DEVICE=cpu; SIZE=(--height 32 --width 32); BATCH=4; STEPS=1; DATA=(--height 32 --width 32 --batch 4)
  FILES=32x32; PRESET=smoke; LIMIT=600
else
  DEVICE=cuda; SIZE=(--height 256 --width 512); BATCH=16; STEPS=20; DATA=(--height 288 --width 384 --batch 8)
  FILES=288x384; PRESET=paper; LIMIT=200
fi

step() {  # step <name> <seconds> <command...>: run it under a time limit, output to $OUT/<name>.txt
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${seconds} s)"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? ($(tail -n 1 "$OUT/$name.txt" | cut -c1-120))"
}

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; python -c "import torch; print('torch', torch.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
if [[ $DEVICE == cuda ]]; then
  step gpu_tests 240 python -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py tests/network/test_branched.py \
    tests/test_backbone_breadth.py -k "cuda or gpu"
fi
step speed_authors 240 python benchmarks/speed.py --device "$DEVICE" --network authors "${SIZE[@]}" --batch "$BATCH" \
  --steps "$STEPS"
root="$OUT/nyuv2-like"
python - "$root" "$FILES" <<'EOF'
import sys
from pathlib import Path

import numpy as np

root, (h, w) = Path(sys.argv[1]), map(int, sys.argv[2].split("x"))
rng = np.random.default_rng(0)
for split, n in (("train", 96), ("val", 4)):  # random samples in the NYUv2 layout: reading and augmenting cost alike
    for folder, shape, draw in (("image", (h, w, 3), lambda s: rng.uniform(0, 1, s)),
                                ("label", (h, w), lambda s: rng.integers(-1, 13, s)),
                                ("depth", (h, w, 1), lambda s: rng.uniform(0.5, 8, s)),
                                ("normal", (h, w, 3), lambda s: rng.normal(size=s))):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / folder / f"{i}.npy", draw(shape).astype(np.float32))
EOF
step speed_nyuv2_workers 240 python benchmarks/speed.py --device "$DEVICE" --plans onenet "${DATA[@]}" --steps "$STEPS" \
  --dataset nyuv2 --data-root "$root"
step speed_nyuv2_main_process 240 python benchmarks/speed.py --device "$DEVICE" --plans onenet "${DATA[@]}" \
  --steps "$STEPS" --dataset nyuv2 --data-root "$root" --workers 0
rm -rf "$root"
printf 'epochs: 2\nlr_steps: []\nmtsl: {phases: 1}\n' > "$OUT/one_epoch.yaml"
step paper_one_epoch "$LIMIT" python benchmarks/compare.py --preset "$PRESET" --config "$OUT/one_epoch.yaml" \
  --methods stn,onenet,mtsl --device "$DEVICE" --no-progress --out "$OUT/paper1"
if [[ $DEVICE == cuda ]]; then  # compiling takes minutes on a CPU
  step speed_compact_compiled 150 python benchmarks/speed.py --device "$DEVICE" "${SIZE[@]}" --batch "$BATCH" \
    --steps 5 --compile
fi
find "$OUT" -name '*.pt' -delete
