"""A LibMTL Trainer that runs on any device and drives MTSL's structural phases.

:class:`MTLTrainer` subclasses ``LibMTL.Trainer``: it builds the model (``class MTLmodel(architecture,
weighting)``), optimizer and scheduler the way LibMTL does, so any LibMTL weighting method (EW, UW, ...) combines
with any architecture, but takes the device as an argument (LibMTL hard-codes ``cuda:0``), adds a ``multistep``
scheduler (the paper's steps at epochs 60 and 70), and replaces LibMTL's epoch loop with :meth:`fit`, which

* draws batches in an order fixed by (seed, epoch), so a resumed run sees the same data;
* adds the structural learner's alignment loss and runs its phases at epoch boundaries;
* writes an atomic checkpoint after structural phases, every minute or so at epoch ends, and at the end,
  and resumes from one (:class:`~mtsl_plugin.trainer_checkpoints.TrainerCheckpoints`);
* runs a bilevel architecture search's own architecture pass before each epoch (BMTAS);
* under ``torch.distributed`` trains a ``DistributedDataParallel`` wrapper, rebuilt after structural edits
  (:mod:`mtsl_plugin.distributed`);
* uses bf16 autocast on CUDA and shows tqdm progress bars.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mtsl_plugin import distributed
from mtsl_plugin.checkpoint import CheckpointError
from mtsl_plugin.data.run_data import RunData
from mtsl_plugin.libmtl_compat import (GRADIENT_WEIGHTINGS, import_libmtl, libmtl_method, weight_args,
                                       zero_grads_in_place)
from mtsl_plugin.learner.structural import StructuralLearner, pooled
from mtsl_plugin.network.branched import BranchedNetwork
from mtsl_plugin.preflight import check_distributed
from mtsl_plugin.progress import each_batch
from mtsl_plugin.trainer_checkpoints import TrainerCheckpoints

LibMTL = import_libmtl()
_PerformanceMeter = LibMTL._record._PerformanceMeter


class NonFiniteLossError(ArithmeticError):
    """A task loss (or the alignment loss) became NaN or infinite; the run stops before writing a checkpoint."""


class MTLTrainer(TrainerCheckpoints, LibMTL.Trainer):
    """LibMTL's Trainer on any device, with MTSL's structural phases and checkpoints.

    Arguments are LibMTL's (``task_dict``, ``weighting``, ``architecture``, ``encoder_class``, ``decoders``,
    ``rep_grad``, ``multi_input``, ``optim_param``, ``scheduler_param``, ``weight_args``, ``arch_args``) plus
    ``device``, an optional ``learner`` (:class:`StructuralLearner`) that turns the run into MTSL, fixed
    ``task_weights`` (task -> factor on its loss before the weighting method; 1 when absent), and the
    execution options ``channels_last`` (NHWC weights and images) and ``compile`` (``torch.compile`` the forward,
    :meth:`compile_model`).
    """

    def __init__(self, task_dict, weighting, architecture, encoder_class, decoders, rep_grad=False,
                 multi_input=False, optim_param=None, scheduler_param=None, *, device="cpu",
                 learner: StructuralLearner | None = None, channels_last: bool = False, compile: bool = False,
                 task_weights: Mapping[str, float] | None = None, **kwargs):
        nn.Module.__init__(self)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = torch.device(device)
        self.kwargs = {"arch_args": {}, **kwargs}
        self.weighting = getattr(weighting, "__name__", str(weighting))
        self.method = libmtl_method(weighting)  # the LibMTL method it is or derives from; None: a user's own
        given = kwargs.get("weight_args")  # over LibMTL's defaults; a user's own method's as they are
        self.kwargs["weight_args"] = weight_args(self.method, given) if self.method else dict(given or {})
        self.task_dict = task_dict
        self.task_num = len(task_dict)
        self.task_name = list(task_dict.keys())
        self.rep_grad = rep_grad
        self.multi_input = multi_input
        self.learner = learner
        self.loss_weights = torch.tensor([float((task_weights or {}).get(t, 1.0)) for t in self.task_name],
                                         device=self.device)
        self._prepare_model(weighting, architecture, encoder_class, decoders)
        self.model.to(memory_format=self.memory_format)
        self._prepare_optimizer(optim_param or {"optim": "adam", "lr": 1e-4, "weight_decay": 5e-5},
                                scheduler_param)
        with contextlib.redirect_stdout(io.StringIO()):  # LibMTL's meter prints a log header on creation
            self.meter = _PerformanceMeter(self.task_dict, self.multi_input)
        self.epochs_done = 0
        self.history: list[dict] = []
        self.ddp: nn.parallel.DistributedDataParallel | None = None  # the training wrapper under torch.distributed
        self.compiled = compile
        if compile:
            self.compile_model()

    # ------------------------------------------------------------------ LibMTL overrides
    def _prepare_model(self, weighting, architecture, encoder_class, decoders):
        if not getattr(architecture, "reads_stages", False):  # LibMTL's (or a user's): its gradient-combining
            architecture = zero_grads_in_place(architecture)  # weightings work on torch >= 2 (libmtl_compat)

        class MTLmodel(architecture, weighting):
            def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, kwargs):
                super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
                self.init_param()

        self.model = MTLmodel(task_name=self.task_name, encoder_class=encoder_class, decoders=decoders,
                              rep_grad=self.rep_grad, multi_input=self.multi_input, device=self.device,
                              kwargs=self.kwargs["arch_args"]).to(self.device)

    def _prepare_optimizer(self, optim_param, scheduler_param):
        """LibMTL's optimizer and scheduler, plus a ``multistep`` scheduler, and parameter groups at other learning
        rates for architectures that name them: ``model.lr_multipliers()`` lists (parameters, multiple of the
        run's learning rate), e.g. cross-stitch units at 100x. An architecture searched by bilevel optimisation
        (BMTAS) names its ``architecture_parameters()``: they get an optimizer of their own,
        ``self.arch_optimizer`` (Adam with ``model.arch_optimizer``'s arguments), and :meth:`fit` calls the model's
        ``search_split`` once (whose part sizes, ``search_sizes``, preflight checks) and its ``architecture_epoch``
        before every search epoch."""
        multistep = scheduler_param is not None and scheduler_param.get("scheduler") == "multistep"
        scheduler_args = {k: v for k, v in (scheduler_param or {}).items() if k != "scheduler"}
        super()._prepare_optimizer(optim_param, None if multistep else scheduler_param)
        groups = self.model.lr_multipliers() if hasattr(self.model, "lr_multipliers") else []
        architecture = (list(self.model.architecture_parameters())
                        if hasattr(self.model, "architecture_parameters") else [])
        # LibMTL puts every parameter in one group: move these into groups of their own, or out of it
        special = {id(p) for params, _ in groups for p in params} | {id(p) for p in architecture}
        base = self.optimizer.param_groups[0]
        base["params"] = [p for p in base["params"] if id(p) not in special]
        for params, factor in groups:
            self.optimizer.add_param_group({"params": list(params), "lr": base["lr"] * factor})
        self.arch_optimizer = (torch.optim.Adam(architecture, **self.model.arch_optimizer) if architecture
                               else None)
        if groups and self.scheduler is not None:  # LibMTL's scheduler, built again (the same way) over every group
            self.scheduler = type(self.scheduler)(self.optimizer, **scheduler_args)
        if multistep:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, **scheduler_args)

    def _process_data(self, loader):
        # LibMTL calls ``iterator.next()``, which Python 3 iterators lack; its bare ``except`` restarts the loader
        # and calls it again, raising AttributeError at the first step. Same contract, working iteration.
        try:
            data, label = next(loader[1])
        except StopIteration:
            loader[1] = iter(loader[0])
            data, label = next(loader[1])
        data = data.to(self.device, non_blocking=True)
        label = {task: label[task].to(self.device, non_blocking=True) for task in self.task_name}
        return data, label

    # ------------------------------------------------------------------ helpers
    def compile_model(self) -> None:
        """``torch.compile`` the model's forward in place (its state dict keeps its keys). Called again after every
        structural edit: the compiled graphs describe the removed nodes, so dynamo's caches are cleared and the
        next step compiles the new network (instead of piling up recompilations until dynamo's limit falls back
        to eager). Buffer donation is turned off: a compiled backward that donates its saved buffers refuses a
        second backward through the same graph, which MTSL's alignment term (and every weighting that
        backpropagates task by task) needs."""
        torch._dynamo.reset()
        if hasattr(torch._functorch.config, "donated_buffer"):  # torch >= 2.6 donates by default
            torch._functorch.config.donated_buffer = False
        self.model.compile()

    @property
    def network(self) -> BranchedNetwork:
        return self.model.encoder

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the trainer's device, in its memory format (``channels_last`` if asked)."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def autocast(self):
        """The precision context of this trainer's forward passes: bf16 autocast on CUDA, full precision else."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def process_preds(self, preds: dict[str, torch.Tensor], task_name: str | None = None) -> dict[str, torch.Tensor]:
        """LibMTL's hook on every batch's predictions (``{task: tensor}``, float32) before the losses and the
        metrics; it changes nothing here, and a LibMTL script's ``Trainer`` subclass may override it (LibMTL's
        NYUv2 example interpolates there, with the signature ``process_preds(self, preds)``)."""
        return preds

    def task_losses(self, preds: dict[str, torch.Tensor], gts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (T,) vector of task losses LibMTL's weighting methods take, each times its fixed weight
        (``task_weights``, 1 by default)."""
        preds = self.process_preds({t: p.float() for t, p in preds.items()})
        losses = torch.stack([self.task_dict[t]["loss_fn"].compute_loss(preds[t], gts[t]) for t in self.task_name])
        return losses * self.loss_weights

    def train_step(self, images: torch.Tensor, gts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """One optimisation step: task losses through the weighting method, plus the alignment term. Returns the
        (T,) task losses and the alignment loss (0 without one) as a number, which waits for the device."""
        losses, align = self.queue_step(images, gts)
        return losses, float(align)

    def queue_step(self, images: torch.Tensor, gts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`train_step` without waiting for the device: the (T,) task losses and the alignment loss (a
        0-d tensor, 0 without one), both detached, on the device, maybe not computed yet."""
        self.model.train()
        with self.autocast():
            preds = (self.ddp or self.model)(images)
        losses = self.task_losses(preds, gts)
        align = None
        if self.learner is not None:
            features = {t: f.float() for t, f in self.model.task_node_features.items()}
            if self.ddp is not None:  # the CKA of the global batch, as one process measures it, on every rank
                features = {t: distributed.gather_rows(pooled(f)) for t, f in features.items()}
            align = self.learner.alignment_loss(self.network.plan, features)
        self.optimizer.zero_grad(set_to_none=True)
        if align is not None:  # the alignment's own gradients, added after the weighting's: a gradient-combining
            # method (MGDA, PCGrad, ...) reads the shared .grad after each task's backward, so gradients already
            # there would count as the first task's; and DDP reduces gradients in one backward per forward
            params = [p for p in self.model.parameters() if p.requires_grad]
            align_grads = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)
        if self.method in GRADIENT_WEIGHTINGS and next(iter(self.model.get_share_params()), None) is None:
            losses.sum().backward()  # nothing shared for the method to act on (an STN, MTSL before its first merge)
        else:
            self.model.backward(losses, **self.kwargs["weight_args"])
        if align is not None:
            reached = [(p, g) for p, g in zip(params, align_grads) if g is not None]
            grads = [g for _, g in reached]
            if self.ddp is not None:
                grads = distributed.mean_all(grads)  # one all-reduce for all of them
            for (p, _), grad in zip(reached, grads):
                p.grad = grad if p.grad is None else p.grad + grad
        self.optimizer.step()
        return losses.detach(), losses.new_zeros(()) if align is None else align.detach()

    @torch.no_grad()
    def scores(self, loader: Iterable) -> dict[str, list[float]]:
        """Every metric of every task over ``loader`` (the LibMTL metric objects of ``task_dict``: each one's
        ``score_fun()``, in the order of its ``metrics`` names), on the predictions :meth:`process_preds` gives.
        Under ``torch.distributed`` every rank must call it, each with its share of the data: the metrics' states
        are summed across the ranks (torchmetrics' sync in ``compute()``), so every rank gets the whole set's."""
        self.model.eval()
        for task in self.task_name:
            self.task_dict[task]["metrics_fn"].reinit()
        for images, gts in loader:
            images = self.images_to_device(images)
            with self.autocast():
                preds = self.model(images)
            preds = self.process_preds({t: p.float() for t, p in preds.items()})
            for task in self.task_name:
                self.task_dict[task]["metrics_fn"].update_fun(preds[task], gts[task].to(self.device))
        return {task: [float(v) for v in self.task_dict[task]["metrics_fn"].score_fun()] for task in self.task_name}

    def evaluate(self, loader: Iterable) -> dict[str, float]:
        """Each task's first metric over ``loader`` (:meth:`scores`)."""
        return {task: values[0] for task, values in self.scores(loader).items()}

    # ------------------------------------------------------------------ the loop
    def fit(self, data: RunData, total_epochs: int, *, checkpoint: str | Path | None = None,
            on_phase: Callable[[dict], None] | None = None, progress: bool = True,
            checkpoint_every: float = 60.0) -> list[dict]:
        """Train until ``total_epochs`` task-learning epochs are done, running structural phases when due.

        Resumes from ``self.epochs_done`` (see :meth:`load`). ``on_phase`` receives each phase record as a dict.
        ``checkpoint`` is written at the end of an epoch when ``checkpoint_every`` seconds have passed since the
        last write, after every structural phase, and at the end (a killed run loses at most about that much
        training; writing a ResNet18 STN's weights and Adam state every epoch would cost seconds per epoch).
        Returns the per-epoch history (mean task losses, alignment loss, seconds).
        """
        check_epochs = getattr(type(self.model), "check_epochs", None)  # a searching supernet's warm-up
        if check_epochs is not None:
            check_epochs(self.model.kwargs, total_epochs)
        disable = None if progress else True
        bar = tqdm(total=total_epochs, initial=self.epochs_done, desc="epochs", disable=disable)
        self.model.total_epochs = total_epochs
        train, arch_train = (self.model.search_split(data.train, data.seed) if self.arch_optimizer is not None
                             else (data.train, None))
        self.wrap_distributed()
        last_save = time.perf_counter()
        while self.epochs_done < total_epochs:
            self.model.epoch = self.epochs_done  # LibMTL's convention: architectures may read the epoch
            self.model.train_loss_buffer = self.loss_buffer(total_epochs)  # and DWA and GradNorm these
            start = time.perf_counter()
            self.model.train()  # an architecture searches in training mode only
            if arch_train is not None and self.model.searching:  # bilevel search: the model's own pass
                self.model.architecture_epoch(self, data.batches(arch_train, key=(2, self.epochs_done)), progress)
            sums, align_sum, samples = self._train_epoch(data.batches(train, key=(0, self.epochs_done)), checkpoint,
                                                         progress)
            if self.scheduler is not None:
                self.scheduler.step()
            self.epochs_done += 1
            self.history.append({"epoch": self.epochs_done, "seconds": time.perf_counter() - start,
                                 "align": align_sum / max(samples, 1),
                                 **{t: float(v) / max(samples, 1) for t, v in zip(self.task_name, sums)},
                                 **(self.model.search_record() if hasattr(self.model, "search_record") else {})})
            ran, edited = self._structural_phases(data, on_phase, progress)
            if edited:  # a phase that merged nothing leaves the network, its compiled graphs and DDP wrapper alone
                self.model.to(memory_format=self.memory_format)  # the new group nodes too
                if self.compiled:
                    self.compile_model()
                self.wrap_distributed()  # new nodes: identical on every rank (checked), a new DDP wrapper
            due = ran or self.epochs_done == total_epochs or time.perf_counter() - last_save >= checkpoint_every
            due = distributed.broadcast_object(due)  # rank 0's clock decides for every rank
            if checkpoint is not None and due:
                self.save_on_every_rank(checkpoint)
                last_save = time.perf_counter()
            bar.update(1)
        bar.close()
        distributed.broadcast_module(self.model)  # evaluation and saved weights: rank 0's statistics everywhere
        return self.history

    def _train_epoch(self, loader: Iterable, checkpoint: str | Path | None,
                     progress: bool) -> tuple[torch.Tensor, float, int]:
        """One epoch's training steps over ``loader``: the sums over its samples of the (T,) task losses and of the
        alignment loss (each step's mean times its batch size: the epoch's means weigh every sample alike, as
        LibMTL's ``train_loss_buffer``, which DWA and GradNorm read, does), and the number of samples. Each batch
        is read while the device runs the step before; only then does the loop wait for that step's losses
        (:meth:`_settle`: logged, and a NaN stops the run)."""
        sums, align_sum, steps, samples = torch.zeros(self.task_num), 0.0, 0, 0
        queued, size = None, 0  # the last step's losses, still on the device, and its (global) batch size
        for images, gts in each_batch(loader, f"epoch {self.epochs_done + 1}", progress):
            images = self.images_to_device(images)
            gts = {t: gts[t].to(self.device, non_blocking=True) for t in self.task_name}
            if queued is not None:
                losses, align = self._settle(*queued, steps - 1, checkpoint)
                sums, align_sum, samples = sums + losses * size, align_sum + align * size, samples + size
            queued, size = self.queue_step(images, gts), images.shape[0] * distributed.world_size()
            if self.ddp is not None:  # the global batch's losses on every rank: logged alike, and a NaN on one
                # rank stops every rank at the same step (a rank left alone would wait in DDP's all-reduce)
                losses, align = distributed.mean_all([queued[0].float(), queued[1].reshape(1).float()])
                queued = losses, align[0]
            steps += 1
        if queued is not None:
            losses, align = self._settle(*queued, steps - 1, checkpoint)
            sums, align_sum, samples = sums + losses * size, align_sum + align * size, samples + size
        return sums, align_sum, samples

    def _structural_phases(self, data: RunData, on_phase: Callable[[dict], None] | None,
                           progress: bool) -> tuple[bool, bool]:
        """Run the structural phases due after the epochs done (usually none or one); whether any ran, and whether
        any merged (edited the network)."""
        ran = edited = False
        while self.learner is not None and self.learner.phase_due(self.epochs_done):
            if data.holdout is None:
                raise ValueError("MTSL needs a held-out slice of the training data for grouping decisions")
            phase = self.learner.phases_done
            draws = itertools.count()  # each amalgamation epoch reads the training data in another order
            distributed.broadcast_module(self.model)  # batch-norm statistics drift apart between ranks
            record = self.learner.structural_phase(  # every rank decides alike on all the held-out data
                self.network, self.model, self.optimizer,
                lambda: data.batches(data.train, key=(1, phase, next(draws)), shard=False),
                lambda: data.batches(data.holdout), self.device, progress=progress)
            if on_phase is not None:  # e.g. rank 0 writes the record: a failed write stops every rank
                distributed.fail_together(lambda: on_phase(record.to_dict()), CheckpointError)
            ran, edited = True, edited or bool(record.merged)
        return ran, edited

    def loss_buffer(self, total_epochs: int) -> np.ndarray:
        """LibMTL's ``train_loss_buffer``: each task's mean loss of every epoch done (``(T, total_epochs)``, zeros
        after), from :attr:`history`, so a resumed run has it too."""
        buffer = np.zeros((self.task_num, total_epochs))
        for entry in self.history:
            if entry["epoch"] <= total_epochs:
                buffer[:, entry["epoch"] - 1] = [entry[t] for t in self.task_name]
        return buffer

    # ------------------------------------------------------------------ data parallel
    def wrap_distributed(self) -> None:
        """Under ``torch.distributed``: check that every rank holds the same network (parameter names and shapes),
        make every replica rank 0's, check it, and (re)wrap the model in
        ``DistributedDataParallel`` (after a structural edit the old wrapper is dropped: its buckets describe the
        old parameters). Weighting methods that backpropagate each task separately (gradient surgery) and
        bilevel searches are refused in one line."""
        if not distributed.active():
            return
        check_distributed(self.method or self.weighting, self.arch_optimizer is not None, self.compiled)
        self.ddp = None
        when = "before training" if not self.epochs_done else f"after epoch {self.epochs_done}"
        distributed.check_structure(self.model, when)  # a broadcast over other shapes would hang or mix tensors
        distributed.broadcast_module(self.model)
        distributed.check_replicas(self.model, when)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids,
                                                       find_unused_parameters=hasattr(self.model, "gates"))

    def _settle(self, losses: torch.Tensor, align: torch.Tensor, step: int, checkpoint: str | Path | None
                ) -> tuple[torch.Tensor, float]:
        """A queued step's losses on the CPU (float32) and its alignment loss as a number, once the device has
        computed them. :meth:`_train_epoch` calls it only after reading the next batch, so that reading overlaps the
        device's step, and before queueing the next step, so that no step runs on weights a non-finite loss has
        spoilt: then the run stops here, naming the step; nothing is saved and the last good checkpoint stays
        as it is."""
        losses, align = losses.float().cpu(), float(align)
        bad = [f"task {t} loss is {float(v)}" for t, v in zip(self.task_name, losses) if not torch.isfinite(v)]
        if not np.isfinite(align):
            bad.append(f"alignment loss is {align}")
        if bad:
            kept = f"; the last good checkpoint {checkpoint} is kept" if checkpoint and Path(checkpoint).exists() \
                else ""
            raise distributed.on_every_rank(NonFiniteLossError(  # the losses are the global batch's: every rank
                f"{', '.join(bad)} at epoch {self.epochs_done + 1} (step {step + 1}; epochs count from 1, as in "
                f"the run's history){kept}"))
        return losses, align
