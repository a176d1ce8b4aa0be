"""How hard MTSL's alignment loss pulls sibling task nodes together, location by location.

    python benchmarks/alignment.py                                  # quick preset, every location, seed 0
    python benchmarks/alignment.py --locations 5,7,9 --epochs 8 --out results/alignment-quick

For each location L, a network that shares locations 0..L-1 and gives every task its own nodes from L on (what
MTSL trains when it reaches L having merged everything before it) learns ``--epochs`` epochs of the plain
multi-task loss. From that state one phase (``--steps`` steps, default one epoch) is run twice on the same batches:
without and with the alignment loss λ·(1 − CKA) on the task nodes at L. After each, the task nodes at L are
measured as a structural phase measures them (the held-out slice, spatially averaged features, the run's
similarity) and grouped by the run's solver and γ. Printed per location:

* the mean and the lowest pair similarity without and with alignment, and the groups that would merge;
* ``align ÷ task``: at the start of the phase (first batch), the norm of the alignment loss's gradient over each
  task's node at L divided by the norm of that task's own loss's gradient over it; above 1 the alignment steers
  the node more than its task does;
* each task's held-out loss after the phase with alignment relative to without (%): what the pull costs;
* how the measured similarity is reached: the *effective dimension* of each node's pooled features (the
  participation ratio of their principal variances: 1 when one direction carries all the variance), and the
  similarity once each node's own first principal direction is projected out. Linear CKA weighs directions by
  their variance, so nodes that share one dominant direction score high whatever the rest of their features do.

Results go to ``<out>/alignment/alignment.json`` and ``alignment.md`` (``--out`` default
``results/alignment-<preset>``). No run is reused: the networks of this probe are not MTSL runs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from typing import Any, Sequence

import numpy as np
import torch

from benchmarks.cli import (UsageError, add_out_arg, add_run_args, config_from_args, out_folder, parse_list,
                            parse_seeds, run_main)
from benchmarks.harness import Job, check_jobs, dry_run
from benchmarks.report import earlier_report, with_provenance_note, write_markdown
from mtsl_plugin.config import RunConfig
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.experiment import (build_data, build_run_tasks, build_stages, build_trainer, initialisation,
                                    num_locations, seed_everything, write_json)
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plan import BranchingPlan
from mtsl_plugin.preflight import rng_untouched
from mtsl_plugin.provenance import provenance
from mtsl_plugin.trainer import MTLTrainer


def prefix_plan(tasks: Sequence[str], location: int, locations: int) -> BranchingPlan:
    """Every task shares locations ``0..location-1`` and has a node of its own from ``location`` on."""
    return BranchingPlan(tasks, [[tasks]] * location + [[[t] for t in tasks]] * (locations - location))


def gradient_ratios(trainer: MTLTrainer, learner: StructuralLearner, location: int, images: torch.Tensor,
                    gts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per task: |∇ alignment| ÷ |∇ own loss| over the parameters of the task's node at ``location``."""
    trainer.model.train()
    preds = trainer.model(images)
    losses = trainer.task_losses(preds, gts)
    features = {t: f.float() for t, f in trainer.model.task_node_features.items()}
    align = learner.alignment_loss(trainer.network.plan, features)
    ratios = {}
    for index, task in enumerate(trainer.task_name):
        params = list(trainer.network.node(location, (task,)).parameters())
        norms = [torch.sqrt(sum(g.pow(2).sum() for g in torch.autograd.grad(term, params, retain_graph=True)))
                 for term in (align, losses[index])]
        ratios[task] = float(norms[0] / norms[1].clamp_min(1e-30))
    trainer.optimizer.zero_grad(set_to_none=True)
    return ratios


def effective_dimension(features: torch.Tensor) -> float:
    """Participation ratio (Σλ)² / Σλ² of the principal variances λ of (N, C) features: 1 when one direction
    carries all the variance, k when k directions carry equal shares."""
    variances = torch.linalg.svdvals(features - features.mean(0)).double().pow(2)
    return float(variances.sum() ** 2 / variances.pow(2).sum().clamp_min(1e-300))


def without_top_direction(features: torch.Tensor) -> torch.Tensor:
    """(N, C) features centred, with their projection on their own first principal direction removed."""
    centred = features - features.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:1]  # (1, C)
    return centred - centred @ top.T @ top


def pair_summary(matrix: np.ndarray) -> dict[str, float]:
    pairs = matrix[np.triu_indices(len(matrix), 1)]
    return {"mean": float(pairs.mean()), "min": float(pairs.min())}


