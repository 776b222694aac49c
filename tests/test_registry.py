from importlib.metadata import EntryPoint

import pytest
from typer.testing import CliRunner

import headzoo
from headzoo import registry
from headzoo.cli import app
from headzoo.errors import HeadzooError


def test_builtin_and_plugin_heads_are_registered():
    names = headzoo.list_heads()
    assert {"dense", "chunked", "dummy"} <= set(names)


def test_unknown_head_suggests_close_name():
    with pytest.raises(HeadzooError, match="did you mean 'chunked'"):
        headzoo.create_head("chunkd", 8, 10)


def test_two_distributions_claiming_one_name_is_an_error_naming_both():
    points = [
        EntryPoint("dense", "pkg_a.heads:Dense", registry.GROUP),
        EntryPoint("dense", "pkg_b.heads:Dense", registry.GROUP),
    ]
    with pytest.raises(HeadzooError, match="pkg_a.heads:Dense.*pkg_b.heads:Dense"):
        registry.discover(points)


def test_broken_plugin_is_listed_as_broken_and_others_still_work(monkeypatch):
    real = list(registry.entry_points(group=registry.GROUP))
    broken = EntryPoint("broken", "headzoo_module_that_does_not_exist:Head", registry.GROUP)
    monkeypatch.setattr(registry, "_installed", lambda: (*real, broken))
    result = CliRunner().invoke(app, ["heads"], terminal_width=300)
    assert result.exit_code == 0
    assert "broken" in result.output and "ModuleNotFoundError" in result.output
    assert "Full-logit baseline" in result.output  # dense still described
    assert headzoo.create_head("dense", 4, 3).num_classes == 3


def test_loading_is_lazy(monkeypatch):
    loaded = []
    monkeypatch.setattr(EntryPoint, "load", lambda self: loaded.append(self.name))
    registry.list_heads()
    assert loaded == []


def test_resolved_options_name_what_runs_never_auto():
    import torch
    from headzoo.registry import create_head

    assert create_head("dense", 8, 5, batch_dice=False, ignore_label=None).resolved_options(torch.device("cpu")) == {}
    knn = create_head("knn", 8, 5, batch_dice=False, ignore_label=None)
    assert knn.resolved_options(torch.device("cpu"))["knn_backend"] in ("faiss", "torch")
