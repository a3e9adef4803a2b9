"""Whatever goes in, a config or a ConfigError comes out: never another exception.

Property-based: random blocks, random DeepSpeed sections of the kinds the rules read, mutations of every
shipped config, and Python values JSON cannot hold, through both the dict and the file API.
"""
import json
import math
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ds_offload import ConfigError, check_config, load_config
from ds_offload.config import OffloadConfig, load_schema

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [json.loads(p.read_text()) for p in sorted((ROOT / "configs").glob("*.json"))]
DEFS = load_schema()["$defs"]
KEYS = {s: list(DEFS[s]["properties"]) for s in ("model", "optimizer")}

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["", "cpu", "nvme", "AdamW", "Lamb", "two", "auto"]))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                                st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                           max_leaves=8)
python_only = st.one_of(st.sets(st.integers(), max_size=2), st.binary(max_size=3), st.complex_numbers(),
                        st.just(object()), st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2))
any_value = st.one_of(json_values, python_only)


def section(keys, values):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=8), values, max_size=len(keys) + 1)


blocks = st.fixed_dictionaries({}, optional={"model": section(KEYS["model"], json_scalars),
                                             "optimizer": section(KEYS["optimizer"], json_scalars)}) | json_values
deepspeed_sections = st.fixed_dictionaries({}, optional={
    "zero_optimization": st.dictionaries(st.sampled_from(["stage", "offload_optimizer", "elastic_checkpoint"]),
                                         json_values | st.fixed_dictionaries({"device": json_scalars}), max_size=3)
    | json_scalars,
    "optimizer": st.fixed_dictionaries({}, optional={"type": json_scalars, "params": json_values}) | json_scalars,
    "hybrid_engine": st.dictionaries(st.sampled_from(["enable_cuda_graph", "enabled"]), json_scalars) | json_scalars,
    "compile": st.dictionaries(st.sampled_from(["offload_activation", "offload_opt_states", "kwargs"]),
                               json_values) | json_scalars,
    "activation_checkpointing": st.dictionaries(st.sampled_from(["partition_activations", "cpu_checkpointing"]),
                                                json_scalars) | json_scalars,
    "bf16": json_values, "zero_optimisation": json_values})