@torch.no_grad()
def heldout_losses(trainer: MTLTrainer, data: RunData) -> dict[str, float]:
    """Each task's loss on the held-out slice, averaged over its batches, the model in evaluation mode."""
    trainer.model.eval()
    sums, batches = torch.zeros(len(trainer.task_name)), 0
    for images, gts in data.batches(data.holdout):
        gts = {t: gts[t].to(trainer.device) for t in trainer.task_name}
        sums += trainer.task_losses(trainer.model(trainer.images_to_device(images)), gts).float().cpu()
        batches += 1
    return {t: float(v) / batches for t, v in zip(trainer.task_name, sums)}


def measured_phase(trainer: MTLTrainer, learner: StructuralLearner, data: RunData) -> dict[str, Any]:
    """What a phase leaves at the probed location: its sibling task nodes' similarity on the held-out slice (pairs,
    matrix, partition, merges), each task's held-out loss, the nodes' effective dimension and their similarity
    without each node's top direction."""
    (_, names), = trainer.network.plan.siblings()
    features = learner.node_features(trainer.network, lambda: data.batches(data.holdout), trainer.device)
    matrix = learner.similarity_matrix(features, names)
    partition, merged = learner.decide(matrix, names)
    stripped = {t: without_top_direction(f) for t, f in features.items()}
    return {**pair_summary(matrix), "matrix": matrix.tolist(), "partition": partition,
            "merged": [list(g) for g in merged], "heldout_loss": heldout_losses(trainer, data),
            "dimension": {t: effective_dimension(f) for t, f in features.items()},
            "without_top_direction": pair_summary(learner.similarity_matrix(stripped, names))}


def probe(config: RunConfig, data: RunData, num_classes: int, location: int, epochs: int, steps: int | None
          ) -> dict[str, Any]:
    """Train the prefix-shared network ``epochs`` epochs on ``data`` (:func:`build_data` of ``config``, built once
    for every location), then one phase without and one with alignment."""
    seed_everything(config.seed)
    tasks = build_run_tasks(config, num_classes)
    plan = prefix_plan(tuple(tasks), location, num_locations(config))
    trainer = build_trainer(config, tasks, plan, build_stages(config))
    trainer.fit(data, epochs, progress=False)
    start = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()))
    batches = list(data.batches(data.train, key=(0, epochs)))[:steps]
    row: dict[str, Any] = {"location": location, "steps": len(batches)}
    devices = [trainer.device] if torch.device(trainer.device).type == "cuda" else []
    # both phases start from the same weights, batch-norm statistics and random state (torch's, numpy's, Python's,
    # which a plugin may draw from): the gradient ratios' forward (training mode) is measured on that start and
    # then undone, and each phase draws from a fork of one state
    with rng_untouched(devices):
        images, gts = batches[0]
        gts = {t: gts[t].to(trainer.device) for t in trainer.task_name}
        aligned = StructuralLearner(dataclasses.replace(config.mtsl, align=True))
        row["gradient_ratio"] = gradient_ratios(trainer, aligned, location, trainer.images_to_device(images), gts)
    for align in (False, True):
        trainer.model.load_state_dict(start[0])
        trainer.optimizer.load_state_dict(start[1])
        learner = StructuralLearner(dataclasses.replace(config.mtsl, align=align))
        trainer.learner = learner
        with rng_untouched(devices):  # its steps and measurements (loaders draw their seeds)
            for images, gts in batches:
                trainer.train_step(trainer.images_to_device(images),
                                   {t: gts[t].to(trainer.device) for t in trainer.task_name})
            row["aligned" if align else "plain"] = measured_phase(trainer, learner, data)
    row["loss_change"] = {t: 100.0 * (row["aligned"]["heldout_loss"][t] / row["plain"]["heldout_loss"][t] - 1.0)
                          for t in tasks}
    return row


def merged_text(entry: dict[str, Any]) -> str:
    return " ".join("".join(g) for g in entry["merged"]) or "none"


def table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The markdown table of :func:`probe`'s rows."""
    head = ("| Location | CKA mean (min), plain | aligned | merges, plain | aligned | align ÷ task gradient "
            f"({' '.join(tasks)}) | held-out loss aligned vs plain ({' '.join(tasks)}, %) | "
            "effective dimension, plain → aligned | CKA without the top direction, plain → aligned |")
    lines = [head, "|---:|---:|---:|:---|:---|:---|:---|:---|:---|"]
    for r in rows:
        ratio = " ".join(f"{r['gradient_ratio'][t]:.2g}" for t in tasks)
        change = " ".join(f"{r['loss_change'][t]:+.0f}" for t in tasks)
        dims = [float(np.mean(list(r[k]["dimension"].values()))) for k in ("plain", "aligned")]
        bare = [r[k]["without_top_direction"]["mean"] for k in ("plain", "aligned")]
        lines.append(f"| {r['location']} | {r['plain']['mean']:.2f} ({r['plain']['min']:.2f}) | "
                     f"{r['aligned']['mean']:.2f} ({r['aligned']['min']:.2f}) | {merged_text(r['plain'])} | "
                     f"{merged_text(r['aligned'])} | {ratio} | {change} | {dims[0]:.1f} → {dims[1]:.1f} | "
                     f"{bare[0]:.2f} → {bare[1]:.2f} |")
    return "\n".join(lines) + "\n"


