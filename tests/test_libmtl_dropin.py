"""The drop-in promise, as a LibMTL user tries it: scripts shaped like LibMTL's examples (NYUv2's subclass with a
``process_preds``, Office's ``AccMetric``/``CELoss`` classification, QM9's regression heads), LibMTL's own
architectures with its gradient weightings, its ``save_path``/``load_path`` flow and its optimizer and scheduler
dictionaries. Whatever LibMTL accepts either works as in LibMTL or is refused in one line before training."""
import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mtsl_plugin
from mtsl_plugin.libmtl_compat import import_libmtl

LibMTL = import_libmtl()
from LibMTL.loss import AbsLoss, CELoss  # noqa: E402
from LibMTL.metrics import AbsMetric, AccMetric  # noqa: E402

TASKS = ("0", "1", "2")


class Regression(Dataset):
    """QM9-like samples: features ``(11,)`` and one ``(1,)`` target per task."""

    def __init__(self, n=16, seed=0, tasks=TASKS):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 11, generator=g)
        self.y = {t: torch.randn(n, 1, generator=g) for t in tasks}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {t: v[i] for t, v in self.y.items()}


class Classes(Dataset):
    """Office-like classification on one image: ``(3, 16, 16)`` and a class index per task."""

    def __init__(self, n=8, seed=0, tasks=("amazon", "dslr")):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 16, 16, generator=g)
        self.y = {t: torch.randint(0, 5, (n,), generator=g) for t in tasks}

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {t: v[i] for t, v in self.y.items()}


class MSELoss(AbsLoss):
    def compute_loss(self, pred, gt):
        return ((pred - gt) ** 2).mean()


class MAEMetric(AbsMetric):
    """Two metrics, as LibMTL's task dicts often have: mean absolute error and its square."""

    def update_fun(self, pred, gt):
        self.record.append((pred - gt).abs().mean().item())
        self.bs.append(pred.size(0))

    def score_fun(self):
        mae = float((np.array(self.record) * np.array(self.bs)).sum() / np.sum(self.bs))
        return [mae, mae ** 2]


def regression_task_dict(tasks=TASKS):
    return {t: {"metrics": ["MAE", "MAE2"], "metrics_fn": MAEMetric(), "loss_fn": MSELoss(), "weight": [0, 0]}
            for t in tasks}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(11, 16), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def regression_trainer(trainer_class=None, tasks=TASKS, weighting="EW", architecture="HPS", **kwargs):
    """A QM9-style script's Trainer: LibMTL's HPS over an MLP, one linear head per task."""
    torch.manual_seed(0)
    args = dict(task_dict=regression_task_dict(tasks), weighting=weighting, architecture=architecture,
                encoder_class=MLP, decoders=nn.ModuleDict({t: nn.Linear(16, 1) for t in tasks}), rep_grad=False,
                multi_input=False, optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 1e-5},
                scheduler_param=None, device="cpu", weight_args={}, arch_args={})
    return (trainer_class or mtsl_plugin.Trainer)(**{**args, **kwargs})


def regression_loaders(tasks=TASKS):
    return (DataLoader(Regression(16, 0, tasks), batch_size=4, shuffle=True),
            DataLoader(Regression(8, 1, tasks), batch_size=4))


def tiny_resnet():
    return timm.create_model("resnet18", channels=(4, 8, 8, 8), num_classes=0)


MTSL_SHORT = {"mtsl": {"task_epochs": (1, 1), "amalgamation_epochs": (1, 1), "total_epochs": 2, "threshold": 0.0}}


