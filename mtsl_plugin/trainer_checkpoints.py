"""How a :class:`~mtsl_plugin.trainer.MTLTrainer` is written to disk and read back: resume checkpoints (weights,
optimizer, scheduler, weighting and learner state, epochs done, history and RNG state) and the trained weights a
finished run keeps (:mod:`mtsl_plugin.checkpoint` writes the files)."""
from __future__ import annotations

import json
from pathlib import Path

from mtsl_plugin import distributed
from mtsl_plugin.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_weights, set_rng_state
from mtsl_plugin.plan import BranchingPlan

#: State LibMTL weighting methods keep in plain attributes, outside the model's state dict, which a checkpoint must
#: keep too: GradVac's moving average of the tasks' gradient similarities (``rho_T``, ``(T, T)``).
WEIGHTING_STATE: dict[str, tuple[str, ...]] = {"GradVac": ("rho_T",)}


def _describe_run(kind: dict) -> str:
    """A :meth:`TrainerCheckpoints.run_kind` in words, for messages."""
    learner = "with" if kind["structural"] else "without"
    multiples = kind.get("lr_multipliers") or []
    rates = f", parameter groups at {', '.join(f'{m:g}x' for m in multiples)} the learning rate" if multiples else ""
    # (absent in files from before it was recorded)
    schedule = f", {kind['scheduler'] or 'no'} learning-rate scheduler" if "scheduler" in kind else ""
    return (f"{kind['architecture']} architecture, {kind['weighting']} weighting, tasks {' '.join(kind['tasks'])}, "
            f"{learner} a structural learner{schedule}{rates}")


def describe_scheduler(scheduler) -> str | None:
    """A learning-rate scheduler's class and settings (``MultiStepLR(gamma=0.1, milestones=[60, 70])``), ``None``
    without one: what a checkpoint's scheduler state is continued under. Its position (``last_epoch``) and the base
    rates are left out: they are what the checkpoint restores."""
    if scheduler is None:
        return None
    settings = []
    for key, value in sorted(scheduler.state_dict().items()):
        if key.startswith("_") or key in ("last_epoch", "base_lrs", "verbose"):
            continue
        if isinstance(value, dict):  # MultiStepLR's milestones, a Counter of epochs
            value = sorted(value.elements())
        if isinstance(value, (int, float, list)) and not isinstance(value, bool):
            settings.append(f"{key}={value}")
    return f"{type(scheduler).__name__}({', '.join(settings)})"


class TrainerCheckpoints:
    """The checkpoint methods of :class:`~mtsl_plugin.trainer.MTLTrainer` (a mixin: they read and restore its
    ``model``, ``optimizer``, ``scheduler``, ``weighting``, ``learner``, ``epochs_done``, ``history`` and
    ``device``)."""

    #: The processes whose training a checkpoint of this trainer holds (the run's ``trained_by`` entries, see
    #: :mod:`mtsl_plugin.provenance`): saved and restored with it, so a process stopped before its first
    #: checkpoint is not counted by the one that resumes after it. ``None``: not recorded (a trainer built outside
    #: :func:`~mtsl_plugin.experiment.run_method`, or a checkpoint from before the record).
    trained_by: list | None = None

    def save_weights(self, path: str | Path) -> Path:
        """Write the trained weights only (plan and model state; no optimizer, scheduler or RNG state): what a
        finished run keeps, about a third of a checkpoint's size with Adam."""
        return save_weights(path, self.model.plan.to_json() if hasattr(self.model, "plan") else "",
                            self.model.state_dict())

    def save_on_every_rank(self, path: str | Path) -> None:
        """:meth:`save` as every rank of a ``torch.distributed`` job calls it: rank 0 writes, the others wait for
        the write, and a failed write (:class:`CheckpointError`, e.g. a full disk) raises on every rank, so no rank
        goes on training (or on to the next run) while the others stop."""
        distributed.fail_together(lambda: self.save(path), CheckpointError)

    def run_kind(self) -> dict:
        """What a checkpoint must have been written by for this trainer to continue it: the architecture, the
        weighting method, the tasks, whether a structural learner edits the plan, the multiples of the learning
        rate of the architecture's own parameter groups (the optimizer state would otherwise restore the saved
        rates, or fail on another number of groups) and the learning-rate scheduler (:func:`describe_scheduler`:
        torch's ``load_state_dict`` of a scheduler takes the saved milestones over the new ones, and a checkpoint
        written without one would restart the schedule at epoch 0)."""
        multiples = self.model.lr_multipliers() if hasattr(self.model, "lr_multipliers") else []
        return {"architecture": type(self.model).__bases__[0].__name__, "weighting": self.weighting,
                "tasks": list(self.task_name), "structural": self.learner is not None,
                "lr_multipliers": [float(m) for _, m in multiples], "scheduler": describe_scheduler(self.scheduler)}

    def save(self, path: str | Path) -> Path:
        weighting_state = {name: getattr(self.model, name) for name in WEIGHTING_STATE.get(self.method, ())
                           if hasattr(self.model, name)}
        return save_checkpoint(path, {
            "run_kind": self.run_kind(),
            "plan": self.model.plan.to_json() if hasattr(self.model, "plan") else "",
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "weighting_state": weighting_state,
            "epochs_done": self.epochs_done,
            "history": json.dumps(self.history),
            "learner": json.dumps(self.learner.state_dict()) if self.learner is not None else "",
            "trained_by": json.dumps(self.trained_by),
        }, device=self.device)

    @staticmethod
    def checkpoint_plan(path: str | Path) -> BranchingPlan | None:
        """The plan stored in a checkpoint or weights file (build the trainer with it, then :meth:`load`);
        ``None`` for architectures that are not plan-based. The weights are memory-mapped, not read: resuming
        (and :func:`~mtsl_plugin.experiment.load_run`) reads the plan, then the whole file once, in :meth:`load`."""
        text = load_checkpoint(path, mmap=True)["plan"]
        return BranchingPlan.from_json(text) if text else None

    def load(self, path: str | Path) -> None:
        """Continue from a checkpoint, or take the trained weights of a weights file (:meth:`save_weights`) for
        evaluation; the trainer must have been built with the file's plan. A checkpoint written by another kind of
        run (:meth:`run_kind`) is refused in one line: its weights and optimizer state mean nothing here."""
        # read onto the CPU: load_state_dict copies the weights and moments to the parameters' device, while
        # Adam's step counts stay on the CPU as in a fresh run (on a GPU each would cost a sync per parameter and
        # step, in Adam's bias correction)
        state = load_checkpoint(path)
        written, kind = state.get("run_kind"), self.run_kind()  # what older files lack is not checked
        if written is not None and any(written.get(key, value) != value for key, value in kind.items()):
            raise CheckpointError(f"checkpoint {path} was written by a run of {_describe_run(written)}, not of this "
                                  f"trainer's {_describe_run(kind)}; continue it with the method and "
                                  "settings that wrote it")
        saved = BranchingPlan.from_json(state["plan"]) if state["plan"] else None
        if saved != getattr(self.model, "plan", None):
            raise ValueError(f"checkpoint {path} holds a different plan than this trainer was built with")
        self.model.load_state_dict(state["model"])
        if state["kind"] == "weights":
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for name, value in state.get("weighting_state", {}).items():
            setattr(self.model, name, value.to(self.device))
        self.epochs_done = int(state["epochs_done"])
        self.history = json.loads(state["history"])
        self.trained_by = json.loads(state.get("trained_by", "null"))
        if self.learner is not None and state["learner"]:
            self.learner.load_state_dict(json.loads(state["learner"]))
        set_rng_state(state["rng"], self.device)
