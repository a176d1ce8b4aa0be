"""Data-parallel scaling: training steps with 1 and N processes (torchrun), our trainer against plain DDP.

    python benchmarks/scaling.py --nproc 1,2,4 --device cuda --height 256 --width 512 --batch 16 --steps 20
    python benchmarks/scaling.py --nproc 1,2 --steps 3          # CPU (gloo): the code path, not a speed claim

For each process count n the command starts ``torchrun --standalone --nproc_per_node=n`` on itself, and every
rank times, at the same global batch (each of the n ranks trains ``batch / n`` images):

* ``plain DDP One-Net``, the anchor: the One-Net network in ``DistributedDataParallel``, summed task losses,
  backward, Adam (with one process, no wrapper);
* our trainer as ``compare.py`` runs it under torchrun (:meth:`MTLTrainer.wrap_distributed`): One-Net, STN and
  ``MTSL phase 1`` (STN with the alignment loss, whose gradients the trainer averages across ranks itself);
  with ``--fused`` STN and MTSL run their sibling nodes as one vmapped call per location.

Each row is the median over ``--steps`` steps after two warm-up steps, on rank 0's clock (a DDP step ends with
the gradient all-reduce, so the ranks move together), with bf16 autocast on CUDA. Printed: seconds per step and
images per second per n, and for every n after the first the speed-up (images per second ÷ those of the first
n) and ours ÷ the anchor's speed-up. Data loading is not included (``speed.py`` measures it). On a CPU the
processes share its cores (each n gets all of them, ``cores // n`` threads a process: :func:`launch_env`), so only
GPU figures say anything about scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.cli import run_main
from benchmarks.speed import TASKS, build, check_step_options, plain_step, synthetic_batch, timed
from mtsl_plugin import distributed
from mtsl_plugin.network.backbones import create_stages
from mtsl_plugin.network.stages import NETWORKS
from mtsl_plugin.plan import BranchingPlan

ROWS = ("plain DDP One-Net", "One-Net", "STN", "MTSL phase 1")


def worker(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: time every row at ``batch / n`` images and, on rank 0, write them to
    ``args.json`` as ``{"nproc": n, "seconds": {row: s}}``."""
    device = distributed.init_from_env(args.device)
    size = distributed.world_size()
    stages = create_stages(args.backbone, network=args.network)
    tasks = tuple(args.tasks.split(","))
    one_net = BranchingPlan.one_net(tasks, stages.num_locations)
    stn = BranchingPlan.single_task(tasks, stages.num_locations)
    images, gts = synthetic_batch(one_net, device, distributed.per_rank_batch(args.batch), args.height, args.width)
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        return (torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids) if distributed.active()
                else module)

    def ours(plan: BranchingPlan, align: bool):
        trainer = build(plan, device, stages, fused=args.fused and plan is stn, align=align)
        trainer.wrap_distributed()
        x = trainer.images_to_device(images)
        return lambda: trainer.train_step(x, gts)

    steps = {"plain DDP One-Net": lambda: plain_step(build(one_net, device, stages), images, gts, wrap=ddp),
             "One-Net": lambda: ours(one_net, False), "STN": lambda: ours(stn, False),
             "MTSL phase 1": lambda: ours(stn, True)}
    seconds = {}
    for row in ROWS:
        step = steps[row]()
        distributed.barrier()
        seconds[row] = timed(step, args.steps, device)[0]
        del step
    if distributed.is_main():
        Path(args.json).write_text(json.dumps({"nproc": size, "seconds": seconds}))
    if distributed.active():
        torch.distributed.destroy_process_group()


def launch_env(nproc: int) -> dict[str, str]:
    """The environment of the torchrun job of ``nproc`` processes: every count gets the machine's cores, split
    evenly (``OMP_NUM_THREADS`` = cores // n, at least 1; a value the user set is kept for every count). torchrun
    alone gives each process one thread when n > 1 but leaves a single process all the cores, so a speed-up on
    the CPU would compare n threads with all of them."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(args: argparse.Namespace, nproc: int, json_path: Path) -> None:
    """Run this file's worker under ``torchrun --standalone --nproc_per_node=nproc``; raises on failure."""
    forwarded = ["--device", args.device, "--batch", str(args.batch), "--height", str(args.height), "--width",
                 str(args.width), "--steps", str(args.steps), "--network", args.network, "--backbone",
                 args.backbone, "--tasks", args.tasks, *(["--fused"] if args.fused else [])]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(Path(__file__).resolve()), "--worker", "--json", str(json_path), *forwarded]
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(nproc))
    if done.returncode != 0 or not json_path.is_file():
        # a worker's traceback, which torchrun's own summary (the output's last lines) leaves out
        failures = sorted(json_path.parent.glob(f"{json_path.name}.rank*.err"))
        output = failures[0].read_text() if failures else done.stdout + done.stderr
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise RuntimeError(f"the run with {nproc} process(es) failed (exit {done.returncode}):\n{tail}")


