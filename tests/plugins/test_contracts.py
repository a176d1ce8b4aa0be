"""Plugins that raise, edit their arguments or break the loss contract: each is stopped in one line naming the
plugin, and nothing else (the built-ins, the caller's similarity matrix) is harmed; plugins in the working
directory load like ``python -m`` would find them."""
from __future__ import annotations

import os
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from torch import nn

from mtsl_plugin.learner.schedule import MTSLConfig
from mtsl_plugin.learner.structural import StructuralLearner
from mtsl_plugin.preflight import check_mtsl
from mtsl_plugin.plugins import (
    PluginContractError,
    PluginLoadError,
    amalgamator,
    available,
    grouping_solver,
    hookimpl,
    load_plugin,
    plugin_manager,
    similarity,
)

pytestmark = pytest.mark.usefixtures("fresh_manager")

MATRIX = np.array([[1.0, 0.9, 0.2], [0.9, 1.0, 0.3], [0.2, 0.3, 1.0]])
TASKS = ("S", "D", "E")

BUILT_IN_SOLVERS = ["authors", "authors_local", "exhaustive", "exhaustive_local", "fewest_groups",
                    "fewest_groups_local"]


def _plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module named ``name`` whose hooks are the given functions (of no argument)."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def _raise(error: Exception):
    raise error


# ------------------------------------------------------------------------------ A5: the solver gets a copy
def _centred(similarity, tasks, threshold):
    """Centres the matrix on the threshold in place, then groups the pairs above it (an innocent-looking edit)."""
    similarity -= threshold
    groups, used = [], set()
    for i, a in enumerate(tasks):
        if a not in used:
            group = [a] + [b for j, b in enumerate(tasks) if j > i and b not in used and similarity[i, j] > 0]
            used.update(group)
            groups.append(group)
    return groups


def test_a_solver_editing_its_matrix_in_place_changes_neither_the_merge_nor_the_record() -> None:
    plugin_manager().register(_plugin("centring", mtsl_grouping_solvers=lambda: {"centred": _centred}))
    learner = StructuralLearner(MTSLConfig.from_dict({"grouping": "centred", "threshold": 0.8}))
    matrix = MATRIX.copy()
    partition, chosen = learner.decide(matrix, TASKS)
    assert partition == [["S", "D"], ["E"]]
    assert chosen == [("S", "D")]  # S-D's measured 0.9 reaches gamma = 0.8
    np.testing.assert_array_equal(matrix, MATRIX)  # what phase_<k>.json records: the measured similarities
    tensor = torch.tensor(MATRIX)
    assert grouping_solver("centred")(tensor, list(TASKS), 0.8) == [["S", "D"], ["E"]]
    assert torch.equal(tensor, torch.tensor(MATRIX))


# ------------------------------------------------------------------------------ B3: a loss without gradient
class _NoGrad(nn.Module):
    def forward(self, group_out, task_outs):
        return torch.tensor(float((group_out.detach() ** 2).mean()))


def test_an_amalgamation_loss_without_gradient_is_named() -> None:
    plugin_manager().register(_plugin("detaching", mtsl_amalgamators=lambda: {"nograd": lambda c, t: _NoGrad()}))
    module = amalgamator("nograd")(4, ["a", "b"])
    features = {t: torch.randn(2, 4, 3, 3) for t in "ab"}
    with pytest.raises(PluginContractError, match="'nograd' of plugin 'detaching'.*no gradient") as caught:
        module(torch.randn(2, 4, 3, 3, requires_grad=True), features)
    assert "\n" not in str(caught.value)
    with torch.no_grad():  # evaluation: no graph expected
        module(torch.randn(2, 4, 3, 3), features)
    module(torch.randn(2, 4, 3, 3), features)  # nothing to differentiate: no graph expected either
    att = amalgamator("att")(4, ["a", "b"])  # the built-in keeps passing, with and without a graph to its input
    assert att(torch.randn(2, 4, 3, 3, requires_grad=True), features).requires_grad
    att(torch.randn(2, 4, 3, 3), features)


# ------------------------------------------------------------------------------ C1: a plugin that raises
def test_a_raising_hook_is_named_and_leaves_the_other_plugins_usable() -> None:
    plugin_manager().register(
        _plugin("raiser", mtsl_similarity_metrics=lambda: _raise(RuntimeError("config file missing"))))
    assert similarity("cka").plugin == "mtsl_plugin.plugins.builtin_similarity"  # the built-ins still work
    assert sorted(t for g in grouping_solver("exhaustive")(MATRIX, list(TASKS), 0.8) for t in g) == sorted(TASKS)
    expected = "Plugin 'raiser': its hook mtsl_similarity_metrics raised RuntimeError: config file missing"
    with pytest.raises(PluginContractError, match=expected):
        available("similarity")  # a listing would be incomplete
    with pytest.raises(PluginContractError, match=f"'gram'.*{expected}"):
        similarity("gram")  # perhaps offered by the broken plugin: say so rather than "unknown"
    assert available("grouping") == BUILT_IN_SOLVERS