# ---------------------------------------------------------------------------------------------- process_preds
def test_a_process_preds_override_is_honoured_in_training_and_test():
    """LibMTL calls ``process_preds`` on every batch's predictions before the losses and the metrics (its NYUv2
    example interpolates there, QM9 users rescale): a subclass overriding it sees its predictions used."""
    calls = []

    class Scaled(mtsl_plugin.Trainer):
        def process_preds(self, preds):  # LibMTL's NYUv2 example overrides it with this one-argument signature
            calls.append(self.model.training)
            return {t: p * 0 + 1 for t, p in preds.items()}  # every prediction 1: losses and metrics say so

    trainer = regression_trainer(Scaled)
    train, test = regression_loaders()
    results = trainer.train(train, test, 1, progress=False)["test"]
    assert calls.count(True) == len(train) and calls.count(False) == len(test)
    targets = test.dataset.y
    for t in TASKS:
        assert results[t] == pytest.approx(float((targets[t] - 1).abs().mean()))
    history = trainer.history[0]
    assert history["0"] == pytest.approx(float(((train.dataset.y["0"] - 1) ** 2).mean()), rel=1e-5)


def test_an_office_style_task_dict_and_linear_heads_run_mtsl():
    """LibMTL's AccMetric and CELoss, ``nn.Linear`` heads (they read the last location's output average-pooled)
    and a ``process_preds`` override, under MTSL's structural phases."""
    class Office(mtsl_plugin.Trainer):
        def process_preds(self, preds):
            self.seen = {t: tuple(p.shape) for t, p in preds.items()}
            return preds

    torch.manual_seed(0)
    trainer = Office(task_dict={t: {"metrics": ["Acc"], "metrics_fn": AccMetric(), "loss_fn": CELoss(),
                                    "weight": [1]} for t in ("amazon", "dslr")},
                     weighting="EW", architecture="MTSL", encoder_class=tiny_resnet,
                     decoders=nn.ModuleDict({t: nn.Linear(64, 5) for t in ("amazon", "dslr")}), rep_grad=False,
                     multi_input=False, optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0},
                     scheduler_param=None, device="cpu", weight_args={}, arch_args=MTSL_SHORT)
    train = DataLoader(Classes(8), batch_size=4, shuffle=True, drop_last=True)
    results = trainer.train(train, DataLoader(Classes(4, seed=1), batch_size=4), 2, progress=False)
    assert trainer.seen == {"amazon": (4, 5), "dslr": (4, 5)} and trainer.learner.phases_done == 2
    assert set(results["test"]) == {"amazon", "dslr"} and all(0 <= v <= 1 for v in results["test"].values())


def test_a_users_subclass_of_mtsl_runs_as_mtsl():
    """An architecture of the user's own that subclasses MTSL (in the user's module, not ours) is built on the
    merge-location stages and learns its structure as MTSL does."""
    class Logged(mtsl_plugin.MTSL):
        def forward(self, inputs, task_name=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(inputs, task_name)

    torch.manual_seed(0)
    trainer = mtsl_plugin.Trainer(
        task_dict={t: {"metrics": ["Acc"], "metrics_fn": AccMetric(), "loss_fn": CELoss(), "weight": [1]}
                   for t in ("amazon", "dslr")},
        weighting="EW", architecture=Logged, encoder_class=tiny_resnet,
        decoders=nn.ModuleDict({t: nn.Linear(64, 5) for t in ("amazon", "dslr")}), rep_grad=False, multi_input=False,
        optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0}, scheduler_param=None, device="cpu",
        weight_args={}, arch_args=MTSL_SHORT)
    train = DataLoader(Classes(8), batch_size=4, shuffle=True, drop_last=True)
    trainer.train(train, DataLoader(Classes(4, seed=1), batch_size=4), 2, progress=False)
    assert trainer.learner.phases_done == 2 and trainer.model.calls > 0