def report(results: Sequence[dict], batch: int) -> tuple[str, dict]:
    """The table (seconds per step, images per second, speed-ups against the first process count) and its
    numbers: per row and n, ``seconds``, ``images_per_s`` and (after the first n) ``speedup`` and, for our rows,
    ``speedup_over_anchor`` (our speed-up ÷ plain DDP's at the same n)."""
    first = results[0]
    numbers: dict = {}
    lines = ["| Row | " + " | ".join(f"n={r['nproc']} s/step | img/s" for r in results) + " | speed-up (÷ anchor's) |",
             "|:---|" + "---:|---:|" * len(results) + ":---|"]
    for row in ROWS:
        cells, ups = [], []
        for r in results:
            seconds = r["seconds"][row]
            entry = {"seconds": seconds, "images_per_s": batch / seconds}
            if r is not first:
                entry["speedup"] = first["seconds"][row] / seconds
                anchor = first["seconds"][ROWS[0]] / r["seconds"][ROWS[0]]
                if row != ROWS[0]:
                    entry["speedup_over_anchor"] = entry["speedup"] / anchor
                ups.append(f"n={r['nproc']}: {entry['speedup']:.2f}×"
                           + (f" ({entry['speedup_over_anchor']:.2f})" if row != ROWS[0] else ""))
            numbers.setdefault(row, {})[str(r["nproc"])] = entry
            cells.append(f"{seconds:.4f} | {batch / seconds:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {', '.join(ups) or '-'} |")
    return "\n".join(lines) + "\n", numbers


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--nproc must be comma-separated process counts, e.g. 1,2,4; got {text!r}") from None
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        raise ValueError(f"--nproc must be distinct process counts of at least 1, got {text!r}")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts, the first the reference")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--batch", type=int, default=16, help="the global batch, split evenly over the processes")
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after two warm-up steps)")
    p.add_argument("--network", default="compact", choices=NETWORKS)
    p.add_argument("--backbone", default="resnet18", help="timm CNN name (full width, random weights)")
    p.add_argument("--tasks", default="S,D,E,N,A", help="comma-separated tasks of S, D, E, N, A")
    p.add_argument("--fused", action="store_true", help="STN and MTSL run sibling nodes fused")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        try:
            worker(args)
        except BaseException:  # for the launching command to show (torchrun's output ends in its own summary)
            Path(f"{args.json}.rank{os.environ.get('RANK', '0')}.err").write_text(traceback.format_exc())
            raise
        return 0
    return run_main(lambda: time_counts(args), args)


def time_counts(args: argparse.Namespace) -> int:
    """Time every process count ``args`` ask for and print the table (bad options: ``ValueError`` before any
    launch; a launch that fails: its output's tail and exit code 1)."""
    counts = parse_counts(args.nproc)
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    check_step_options(args.device, args.batch, args.height, args.width, args.steps)
    tasks = args.tasks.split(",")
    if any(t not in TASKS for t in tasks) or len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks must name two or more distinct tasks of S, D, E, N, A; got {args.tasks!r}")
    indivisible = [n for n in counts if args.batch % n]
    if args.batch < 1 or indivisible:
        raise ValueError(f"the global batch of {args.batch} cannot be split evenly over {indivisible or counts} "
                         "processes; choose a batch every count divides")
    if args.device.startswith("cuda") and max(counts) > torch.cuda.device_count():
        raise ValueError(f"--nproc {max(counts)} needs as many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    if args.json and not os.access(Path(args.json).absolute().parent, os.W_OK):  # not after all the timing
        raise ValueError(f"--json {args.json}: its folder does not exist or cannot be written")
    stages = create_stages(args.backbone, network=args.network)  # a bad name fails here, before any launch
    if args.batch in counts:  # a process trains on one image: BatchNorm on a 1x1 feature map cannot
        try:
            stages.check_batch_of_one(args.height, args.width)
        except ValueError as exc:
            raise ValueError(f"--nproc {args.batch} gives each process one image of the batch of {args.batch}, "
                             f"and {exc}") from None
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for n in counts:
            print(f"timing with {n} process(es)...", flush=True)
            try:
                launch(args, n, Path(folder) / f"n{n}.json")
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            results.append(json.loads((Path(folder) / f"n{n}.json").read_text()))
    table, numbers = report(results, args.batch)
    print(f"{args.backbone}, {args.network} network, tasks {args.tasks}, device {args.device}, global batch "
          f"{args.batch}, {args.height}x{args.width}, median of {args.steps} steps{', fused' if args.fused else ''}")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "runs": results, "rows": numbers}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
