"""The typed config: one source of defaults (the schema), immutable, and what the run acts on."""
import dataclasses

import pytest

from ds_offload.config import (BLOCK, ModelOffloadConfig, OffloadConfig, OptimizerOffloadConfig, load_config,
                               load_schema)

SECTIONS = {"model": ModelOffloadConfig, "optimizer": OptimizerOffloadConfig}
PY_TYPES = {"boolean": bool, "integer": int, "number": float}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_fields_are_the_schema_keys_with_its_defaults_types_and_docs(section):
    props = load_schema()["$defs"][section]["properties"]
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert list(fields) == list(props)
    for name, f in fields.items():
        assert f.default == props[name]["default"], name
        assert f.type is PY_TYPES[props[name]["type"]], name
        assert f.metadata["doc"] == props[name]["description"]
        assert name in SECTIONS[section].__doc__


def test_load_config_returns_typed_immutable_config():
    cfg = load_config({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"betas": (0.9, 0.95)}},
                       BLOCK: {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.25}}})
    assert isinstance(cfg, OffloadConfig)
    assert cfg.optimizer.optimizer_offload_fraction == 0.25 and cfg.optimizer.enabled and not cfg.model.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optimizer.optimizer_offload_fraction = 1.0
    with pytest.raises(TypeError):
        cfg.deepspeed["train_batch_size"] = 4
    with pytest.raises(TypeError):
        cfg.deepspeed["optimizer"]["params"]["lr"] = 1.0
    ds = cfg.deepspeed_config()
    assert ds == {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}
    ds["optimizer"]["params"]["lr"] = 1.0  # a fresh copy: DeepSpeed may write into it
    assert "lr" not in cfg.deepspeed["optimizer"]["params"]


def test_to_dict_round_trips_and_drops_editor_keys():
    raw = {"$schema": "x.json", "train_batch_size": 8, BLOCK: {"model": {"cpu_offloading": True,
                                                                    "cpu_offloading_num_layers": 2}}}
    cfg = load_config(raw)
    assert "$schema" not in cfg.deepspeed
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.to_dict()[BLOCK]["model"]["cpu_offloading_prefetch_depth"] == 1  # defaults written out


def test_caller_dict_left_alone():
    raw = {BLOCK: {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1}}}
    load_config(raw)
    assert raw == {BLOCK: {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1}}}