def same_probe(earlier: dict[str, Any], report: dict[str, Any]) -> bool:
    """Whether an earlier probe's rows can stand beside new ones: same configuration, epochs, steps and
    :func:`~mtsl_plugin.experiment.initialisation` (a report from before it was recorded is another probe)."""
    return (RunConfig.from_dict(earlier["config"]).fingerprint() == RunConfig.from_dict(report["config"]).fingerprint()
            and (earlier["epochs"], earlier.get("steps"), earlier.get("initialisation"))
            == (report["epochs"], report["steps"], report["initialisation"]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    add_out_arg(p, "alignment", reuses=False)
    p.add_argument("--locations", default=None, help="comma-separated locations (default every location)")
    p.add_argument("--epochs", type=int, default=8, help="plain epochs before the probed phase (default 8)")
    p.add_argument("--steps", type=int, default=None, help="steps of the probed phase (default one epoch)")
    args = p.parse_args(argv)

    def body() -> int:
        config = config_from_args(args)
        seeds = parse_seeds(args.seeds)
        if len(seeds) != 1:
            raise UsageError("alignment.py probes one seed; pass --seeds K")
        config = config.replace(seed=seeds[0])
        if args.epochs < 1 or (args.steps is not None and args.steps < 1):
            raise UsageError("--epochs and --steps must be at least 1")
        if not config.mtsl.aligns:  # its gradient is what is probed: found before any training
            raise UsageError("the configuration's alignment is off (mtsl align: false or align_weight 0): there is "
                             "no alignment loss to probe")
        total = num_locations(config)
        try:
            locations = (list(range(total)) if args.locations is None
                         else [int(x) for x in parse_list(args.locations, "locations")])
        except ValueError:
            raise UsageError(f"--locations must be comma-separated integers, got {args.locations!r}") from None
        if any(not 0 <= loc < total for loc in locations):
            raise UsageError(f"--locations {args.locations}: this network has locations 0..{total - 1}")
        if len(set(locations)) != len(locations):
            raise UsageError(f"--locations {args.locations} names a location twice")
        if len(config.tasks) < 2:
            raise UsageError("the alignment loss needs at least two tasks")
        # the probe trains and groups as aligned MTSL does, on every task of the run: check that configuration
        aligned = config.replace(mtsl=dataclasses.replace(config.mtsl, align=True))
        check_jobs([Job("mtsl", "mtsl", aligned)], progress=not args.no_progress)
        folder = out_folder(args, "alignment", config) / "alignment"
        args.results_folder = None  # the probe writes at its end: an interrupted one has nothing to keep
        report = {"config": config.to_dict(), "epochs": args.epochs, "steps": args.steps,
                  "initialisation": initialisation(config)}
        earlier = earlier_report(folder / "alignment.json", lambda e: same_probe(e, report), "an alignment probe")
        rows = earlier["rows"] if earlier else []  # kept beside the new locations
        data, full = build_data(config, not args.no_progress)
        epoch = len(data.batches(data.train, key=(0, 0)))
        if args.steps is not None and args.steps > epoch:
            raise UsageError(f"--steps {args.steps}: the probed phase is at most one epoch, {epoch} steps here")
        if args.dry_run:  # after every check (--out, an earlier report, --steps); the probe keeps no runs
            return dry_run([], None)
        for location in locations:
            rows = [r for r in rows if r["location"] != location]
            rows.append({**probe(config, data, getattr(full, "num_classes", 0), location, args.epochs, args.steps),
                         "trained_by": [provenance(config)]})
            print(f"location {location}: CKA {rows[-1]['plain']['mean']:.2f} plain, "
                  f"{rows[-1]['aligned']['mean']:.2f} aligned", flush=True)
        rows.sort(key=lambda r: r["location"])
        # an extended report's earlier locations may come from other software or machines: the note says so
        text = with_provenance_note(table(rows, config.tasks), [
            {"status": "ok", "label": f"location {r['location']}", "seed": config.seed,
             "trained_by": r.get("trained_by")} for r in rows])
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "alignment.json", {**report, "rows": rows})
        write_markdown(text, folder / "alignment.md")  # atomically: a stop keeps the last
        print(text)
        print(f"results in {folder}")
        return 0

    return run_main(body, args)


if __name__ == "__main__":
    sys.exit(main())
