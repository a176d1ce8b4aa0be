"""Training-step time and peak memory of fixed plans, measured in one run, printed as ratios to STN.

    python benchmarks/speed.py --device cuda --height 256 --width 512 --batch 16
    python benchmarks/speed.py --plans stn,onenet,results/demo/mtsl/seed0/plan.json

Each plan is timed on the same random batch (after warm-up steps), with bf16 autocast on CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from mtsl_plugin.config import load_preset
from mtsl_plugin.experiment import build_trainer
from mtsl_plugin.network.stages import ResNetStages
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.tasks import build_tasks

TASKS = ("S", "D", "E", "N", "A")


def resolve_plan(name: str, num_locations: int) -> BranchingPlan:
    if name == "stn":
        return BranchingPlan.single_task(TASKS, num_locations)
    if name == "onenet":
        return BranchingPlan.one_net(TASKS, num_locations)
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"plan {name!r} is neither stn, onenet nor a plan JSON file")
    return BranchingPlan.from_json(path.read_text())


def measure(plan: BranchingPlan, device: str, batch: int, height: int, width: int, steps: int
            ) -> tuple[float, float]:
    """Median seconds per training step and peak CUDA memory in GiB (0 on CPU)."""
    config = load_preset("smoke").replace(device=device, tasks=plan.tasks)
    stages = ResNetStages("resnet18")
    trainer = build_trainer(config, build_tasks(plan.tasks, 10), plan, stages)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, height, width, generator=gen).to(device)
    gts = {"S": torch.randint(0, 10, (batch, height, width), generator=gen).to(device),
           "D": torch.rand(batch, 1, height, width, generator=gen).to(device) + 0.5,
           "E": (torch.rand(batch, 1, height, width, generator=gen) > 0.9).float().to(device),
           "N": torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=gen), dim=1).to(device),
           "A": images}
    cuda = device.startswith("cuda")
    times = []
    for step in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
            if step == 2:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train_step(images, {t: gts[t] for t in plan.tasks})
        if cuda:
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return statistics.median(times), peak


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", default="stn,onenet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    try:
        plans = {name: resolve_plan(name, 10) for name in args.plans.split(",")}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = {name: measure(plan, args.device, args.batch, args.height, args.width, args.steps)
            for name, plan in plans.items()}
    base_time, base_mem = next(iter(rows.values()))
    print(f"device {args.device}, batch {args.batch}, {args.height}x{args.width}, median of {args.steps} steps")
    print(f"{'plan':<24}{'s/step':>10}{'× first':>10}{'peak GiB':>10}{'× first':>10}")
    for name, (seconds, peak) in rows.items():
        ratio_mem = peak / base_mem if base_mem else float("nan")
        print(f"{Path(name).name:<24}{seconds:>10.4f}{seconds / base_time:>10.2f}{peak:>10.2f}{ratio_mem:>10.2f}")
    print(json.dumps({name: {"seconds": s, "peak_gib": m} for name, (s, m) in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
