"""Tests of the plugin manager: built-ins, lookups, contract checks, explicit and entry-point plugins."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtsl_plugin.plugins import (
    DuplicateNameError,
    PluginContractError,
    PluginError,
    PluginLoadError,
    UnknownNameError,
    amalgamator,
    available,
    grouping_solver,
    hookimpl,
    load_plugin,
    plugin_manager,
    reset_plugin_manager,
    similarity,
)

pytestmark = pytest.mark.usefixtures("fresh_manager")

FIXTURE_PLUGIN = Path(__file__).with_name("fixture_plugin")


def _plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module named ``name`` whose hooks return the given dicts."""
    module = types.ModuleType(name)
    for hook_name, offered in hooks.items():
        setattr(module, hook_name, hookimpl(lambda offered=offered: offered))
    return module


def _write_module(directory: Path, name: str, source: str, monkeypatch, forget_modules: list[str]) -> None:
    """Write an importable module ``name`` into ``directory``, put it on sys.path, and forget it afterwards."""
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(directory))
    forget_modules.append(name)


def test_builtins_are_listed_and_registered_like_any_plugin() -> None:
    assert available("similarity") == ["cka", "rsa"]
    assert available("grouping") == ["authors", "authors_local", "exhaustive", "exhaustive_local", "fewest_groups",
                                     "fewest_groups_local"]
    assert available("amalgamator") == ["att", "average"]
    pm = plugin_manager()
    assert plugin_manager() is pm
    names = {pm.get_name(plugin) for plugin in pm.get_plugins()}
    assert {"mtsl_plugin.plugins.builtin_similarity", "mtsl_plugin.plugins.builtin_grouping"} <= names
    assert similarity("cka").plugin == "mtsl_plugin.plugins.builtin_similarity"
    with pytest.raises(ValueError, match="Unknown plugin kind 'metric'"):
        available("metric")


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(UnknownNameError, match="Unknown similarity metric 'cca'; available: cka, rsa") as info:
        similarity("cca")
    assert isinstance(info.value, KeyError) and isinstance(info.value, PluginError)
    with pytest.raises(UnknownNameError, match="authors, authors_local, exhaustive, exhaustive_local"):
        grouping_solver("greedy")
    with pytest.raises(UnknownNameError, match="att, average"):
        amalgamator("kd")


