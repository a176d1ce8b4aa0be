"""Training-step time and peak memory of fixed plans, measured in one run, printed as ratios to the first plan,
with each plan's parameters and GMac (one image at the given resolution); plans with several nodes at a
location are timed fused too (``--fused``: one vmapped call per location). Then, with steps, the ratios the
trainer is judged by, all from this run: a plain PyTorch step over One-Net ÷ our trainer's One-Net step; STN ÷
One-Net, unfused and fused; the alignment loss's share of an STN step; drawing a training batch ÷ a One-Net step
(synthetic, or read and augmented from a real data set with ``--dataset nyuv2 --data-root DIR``, by ``--workers
N`` loader processes; and the epoch's first batch, which waits for the loader's workers to start); a step of the
trainer's loop over those batches (reading them, logging and checking the losses) ÷ a One-Net step; One-Net's and
STN's steps with ``--channels-last`` ÷ without; with ``--compile``, One-Net's and STN's steps compiled
(``torch.compile``, after two warm-up steps that compile) ÷ eager.

    python benchmarks/speed.py --device cuda --height 256 --width 512 --batch 16
    python benchmarks/speed.py --plans stn,onenet,results/demo/mtsl/seed0/plan.json
    python benchmarks/speed.py --network authors --height 256 --width 512 --steps 0   # size and GMac only
    python benchmarks/speed.py --backbone convnext_atto --steps 0                       # another timm CNN
    python benchmarks/speed.py --device cuda --height 288 --width 384 --batch 8 --dataset nyuv2 --data-root DIR --workers 4

One process (several processes under torchrun: ``scaling.py``). Each plan is timed on the same random batch
(after warm-up steps), with bf16 autocast on CUDA. The network is
``--backbone`` (default the full-width ResNet18) in the stage table of ``--network`` (compact or authors; any
timm CNN takes compact) with the five tasks' heads; ``stn`` and ``onenet`` span its number of locations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from benchmarks.cli import distinct, run_main
from mtsl_plugin.config import load_preset
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.experiment import build_data, build_trainer
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.network.backbones import create_stages
from mtsl_plugin.network.stages import NETWORKS, StageFactory
from mtsl_plugin.plan import BranchingPlan, PlanError, StageCost
from mtsl_plugin.preflight import check_device
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
    try:
        plan = BranchingPlan.from_json(path.read_text())
    except PlanError as exc:
        raise ValueError(f"plan {name!r}: {exc}") from None
    if plan.num_locations != num_locations:
        raise ValueError(f"plan {name!r} has {plan.num_locations} locations; this network has {num_locations}")
    return plan


def check_step_options(device: str, batch: int, height: int, width: int, steps: int) -> None:
    """A ``ValueError`` of one sentence for timing options no training step runs with."""
    if steps < 0:
        raise ValueError(f"--steps must be 0 or more, got {steps}")
    if batch < 4:
        raise ValueError(f"--batch must be at least 4 (the alignment's CKA needs 4 images), got {batch}")
    if min(height, width) < 32:
        raise ValueError(f"--height and --width must be at least 32 pixels (the networks downsample 32 times), "
                         f"got {height}x{width}")
    check_device(device)


def synthetic_batch(plan: BranchingPlan, device: str, batch: int, height: int, width: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, height, width, generator=gen).to(device)
    gts = {"S": torch.randint(0, 10, (batch, height, width), generator=gen).to(device),
           "D": torch.rand(batch, 1, height, width, generator=gen).to(device) + 0.5,
           "E": (torch.rand(batch, 1, height, width, generator=gen) > 0.9).float().to(device),
           "N": torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=gen), dim=1).to(device),
           "A": images}
    return images, {t: gts[t] for t in plan.tasks}


def timed(step: Callable[[], object], steps: int, device: str) -> tuple[float, float]:
    """Median seconds of ``step()`` over ``steps`` calls after two warm-up calls, and peak CUDA GiB (0 on CPU)."""
    cuda = device.startswith("cuda")
    times = []
    for index in range(steps + 2):
        if cuda:
            torch.cuda.synchronize()
            if index == 2:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if index >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def build(plan: BranchingPlan, device: str, stages: StageFactory, fused: bool = False, align: bool = False,
          channels_last: bool = False, compile: bool = False, classes: int = 10):
    config = load_preset("smoke").replace(device=device, tasks=plan.tasks, fused=fused, channels_last=channels_last,
                                          compile=compile)
    learner = StructuralLearner(config.mtsl) if align else None
    return build_trainer(config, build_tasks(plan.tasks, classes), plan, stages, learner)


def measure(plan: BranchingPlan, device: str, batch: int, height: int, width: int, steps: int,
            stages: StageFactory, fused: bool = False, align: bool = False, channels_last: bool = False,
            compile: bool = False) -> tuple[float, float, StageCost]:
    """Median seconds per training step of our trainer (nan without steps), peak CUDA memory in GiB (0 on CPU)
    and the network's cost on one image; ``align`` adds MTSL's alignment loss (sibling task nodes' CKA)."""
    trainer = build(plan, device, stages, fused, align, channels_last, compile)
    cost = trainer.model.network.cost(height, width)
    if steps == 0:
        return float("nan"), 0.0, cost
    images, gts = synthetic_batch(plan, device, batch, height, width)
    images = trainer.images_to_device(images)
    seconds, peak = timed(lambda: trainer.train_step(images, gts), steps, device)
    return seconds, peak, cost


def plain_step(trainer, images: torch.Tensor, gts: dict[str, torch.Tensor],
               wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module) -> Callable[[], None]:
    """A plain PyTorch training step over ``trainer``'s network (``wrap``-ped, e.g. in DistributedDataParallel):
    forward, summed task losses, backward, Adam step (no LibMTL model, no weighting method, no trainer), with
    the trainer's precision."""
    network, tasks = trainer.model.network, trainer.task_dict
    wrapped = wrap(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4, weight_decay=5e-5)

    def step() -> None:
        with trainer.autocast():
            preds, _ = wrapped(images)
        loss = sum(tasks[t]["loss_fn"].compute_loss(preds[t].float(), gts[t]) for t in gts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_plain(plan: BranchingPlan, device: str, batch: int, height: int, width: int, steps: int,
                  stages: StageFactory) -> float:
    """Median seconds of :func:`plain_step` over ``plan``'s network."""
    images, gts = synthetic_batch(plan, device, batch, height, width)
    return timed(plain_step(build(plan, device, stages), images, gts), steps, device)[0]


def timing_data(batch: int, height: int, width: int, steps: int, dataset: str = "synthetic",
                root: str | None = None, workers: int | None = None, device: str = "cpu") -> tuple[RunData, int]:
    """``steps + 3`` training batches at this size, as a run reads them: the synthetic data, or a real data set's
    folder (``dataset`` nyuv2 or cityscapes in ``root``: its first ``batch * (steps + 3)`` training samples, read
    and augmented), by the main process or by ``workers`` processes (default: as many as a run on ``device``
    takes, :func:`~mtsl_plugin.experiment.loader_workers`), and the data set's number of classes."""
    config = load_preset("smoke")
    config = config.replace(batch_size=batch, workers=workers, device=device,
                            data=dataclasses.replace(config.data, name=dataset, root=root, height=height, width=width,
                                                     train=batch * (steps + 3), holdout=4, test=2))
    data, full = build_data(config)
    if len(data.train) < batch * (steps + 3):
        raise ValueError(f"--data-root {root}: {len(data.train)} training samples, fewer than the "
                         f"{batch * (steps + 3)} of {steps} timed batches, the first and 2 warm-up ones")
    return data, full.num_classes


def measure_data(data: RunData, steps: int) -> tuple[float, float]:
    """Median seconds to draw one of ``data``'s training batches from the trainer's loader, drawn back to back (with
    workers: the time per batch they sustain), and the seconds to the epoch's first batch (the loader's iterator
    made, its workers started: paid once an epoch)."""
    start = time.perf_counter()
    batches = iter(data.batches(data.train, key=(0, 0)))
    next(batches)
    first = time.perf_counter() - start
    return timed(lambda: next(batches), steps, "cpu")[0], first


def measure_loop(plan: BranchingPlan, data: RunData, classes: int, device: str, stages: StageFactory) -> float:
    """Seconds per step of :meth:`~mtsl_plugin.trainer.MTLTrainer.fit`'s loop over ``data``, batches read and
    losses logged and checked as in a run: the second of two epochs (the first warms up), divided by its steps.
    Against the step alone, this is what reading the data and waiting for each step's losses add."""
    trainer = build(plan, device, stages, classes=classes)
    trainer.fit(data, 2, progress=False)
    return trainer.history[1]["seconds"] / len(data.batches(data.train, key=(0, 1)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", default="stn,onenet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (0: parameters and GMac only)")
    p.add_argument("--network", default="compact", choices=NETWORKS)
    p.add_argument("--backbone", default="resnet18", help="timm CNN name (full width, random weights)")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "nyuv2", "cityscapes"),
                   help="the data whose batches are timed against a step (default synthetic; a real one reads "
                        "and augments the files in --data-root)")
    p.add_argument("--data-root", default=None, help="folder of the real data set (--dataset)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes besides the main one (default: as many as a run on --device takes)")
    p.add_argument("--compile", action="store_true",
                   help="also time One-Net and STN compiled (torch.compile: minutes of compiling on a CPU)")
    args = p.parse_args(argv)
    return run_main(lambda: report(args), args)


def report(args: argparse.Namespace) -> int:
    """Measure and print what ``args`` ask for (bad options: ``ValueError`` before any measurement)."""
    check_step_options(args.device, args.batch, args.height, args.width, args.steps)
    if (args.dataset == "synthetic") != (args.data_root is None):
        raise ValueError("--data-root goes with --dataset nyuv2 or cityscapes, and they with it")
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    stages = create_stages(args.backbone, network=args.network)
    locations = stages.num_locations
    names = distinct(args.plans.split(","), "plans")
    files = [Path(name).name for name in names]  # a row's label; the path as given where two files share a name
    plans = {name if files.count(file) > 1 else file: resolve_plan(name, locations)
             for name, file in zip(names, files)}
    rows, row_plans = {}, {}
    for label, plan in plans.items():
        rows[label] = measure(plan, args.device, args.batch, args.height, args.width, args.steps, stages)
        row_plans[label] = plan
        if args.steps and max(len(p) for p in plan.partitions) > 1:
            rows[f"{label} fused"] = measure(plan, args.device, args.batch, args.height, args.width, args.steps,
                                             stages, fused=True)
            row_plans[f"{label} fused"] = plan

    def step(label: str | None, plan: BranchingPlan, **options) -> float:
        """The row's step time when the table timed this plan so already, else a new measurement."""
        if row_plans.get(label) == plan:
            return rows[label][0]
        return measure(plan, args.device, args.batch, args.height, args.width, args.steps, stages,
                       **options)[0]

    base_time, base_mem, _ = next(iter(rows.values()))
    print(f"{args.backbone}, {args.network} network ({locations} locations), device {args.device}, "
          f"batch {args.batch}, {args.height}x{args.width}, median of {args.steps} steps")
    print(f"{'plan':<24}{'s/step':>10}{'× first':>10}{'peak GiB':>10}{'× first':>10}{'params M':>10}{'GMac':>10}")
    for name, (seconds, peak, cost) in rows.items():
        ratio_mem = peak / base_mem if base_mem else float("nan")
        print(f"{name:<24}{seconds:>10.4f}{seconds / base_time:>10.2f}{peak:>10.2f}{ratio_mem:>10.2f}"
              f"{cost.params / 1e6:>10.2f}{cost.gmac:>10.2f}")
    ratios = {}
    if args.steps:
        one_net, stn = resolve_plan("onenet", locations), resolve_plan("stn", locations)
        trainer_step, stn_step = step("onenet", one_net), step("stn", stn)
        plain_onenet_step = measure_plain(one_net, args.device, args.batch, args.height, args.width, args.steps, stages)
        stn_fused = step("stn fused", stn, fused=True)
        stn_align = step(None, stn, align=True)
        data, classes = timing_data(args.batch, args.height, args.width, args.steps, args.dataset, args.data_root,
                                    args.workers, args.device)
        data_step, data_first = measure_data(data, args.steps)
        loop_step = measure_loop(one_net, data, classes, args.device, stages)
        onenet_nhwc, stn_nhwc = step(None, one_net, channels_last=True), step(None, stn, channels_last=True)
        ratios = {"plain_over_trainer_onenet": plain_onenet_step / trainer_step,
                  "stn_over_onenet": stn_step / trainer_step, "stn_fused_over_onenet": stn_fused / trainer_step,
                  "alignment_share_of_stn_step": max(stn_align - stn_step, 0.0) / stn_align,
                  "data_over_onenet_step": data_step / trainer_step,
                  "epoch_first_batch_over_onenet_step": data_first / trainer_step,
                  "training_loop_over_onenet_step": loop_step / trainer_step,
                  "onenet_channels_last_over_contiguous": onenet_nhwc / trainer_step,
                  "stn_channels_last_over_contiguous": stn_nhwc / stn_step}
        if args.compile:
            ratios.update({"onenet_compiled_over_eager": step(None, one_net, compile=True) / trainer_step,
                           "stn_compiled_over_eager": step(None, stn, compile=True) / stn_step})
        print(f"\n{args.dataset} batches, read by {data.workers} loader workers besides the main process: "
              f"{data_step:.4f} s each, the first of an epoch {data_first:.4f} s (iterator and workers starting); "
              f"One-Net's training loop over them {loop_step:.4f} s a step")
        print("ratios (one run): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(json.dumps({"rows": {name: {"seconds": s, "peak_gib": m, "params": c.params, "gmac": c.gmac}
                               for name, (s, m, c) in rows.items()}, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
