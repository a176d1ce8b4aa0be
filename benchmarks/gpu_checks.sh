#!/usr/bin/env bash
# The GPU measurements the open issues wait for, as one script for a machine with one CUDA GPU and a short lease,
# in the order they are wanted (a lease that ends early leaves the first): benchmarks/speed.py on the authors'
# network at the paper's size (issue 11, item 2), one epoch of the paper preset for STN, One-Net and MTSL (item 3's
# wall-clock, a first look), the data time of NYUv2-size files read by loader workers against a step and the
# training loop's step over them (item 2d: does reading overlap the device's step?), the GPU-only tests, and the
# compact network compiled. Every step has its own time limit and writes its output to $OUT/<step>.txt, so a step
# that fails or runs out of time leaves the others.
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
step speed_authors 240 python benchmarks/speed.py --device "$DEVICE" --network authors "${SIZE[@]}" --batch "$BATCH" \
  --steps "$STEPS"
printf 'epochs: 2\nlr_steps: []\nmtsl: {phases: 1}\n' > "$OUT/one_epoch.yaml"
step paper_one_epoch "$LIMIT" python benchmarks/compare.py --preset "$PRESET" --config "$OUT/one_epoch.yaml" \
  --methods stn,onenet,mtsl --device "$DEVICE" --no-progress --out "$OUT/paper1"
find "$OUT/paper1" -name '*.pt' -delete  # a lease that ends later must not send gigabytes of checkpoints back
root="$OUT/nyuv2-like"
# random samples in the NYUv2 layout (reading and augmenting cost alike), written as the tests write theirs
TORCHINDUCTOR_CACHE_DIR="$OUT/inductor" python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path
from conftest import write_nyuv2
write_nyuv2(Path(sys.argv[1]), n_train=96, n_val=4, size=tuple(map(int, sys.argv[2].split('x'))))" "$root" "$FILES"
step speed_nyuv2_workers 240 python benchmarks/speed.py --device "$DEVICE" --plans onenet "${DATA[@]}" --steps "$STEPS" \
  --dataset nyuv2 --data-root "$root"
step speed_nyuv2_main_process 240 python benchmarks/speed.py --device "$DEVICE" --plans onenet "${DATA[@]}" \
  --steps "$STEPS" --dataset nyuv2 --data-root "$root" --workers 0
rm -rf "$root" "$OUT/inductor"
if [[ $DEVICE == cuda ]]; then  # the GPU-only tests; compiling takes minutes on a CPU
  step gpu_tests 240 python -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py tests/network/test_branched.py \
    tests/test_backbone_breadth.py -k "cuda or gpu"
  step speed_compact_compiled 150 python benchmarks/speed.py --device "$DEVICE" "${SIZE[@]}" --batch "$BATCH" \
    --steps 5 --compile
fi
find "$OUT" -name '*.pt' -delete
