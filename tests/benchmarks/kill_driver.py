"""Run ``benchmarks/compare.py`` in this process and SIGKILL it at a chosen moment of the MTSL run.

    python tests/benchmarks/kill_driver.py MOMENT -- <compare.py arguments>

MOMENT is one of

* ``epoch``: at the second training step of MTSL's second task-learning epoch (after the first structural
  phase, so a checkpoint exists);
* ``amalgamation``: at the second amalgamation step (the ATT loss's second forward in a structural phase);
* ``checkpoint``: while a checkpoint of the MTSL run is being written over an existing one (half of it written);
* ``checkpoint-term``: the same moment, SIGTERM instead of SIGKILL (as a batch scheduler stops a job);
* ``none``: no kill (the uninterrupted reference run, with the same process set-up).

Nothing here changes what compare.py computes: the patches only decide when the process dies.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from benchmarks import compare
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.plugins.builtin_amalgamation import AttentionAmalgamation
from mtsl_plugin.trainer import MTLTrainer


SIGNAL = [signal.SIGKILL]  # what die() sends


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), SIGNAL[0])


def die_at_call(method, number, counts=lambda self: True):
    """``method`` wrapped to SIGKILL the process at its ``number``-th call among those where ``counts(self)``."""
    calls = 0

    def wrapper(self, *args, **kwargs):
        nonlocal calls
        if counts(self):
            calls += 1
            if calls == number:
                die()
        return method(self, *args, **kwargs)

    return wrapper


def kill_in_epoch() -> None:
    MTLTrainer.queue_step = die_at_call(MTLTrainer.queue_step, 2,
                                        lambda trainer: trainer.learner is not None and trainer.epochs_done == 1)


def phase_began() -> dict[str, bool]:
    """``{"phase_ran": ...}``, set once a structural phase of the run has begun in this process (before it,
    the command's checks call the amalgamator's loss on a tiny input, which is no training)."""
    phase = StructuralLearner.structural_phase
    state = {"phase_ran": False}

    def structural_phase(self, *args, **kwargs):
        state["phase_ran"] = True
        return phase(self, *args, **kwargs)

    StructuralLearner.structural_phase = structural_phase
    return state


def kill_in_amalgamation() -> None:
    state = phase_began()
    AttentionAmalgamation.forward = die_at_call(AttentionAmalgamation.forward, 2, lambda _: state["phase_ran"])


def kill_in_checkpoint_write() -> None:
    save = torch.save
    state = phase_began()

    def half_written(obj, handle, *args, **kwargs):
        if state["phase_ran"] and isinstance(obj, dict) and obj.get("kind") == "checkpoint":
            save(obj, handle, *args, **kwargs)
            handle.flush()
            handle.truncate(handle.tell() // 2)
            handle.flush()
            os.fsync(handle.fileno())
            die()
        return save(obj, handle, *args, **kwargs)

    torch.save = half_written


def terminate_in_checkpoint_write() -> None:
    SIGNAL[0] = signal.SIGTERM
    kill_in_checkpoint_write()


MOMENTS = {"epoch": kill_in_epoch, "amalgamation": kill_in_amalgamation, "checkpoint": kill_in_checkpoint_write,
           "checkpoint-term": terminate_in_checkpoint_write, "none": lambda: None}

if __name__ == "__main__":
    moment, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: kill_driver.py MOMENT -- <compare.py arguments>"
    MOMENTS[moment]()
    sys.exit(compare.main(argv))