# ------------------------------------------------------------------------- LibMTL's architectures and weightings
@pytest.mark.parametrize("weighting", ["MGDA", "IMTL", "PCGrad", "GradVac", "CAGrad", "GradNorm"])
def test_gradient_weightings_train_libmtl_architectures(weighting):
    """LibMTL's architectures clear the shared gradients between the tasks' backward passes with
    ``Module.zero_grad()``, None since torch 2.0, and its ``_reset_grad`` then failed at the first step."""
    trainer = regression_trainer(weighting=weighting)
    before = [p.detach().clone() for p in trainer.model.get_share_params()]
    results = trainer.train(*regression_loaders(), 2, progress=False)["test"]  # GradNorm combines from epoch 2
    assert all(np.isfinite(v) for v in results.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.get_share_params()))
    assert type(trainer.model).__bases__[0].__name__ == "HPS"  # checkpoints still name LibMTL's architecture
    assert isinstance(trainer.model, LibMTL.architecture.HPS)


def test_mtltrainer_itself_runs_libmtl_architectures_with_gradient_weightings():
    """The in-place zeroing is MTLTrainer's, so a script that builds it directly (as build_trainer does) gets it."""
    from mtsl_plugin.trainer import MTLTrainer

    torch.manual_seed(0)
    trainer = MTLTrainer(regression_task_dict(), LibMTL.weighting.PCGrad, LibMTL.architecture.HPS, MLP,
                         nn.ModuleDict({t: nn.Linear(16, 1) for t in TASKS}),
                         optim_param={"optim": "adam", "lr": 1e-3, "weight_decay": 0}, device="cpu", weight_args={},
                         arch_args={})
    before = [p.detach().clone() for p in trainer.model.get_share_params()]
    trainer.train_step(*next(iter(regression_loaders()[0])))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.get_share_params()))


def test_gradient_weightings_on_libmtl_architectures_see_each_tasks_own_gradient():
    """Between the tasks' backward passes the shared gradients are zeroed (in place): the gradient LibMTL's method
    combines for task t is that of t's loss alone, not the sum of the tasks' before it."""
    trainer = regression_trainer(weighting="PCGrad")
    images, gts = next(iter(regression_loaders()[0]))
    losses = trainer.task_losses(trainer.model(images), gts)
    shared = list(trainer.model.get_share_params())
    expected = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
                            for loss in losses])
    trainer.model._compute_grad_dim()
    torch.testing.assert_close(trainer.model._compute_grad(losses, mode="backward"), expected)


def test_without_val_dataloaders_grouping_data_is_the_first_800_training_samples():
    """As the authors measure task similarity: on the first 800 training images, not on the whole training set."""
    trainer = regression_trainer()
    seen = []
    trainer.fit = lambda data, epochs, **kwargs: seen.append(data)
    train = DataLoader(Regression(1000, 0), batch_size=100)
    trainer.train(train, regression_loaders()[1], 1, progress=False)
    assert [int(i) for i in seen[0].holdout.indices] == list(range(800)) and seen[0].holdout.dataset is train.dataset


def test_val_dataloaders_are_the_grouping_data_and_are_evaluated_after_training():
    """Given ``val_dataloaders``, grouping decisions are measured on its samples (not the training set's), and
    ``train`` returns their results beside the test set's, both from the last epoch's model (fit really trains
    here: with it stubbed out, results from before training would equal those after it)."""
    trainer = regression_trainer()
    seen, fit = [], trainer.fit

    def recording_fit(data, epochs, **kwargs):
        seen.append(data)
        return fit(data, epochs, **kwargs)

    trainer.fit = recording_fit
    train, test = regression_loaders()
    val = DataLoader(Regression(12, 7), batch_size=4)
    before = trainer.test(val, mode="val")
    results = trainer.train(train, test, 1, val_dataloaders=val, progress=False)
    assert seen[0].holdout is val.dataset and seen[0].test is test.dataset and trainer.epochs_done == 1
    assert results.keys() == {"test", "val"} and results["val"] != results["test"]
    assert results["val"] == trainer.test(val, mode="val") != before


