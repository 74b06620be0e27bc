"""siftc.config and the one-default-per-setting rule: each setting's default is written once, on its
config dataclass (or the scheduler constants it reads), and everything else (the schedulers, the CLI's
defaults, choices and help) reads it from there."""
import dataclasses
import inspect

import pytest

import siftc.sparse as sp
from siftc.cli.options import defaults
from siftc.config import ConvertConfig
from siftc.errors import UsageError
from siftc.passes import KINDS
from siftc.train import TrainConfig


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_registered_kind_is_a_valid_config(kind):
    assert ConvertConfig(kind=kind, sparsity=0.5).kind == kind


def test_unknown_kind_names_the_registry_kinds():
    with pytest.raises(UsageError, match="unknown kind 'wider'; choose one of: " + ", ".join(KINDS)):
        ConvertConfig(kind="wider", sparsity=0.5)


def test_convert_config_has_no_write_only_fields():
    cfg = ConvertConfig(kind="wide", sparsity=0.5, seed=3, round_to=8)
    assert {f.name for f in dataclasses.fields(cfg)} == set(cfg.to_json())  # every field is saved
    assert ConvertConfig.from_json(cfg.to_json()) == cfg


def test_defaults_reads_plain_field_defaults_only():
    d = defaults(TrainConfig)
    assert "artifact" not in d and d["steps"] is None and d["batch_size"] == TrainConfig("a", "d", "o").batch_size


def test_schedulers_and_train_config_share_the_paper_schedule():
    train = TrainConfig("a", "d", "o")
    params = inspect.signature(sp.Static.__init__).parameters
    for name in ("update_every", "drop_fraction", "end_fraction"):
        assert params[name].default == getattr(train, name), name


def test_train_config_backend_is_the_clis():
    from siftc.cli.train import train

    backend = next(p for p in train.params if p.name == "backend")
    assert TrainConfig("a", "d", "o").backend == backend.default == "auto"
    assert "auto" in backend.type.choices