def test_load_plugin_refuses_a_module_whose_hook_raises_or_returns_no_dict(tmp_path, monkeypatch,
                                                                           forget_modules) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    sources = {
        "mtsl_test_raising_hook": "raise RuntimeError('config file missing')",
        "mtsl_test_listing_hook": "return [('x', len)]",
    }
    for module, body in sources.items():
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
            from mtsl_plugin.plugins import hookimpl

            @hookimpl
            def mtsl_grouping_solvers():
                {body}
            """), encoding="utf-8")
        forget_modules.append(module)
    with pytest.raises(PluginLoadError, match="'mtsl_test_raising_hook'.*mtsl_grouping_solvers.*RuntimeError: "
                                              "config file missing") as caught:
        load_plugin("mtsl_test_raising_hook")
    assert "\n" not in str(caught.value)
    with pytest.raises(PluginLoadError, match="'mtsl_test_listing_hook'.*expected a dict"):
        load_plugin("mtsl_test_listing_hook")
    assert available("grouping") == BUILT_IN_SOLVERS  # neither stays registered


def _picky(x, y):
    if x.shape[1] != y.shape[1]:
        raise ValueError("channel counts differ")
    return (x * y).mean()


def _keyed(similarity, tasks, threshold):
    raise KeyError("tasks")


def _failing_factory(channels, tasks):
    raise IndexError("only pairs supported")


def test_plugin_objects_that_raise_are_named_in_one_line() -> None:
    pm = plugin_manager()
    pm.register(_plugin("picky_plugin", mtsl_similarity_metrics=lambda: {"picky": _picky}))
    pm.register(_plugin("keyed_plugin", mtsl_grouping_solvers=lambda: {"keyed": _keyed}))
    pm.register(_plugin("pairs_plugin", mtsl_amalgamators=lambda: {"pairs": _failing_factory}))
    with pytest.raises(PluginContractError, match="Similarity metric 'picky' of plugin 'picky_plugin' raised "
                                                  "ValueError: channel counts differ"):
        similarity("picky")(torch.randn(8, 4), torch.randn(8, 6))
    assert similarity("picky")(torch.ones(8, 4), torch.ones(8, 4)).item() == 1.0
    with pytest.raises(PluginContractError, match="Grouping solver 'keyed' of plugin 'keyed_plugin' raised KeyError"):
        grouping_solver("keyed")(MATRIX, list(TASKS), 0.8)
    with pytest.raises(PluginContractError, match="Amalgamator 'pairs' of plugin 'pairs_plugin' raised IndexError: "
                                                  "only pairs supported"):
        amalgamator("pairs")(4, ["a", "b", "c"])
    with pytest.raises(ValueError, match="Argument x"):  # the caller's mistakes stay ValueErrors, not the plugin's
        similarity("picky")(torch.randn(8, 2, 2), torch.randn(8, 3))


class _BrokenForward(nn.Module):
    def forward(self, group_out, task_outs):
        raise RuntimeError("forward broke")


def _rows(similarity, tasks, threshold):
    return np.array([[t] for t in tasks])  # a partition, but as a numpy array: refused, its repr spans 3 lines


def test_an_amalgamation_module_raising_in_forward_is_named_in_one_line() -> None:
    plugin_manager().register(_plugin("breaking", mtsl_amalgamators=lambda: {"broken": lambda c, t: _BrokenForward()}))
    module = amalgamator("broken")(4, ["a", "b"])
    features = {t: torch.randn(2, 4, 3, 3) for t in "ab"}
    with pytest.raises(PluginContractError, match="The module of amalgamator 'broken' of plugin 'breaking' raised "
                                                  "RuntimeError: forward broke"):
        module(torch.randn(2, 4, 3, 3, requires_grad=True), features)
    with pytest.raises(PluginContractError, match="'broken' of plugin 'breaking' raised RuntimeError"):
        check_mtsl(MTSLConfig.from_dict({"amalgamator": "broken"}))  # so the preflight stops it before training


def test_a_bad_return_value_with_a_multi_line_repr_is_described_on_one_line() -> None:
    plugin_manager().register(_plugin("rows_plugin", mtsl_grouping_solvers=lambda: {"rows": _rows}))
    with pytest.raises(PluginContractError, match="'rows' of plugin 'rows_plugin' returned array") as caught:
        grouping_solver("rows")(MATRIX, list(TASKS), 0.8)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ C2: the working directory
def test_load_plugin_finds_a_module_in_the_working_directory(tmp_path, monkeypatch, forget_modules) -> None:
    """``python benchmarks/compare.py --plugin blob_kind`` run where ``blob_kind.py`` lies (the README's recipe):
    the script's folder, not the working directory, is on the import path."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".") and p != os.getcwd()])
    (tmp_path / "mtsl_test_cwd_kind.py").write_text(textwrap.dedent("""
        from mtsl_plugin.plugins import hookimpl

        def halves(similarity, tasks, threshold):
            return [[t] for t in tasks]

        @hookimpl
        def mtsl_grouping_solvers():
            return {"cwd_singletons": halves}
        """), encoding="utf-8")
    forget_modules.append("mtsl_test_cwd_kind")
    monkeypatch.chdir(tmp_path)
    module = load_plugin("mtsl_test_cwd_kind")
    assert module.__file__ == str(tmp_path / "mtsl_test_cwd_kind.py")
    assert grouping_solver("cwd_singletons")(MATRIX, list(TASKS), 0.8) == [["S"], ["D"], ["E"]]
    with pytest.raises(PluginLoadError, match=r"name the module, not its file: mtsl_test_cwd_kind\b"):
        load_plugin("./mtsl_test_cwd_kind.py")
    with pytest.raises(PluginLoadError, match="No module named 'no_such_mtsl_module'.*working directory"):
        load_plugin("no_such_mtsl_module")