def test_loaders_of_other_forms_and_return_weight_are_refused_in_one_line():
    """LibMTL's ``multi_input`` form of ``train_dataloaders`` (a dict of loaders), batches that are not a
    DataLoader and ``return_weight=True``, which this Trainer does not support, are refused before any training."""
    trainer = regression_trainer()
    train, test = regression_loaders()
    for args, kwargs, message in (((dict.fromkeys(TASKS, train), test, 1), {}, r"^train_dataloaders must be one "
                                   r"DataLoader .*not a dict of loaders"),
                                  ((train, list(test), 1), {}, r"^test_dataloaders must be a torch DataLoader, "
                                   r"got list$"),
                                  ((train, test, 1), {"return_weight": True}, r"^return_weight is not supported")):
        with pytest.raises(ValueError, match=message) as error:
            trainer.train(*args, progress=False, **kwargs)
        assert len(str(error.value).splitlines()) == 1 and trainer.epochs_done == 0


def test_rep_grad_weightings_on_a_libmtl_architecture():
    """GradDrop needs rep_grad=True on LibMTL's architectures (as LibMTL says at its first step); PCGrad, GradVac
    and CAGrad refuse rep_grad=True: both in one line before training."""
    trainer = regression_trainer(weighting="GradDrop", rep_grad=True)
    assert all(np.isfinite(v) for v in trainer.train(*regression_loaders(), 1, progress=False)["test"].values())
    with pytest.raises(ValueError, match=r"^weighting GradDrop combines the gradients of the shared representation: "
                                         r"pass rep_grad=True$"):
        regression_trainer(weighting="GradDrop")
    for weighting in ("PCGrad", "GradVac", "CAGrad"):
        with pytest.raises(ValueError, match=rf"^weighting {weighting} combines the gradients of the shared "
                                             r"parameters, not of the representation: pass rep_grad=False$"):
            regression_trainer(weighting=weighting, rep_grad=True)


