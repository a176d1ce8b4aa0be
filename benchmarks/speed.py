"""Training-step time and peak memory of fixed plans, measured in one run, printed as ratios to the first plan,
with each plan's parameters and GMac (one image at the given resolution).

    python benchmarks/speed.py --device cuda --height 256 --width 512 --batch 16
    python benchmarks/speed.py --plans stn,onenet,results/demo/mtsl/seed0/plan.json
    python benchmarks/speed.py --network authors --height 256 --width 512 --steps 0   # size and GMac only

Each plan is timed on the same random batch (after warm-up steps), with bf16 autocast on CUDA. The network is
the full-width ResNet18 of ``--network`` (compact or authors) with the five tasks' heads.
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
from mtsl_plugin.network.stages import NETWORKS, ResNetStages
from mtsl_plugin.plan import BranchingPlan, StageCost
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


def measure(plan: BranchingPlan, device: str, batch: int, height: int, width: int, steps: int,
            network: str = "compact") -> tuple[float, float, StageCost]:
    """Median seconds per training step (nan without steps), peak CUDA memory in GiB (0 on CPU) and the
    network's cost on one image."""
    config = load_preset("smoke").replace(device=device, tasks=plan.tasks)
    stages = ResNetStages("resnet18", network=network)
    trainer = build_trainer(config, build_tasks(plan.tasks, 10), plan, stages)
    cost = trainer.model.network.cost(height, width)
    if steps == 0:
        return float("nan"), 0.0, cost
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
    return statistics.median(times), peak, cost


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", default="stn,onenet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: parameters and GMac only)")
    p.add_argument("--network", default="compact", choices=NETWORKS)
    args = p.parse_args(argv)
    try:
        plans = {name: resolve_plan(name, 10) for name in args.plans.split(",")}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = {name: measure(plan, args.device, args.batch, args.height, args.width, args.steps, args.network)
            for name, plan in plans.items()}
    base_time, base_mem, _ = next(iter(rows.values()))
    print(f"{args.network} network, device {args.device}, batch {args.batch}, {args.height}x{args.width}, "
          f"median of {args.steps} steps")
    print(f"{'plan':<24}{'s/step':>10}{'× first':>10}{'peak GiB':>10}{'× first':>10}{'params M':>10}{'GMac':>10}")
    for name, (seconds, peak, cost) in rows.items():
        ratio_mem = peak / base_mem if base_mem else float("nan")
        print(f"{Path(name).name:<24}{seconds:>10.4f}{seconds / base_time:>10.2f}{peak:>10.2f}{ratio_mem:>10.2f}"
              f"{cost.params / 1e6:>10.2f}{cost.gmac:>10.2f}")
    print(json.dumps({name: {"seconds": s, "peak_gib": m, "params": c.params, "gmac": c.gmac}
                      for name, (s, m, c) in rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