def test_similarity_wrapper_names_the_bad_argument() -> None:
    metric = similarity("cka")
    with pytest.raises(ValueError, match="Argument x"):
        metric(torch.randn(8, 2, 2), torch.randn(8, 3))
    with pytest.raises(ValueError, match="Argument y"):
        metric(torch.randn(8, 3), torch.arange(8)[:, None])
    with pytest.raises(ValueError, match="same number of rows N, got 8 and 9"):
        metric(torch.randn(8, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="at least 4 samples"):
        metric(torch.randn(3, 3), torch.randn(3, 3))
    plugin_manager().register(_plugin("lenient_metrics", mtsl_similarity_metrics={"lenient": lambda x, y: x.sum()}))
    with pytest.raises(ValueError, match="'lenient' needs at least 4 samples"):  # checked for every plugin's metric
        similarity("lenient")(torch.randn(3, 3), torch.randn(3, 3))


@pytest.mark.parametrize(
    "returned, described",
    [
        (torch.tensor(float("nan")), "value nan"),
        (torch.ones(2, 2), r"shape \(2, 2\)"),
        (0.5, "0.5"),
    ],
)
def test_misbehaving_similarity_is_named(returned, described) -> None:
    plugin_manager().register(_plugin("shaky_metrics", mtsl_similarity_metrics={"shaky": lambda x, y: returned}))
    assert "shaky" in available("similarity")
    with pytest.raises(PluginContractError, match=f"'shaky' of plugin 'shaky_metrics' returned .*{described}"):
        similarity("shaky")(torch.randn(6, 2), torch.randn(6, 3))


@pytest.mark.parametrize(
    "returned",
    [[["a", "b"]], [["a", "b"], ["c", "a"]], [["a"], ["b"], ["c"], ["x"]], [["a", "b"], []], "abc", [["a"], "bc"],
     [["a", "a"], ["b"]], [["a", "b"], ["x"]]],  # as many names as tasks, but one twice or one unknown
)
def test_non_partition_is_a_contract_error_naming_the_plugin(returned) -> None:
    plugin_manager().register(
        _plugin("bad_grouping", mtsl_grouping_solvers={"bad": lambda similarity, tasks, threshold: returned})
    )
    with pytest.raises(PluginContractError, match="'bad' of plugin 'bad_grouping' returned .*not a partition"):
        grouping_solver("bad")(np.eye(3), ["a", "b", "c"], 0.5)


def test_grouping_wrapper_returns_canonical_order_and_checks_inputs() -> None:
    reverse = lambda similarity, tasks, threshold: [list(reversed(tasks[2:])), [tasks[1], tasks[0]]]
    plugin_manager().register(_plugin("backwards", mtsl_grouping_solvers={"backwards": reverse}))
    solver = grouping_solver("backwards")
    assert solver(np.eye(4), ["a", "b", "c", "d"], 0.0) == [["a", "b"], ["c", "d"]]
    with pytest.raises(ValueError, match=r"shape \(3, 3\), expected \(4, 4\)"):
        solver(np.eye(3), ["a", "b", "c", "d"], 0.0)
    with pytest.raises(ValueError, match="distinct"):
        solver(np.eye(2), ["a", "a"], 0.0)


def test_misbehaving_amalgamators_are_named() -> None:
    class NanLoss(nn.Module):
        def forward(self, group_out, task_outs):
            return group_out.sum() * float("nan")

    plugin_manager().register(
        _plugin(
            "bad_amalgamation",
            mtsl_amalgamators={"nan": lambda channels, tasks: NanLoss(), "text": lambda channels, tasks: "loss"},
        )
    )
    module = amalgamator("nan")(4, ["a", "b"])
    with pytest.raises(PluginContractError, match="'nan' of plugin 'bad_amalgamation' computed a loss .*nan"):
        module(torch.ones(1, 4, 2, 2), {"a": torch.ones(1, 4, 2, 2), "b": torch.ones(1, 4, 2, 2)})
    with pytest.raises(PluginContractError, match="'text' of plugin 'bad_amalgamation' returned 'loss'"):
        amalgamator("text")(4, ["a", "b"])


def test_hook_returning_a_non_dict_is_named() -> None:
    plugin_manager().register(_plugin("listy", mtsl_similarity_metrics=["cos"]))
    with pytest.raises(PluginContractError, match="Plugin 'listy' returned .*expected a dict"):
        available("similarity")


def test_duplicate_names_name_both_plugins() -> None:
    plugin_manager().register(_plugin("copycat", mtsl_similarity_metrics={"cka": lambda x, y: x.sum()}))
    with pytest.raises(DuplicateNameError, match="'cka' is offered by two plugins") as info:
        similarity("cka")
    assert "mtsl_plugin.plugins.builtin_similarity" in str(info.value) and "copycat" in str(info.value)


def test_load_plugin_by_module_name_is_idempotent(tmp_path, monkeypatch, forget_modules) -> None:
    _write_module(
        tmp_path,
        "mtsl_test_half_plugin",
        """
        from mtsl_plugin.plugins import hookimpl

        @hookimpl
        def mtsl_similarity_metrics():
            return {"half_cka": lambda x, y: 0.5 * (x.mean() * 0 + 1)}
        """,
        monkeypatch,
        forget_modules,
    )
    module = load_plugin("mtsl_test_half_plugin")
    assert load_plugin("mtsl_test_half_plugin") is module
    assert available("similarity") == ["cka", "half_cka", "rsa"]
    assert similarity("half_cka")(torch.randn(5, 2), torch.randn(5, 2)).item() == 0.5
    assert similarity("half_cka").plugin == "mtsl_test_half_plugin"


def test_load_plugin_errors_name_the_module(tmp_path, monkeypatch, forget_modules) -> None:
    with pytest.raises(PluginLoadError, match="Could not import plugin module 'no_such_mtsl_plugin'"):
        load_plugin("no_such_mtsl_plugin")
    _write_module(tmp_path, "mtsl_test_broken", "import no_such_dependency_xyz\n", monkeypatch, forget_modules)
    with pytest.raises(PluginLoadError, match="'mtsl_test_broken'.*no_such_dependency_xyz"):
        load_plugin("mtsl_test_broken")
    _write_module(tmp_path, "mtsl_test_hookless", "VALUE = 1\n", monkeypatch, forget_modules)
    with pytest.raises(PluginLoadError, match="'mtsl_test_hookless' implements no mtsl_plugin hook"):
        load_plugin("mtsl_test_hookless")
    _write_module(
        tmp_path,
        "mtsl_test_typo",
        """
        from mtsl_plugin.plugins import hookimpl

        @hookimpl
        def mtsl_similarity_metric():
            return {}
        """,
        monkeypatch,
        forget_modules,
    )
    with pytest.raises(PluginLoadError, match="'mtsl_test_typo'.*unknown hook 'mtsl_similarity_metric'"):
        load_plugin("mtsl_test_typo")
    assert available("similarity") == ["cka", "rsa"]  # failed plugins leave nothing registered


def test_third_party_package_is_found_through_its_entry_point(tmp_path, monkeypatch, forget_modules) -> None:
    source = tmp_path / "src"
    site = tmp_path / "site"
    shutil.copytree(FIXTURE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "--quiet", "--target", str(site), str(source)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert available("similarity") == ["cka", "rsa"]  # not installed on the path yet

    monkeypatch.syspath_prepend(str(site))
    forget_modules.append("mtsl_fixture_plugin")
    reset_plugin_manager()
    assert available("similarity") == ["cka", "rsa", "test_cosine"]
    assert "test_singletons" in available("grouping")
    metric = similarity("test_cosine")
    assert metric.plugin == "fixture"
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 4, dtype=torch.float64)
    k, l = (x @ x.T).flatten(), (y @ y.T).flatten()
    torch.testing.assert_close(metric(x, y), torch.dot(k, l) / (k.norm() * l.norm()))
    assert metric(x, 2.0 * x).item() == pytest.approx(1.0)
    assert grouping_solver("test_singletons")(np.ones((3, 3)), ["c", "a", "b"], 0.5) == [["c"], ["a"], ["b"]]
    assert not (FIXTURE_PLUGIN / "build").exists()
    assert not list(FIXTURE_PLUGIN.glob("*.egg-info"))