# ----------------------------------------------------------------------------------------- save_path, load_path
def test_load_path_as_libmtl_scripts_give_it(tmp_path):
    """LibMTL's test mode: ``Trainer(..., save_path=X, load_path=X)`` then ``test()``; a folder means the weights
    saved in it (LibMTL: best.pt, here model.pt), and LibMTL's own best.pt (a bare state dict) loads into
    LibMTL's architectures as LibMTL loads it."""
    train, test = regression_loaders()
    trained = regression_trainer(save_path=tmp_path / "run")
    expected = trained.train(train, test, 1, progress=False)["test"]
    assert regression_trainer(load_path=tmp_path / "run").test(test) == expected
    assert regression_trainer(save_path=tmp_path / "run", load_path=tmp_path / "run").test(test) == expected
    torch.save(trained.model.state_dict(), tmp_path / "best.pt")  # what LibMTL's save_path holds
    assert regression_trainer(load_path=tmp_path / "best.pt").test(test) == expected
    with pytest.raises(FileNotFoundError, match=r"^load_path .*empty' is a folder without model.pt \(the weights a "
                                                r"Trainer writes to its save_path\)$"):
        (tmp_path / "empty").mkdir()
        regression_trainer(load_path=tmp_path / "empty")
    torch.save({"lin.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"^load_path .*other.pt holds none of this model's parameters"):
        regression_trainer(load_path=tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"^load_path .*missing.pt' is not a file$"):  # a mistyped name
        regression_trainer(load_path=tmp_path / "missing.pt")


def test_a_bare_state_dict_for_mtsl_is_refused_in_one_line(tmp_path):
    torch.save({"encoder.x": torch.zeros(1)}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match=r"^load_path .*best.pt is a bare state dict \(as LibMTL's save_path writes "
                                         r"best.pt\), without the MTSL network's plan: give a model.pt or "
                                         r"checkpoint.pt written by this package$"):
        mtsl_plugin.Trainer(task_dict=regression_task_dict(("0", "1")), weighting="EW", architecture="MTSL",
                            encoder_class=tiny_resnet, decoders={t: nn.Conv2d(64, 1, 1) for t in "01"},
                            device="cpu", load_path=tmp_path / "best.pt")


# ---------------------------------------------------------------------------------- arguments LibMTL takes
def test_test_prints_every_metric_of_the_task_dict(capsys):
    trainer = regression_trainer()
    scores = trainer.test(regression_loaders()[1])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test: 0 MAE ") and "MAE2" in line and line.count("|") == 2
    assert scores == {t: pytest.approx(float(line.split(f"{t} MAE ")[1].split()[0]), abs=1e-4) for t in TASKS}


@pytest.mark.parametrize("scheduler_param, lrs", [
    (None, [1e-2, 1e-2, 1e-2]),
    ({"scheduler": "step", "step_size": 1, "gamma": 0.5}, [1e-2, 5e-3, 2.5e-3]),
    ({"scheduler": "exp", "gamma": 0.1}, [1e-2, 1e-3, 1e-4]),
    ({"scheduler": "cos", "T_max": 2}, [1e-2, 5e-3, 0.0]),
])
def test_libmtl_schedulers_step_once_an_epoch(scheduler_param, lrs):
    trainer = regression_trainer(optim_param={"optim": "sgd", "lr": 1e-2, "weight_decay": 0, "momentum": 0.9},
                                 scheduler_param=scheduler_param)
    seen, step = [], trainer.queue_step
    trainer.queue_step = lambda *a: seen.append(trainer.optimizer.param_groups[0]["lr"]) or step(*a)
    trainer.train(*regression_loaders(), 3, progress=False)  # 4 batches an epoch, stepped after each epoch
    assert seen == pytest.approx([lr for lr in lrs for _ in range(4)])


@pytest.mark.parametrize("change, message", [
    ({"multi_input": True}, r"^multi_input=True \(a DataLoader per task, as in LibMTL's Office-31 and Office-Home "
                            r"examples\) is not supported: this Trainer trains every task on each batch of one "
                            r"DataLoader whose samples hold all the tasks' targets$"),
    ({"optim_param": {"optim": "adamw", "lr": 1e-3}}, r"^optim_param\['optim'\] 'adamw' is not an optimizer LibMTL "
                                                      r"builds; choose from sgd, adam, adagrad, rmsprop$"),
    ({"optim_param": {"lr": 1e-3}}, r"^optim_param names no 'optim'"),
    ({"scheduler_param": {"scheduler": "reduce", "mode": "max"}},
     r"^scheduler_param\['scheduler'\] 'reduce' is not a scheduler LibMTL 1.1.5 builds; choose from exp, step, cos "
     r"\(or multistep\)$"),
    ({"scheduler_param": {"scheduler": "cos"}}, r"^scheduler_param \{'scheduler': 'cos'\} cannot be built: .*T_max"),
    ({"bilevel_param": {"bilevel_method": "MOML"}}, r"^bilevel_param \(later LibMTL versions' bilevel methods\) is "
                                                    r"not supported: pass bilevel_param=None$"),
    ({"weight_arg": {"T": 5.0}}, r"^Trainer got unexpected keyword argument\(s\) \['weight_arg'\]; LibMTL's keyword "
                                 r"arguments are weight_args and arch_args$"),
])
def test_what_this_trainer_cannot_do_is_refused_when_it_is_built(change, message):
    with pytest.raises(ValueError, match=message):
        regression_trainer(**change)


def test_an_override_of_a_libmtl_hook_this_loop_never_calls_is_refused():
    class Graphs(mtsl_plugin.Trainer):
        def _process_data(self, loader):  # e.g. to move a torch_geometric batch and build its labels
            raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"^Graphs overrides LibMTL's _process_data, which this Trainer never calls "
                                         r"\(it draws \(inputs, \{task: target\}\) batches itself\): override "
                                         r"process_preds"):
        regression_trainer(Graphs)


def test_libmtl_keyword_arguments_that_change_nothing_are_taken():
    trainer = regression_trainer(bilevel_param=None, weighting=LibMTL.weighting.EW,
                                 architecture=LibMTL.architecture.HPS)
    assert trainer.train(*regression_loaders(), 1, progress=False)["test"].keys() == set(TASKS)