def outcome(config, **facts):
    """Run both APIs; the only exception allowed is ConfigError, and they must agree."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            errors, _ = check_config(config, **facts)
        except ConfigError as e:
            errors = e.errors
        try:
            cfg = load_config(config, **facts)
        except ConfigError as e:
            assert e.errors and all(isinstance(p, str) and "Fix:" in m for p, m in e.errors), e.errors
            assert errors, "check_config found nothing that load_config refused"
            return None
    assert not errors, "check_config found problems that load_config accepted"
    assert isinstance(cfg, OffloadConfig)
    for section_cfg in (cfg.model, cfg.optimizer):
        for value in vars(section_cfg).values():
            assert not isinstance(value, float) or math.isfinite(value)
    assert isinstance(cfg.model.cpu_offloading_num_layers, int) and not isinstance(
        cfg.model.cpu_offloading_num_layers, bool)
    return cfg


FAST = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))


@FAST
@given(block=blocks, ds=deepspeed_sections, layers=st.none() | st.integers(0, 20))
def test_random_blocks_and_deepspeed_sections(block, ds, layers):
    outcome({**ds, "cpu_offloading": block}, model_layers=layers)


def _mutate(draw, value, depth=0):
    if isinstance(value, dict) and value and depth < 4:
        key = draw(st.sampled_from(sorted(value)))
        op = draw(st.sampled_from(["set", "drop", "recurse", "rename"]))
        out = dict(value)
        if op == "set":
            out[key] = draw(any_value)
        elif op == "drop":
            del out[key]
        elif op == "rename":
            out[key + draw(st.sampled_from(["_", "s", "x"]))] = out.pop(key)
        else:
            out[key] = _mutate(draw, value[key], depth + 1)
        return out
    return draw(any_value)


@st.composite
def mutated_configs(draw):
    cfg = draw(st.sampled_from(CONFIGS))
    for _ in range(draw(st.integers(1, 3))):
        cfg = _mutate(draw, cfg)
    return cfg


@FAST
@given(cfg=mutated_configs())
def test_mutations_of_every_shipped_config(cfg):
    outcome(cfg)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=mutated_configs().filter(lambda c: isinstance(c, dict)))
def test_file_api_agrees_with_dict_api(tmp_path_factory, cfg):
    try:
        text = json.dumps(cfg)
    except (TypeError, ValueError):
        return  # not JSON-encodable: only the dict API can carry it
    path = tmp_path_factory.mktemp("c") / "c.json"
    path.write_text(text)
    assert (outcome(str(path)) is None) == (outcome(json.loads(text)) is None)


@settings(max_examples=200, deadline=None)
@given(facts=st.fixed_dictionaries({}, optional={"model_layers": any_value | st.integers(),
                                                 "pipeline_stages": any_value, "gradient_checkpointing": any_value,
                                                 "fine_grained": any_value}),
       top=any_value)
def test_python_values_through_the_dict_api(facts, top):
    outcome(top, **facts)
    outcome({"cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1}}}, **facts)


@pytest.mark.parametrize("config, path", [
    ({"hybrid_engine": True, "cpu_offloading": {"model": {"cpu_offloading": True}}}, "hybrid_engine"),
    ({"optimizer": "AdamW", "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True}}}, "optimizer"),
    ({"zero_optimization": "x", "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True}}},
     "zero_optimization"),
    ({"zero_optimization": {"offload_optimizer": "cpu"}, "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True}}},
     "zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"stage": "two"}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": float("nan")}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": float("inf")}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": [2]}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": {}}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2.0}}, "zero_optimization.stage"),
    ({"compile": []}, "compile"),
    ({"cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": float("nan")}}},
     "cpu_offloading.optimizer.optimizer_offload_fraction"),
    ({"cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2.0}}},
     "cpu_offloading.model.cpu_offloading_num_layers"),
    ({"cpu_offloading": {"model": {"cpu_offloading_prefetch_depth": 1.0}}},
     "cpu_offloading.model.cpu_offloading_prefetch_depth"),
    ({1: 2}, "1"), ({None: 2}, "None"),
    ({"cpu_offloading": {"model": {"cpu_offloading": {1}}}}, "cpu_offloading.model.cpu_offloading"),
    ({"cpu_offloading": {"model": {"cpu_offloading_num_layers": 1j}}}, "cpu_offloading.model.cpu_offloading_num_layers"),
    ({"optimizer": {"type": b"AdamW"}}, "optimizer.type"),
    ([1, 2], "$"),
])
def test_minimal_cases_from_the_fuzzer(config, path):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert path in [p for p, _ in info.value.errors], info.value.errors


def test_deep_nesting_is_an_error_not_a_recursion(tmp_path):
    deep = inner = {}
    for _ in range(3000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(ConfigError, match="nested more than"):
        load_config(deep)
    p = tmp_path / "deep.json"
    p.write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    with pytest.raises(ConfigError):
        load_config(str(p))


def test_model_facts_are_checked():
    with pytest.raises(ConfigError) as info:
        load_config({}, model_layers="4", pipeline_stages=0, gradient_checkpointing="yes")
    assert [p for p, _ in info.value.errors] == ["model_layers", "pipeline_stages", "gradient_checkpointing"]


def test_every_problem_in_one_pass():
    cfg = {"zero_optimization": {"stage": "two"}, "zero_optimisation": {},
           "cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2.0,
                                        "cpu_offloading_weights": True},
                              "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.5}}}
    errors, warns = check_config(cfg)
    paths = {p for p, _ in errors}
    assert {"zero_optimization.stage", "cpu_offloading.model.cpu_offloading_num_layers",
            "cpu_offloading.model.cpu_offloading_weights",
            "cpu_offloading.optimizer.optimizer_offload_fraction"} <= paths
    assert "zero_optimisation" in {p for p, _ in warns}
