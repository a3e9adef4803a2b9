import json
import re
import warnings
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from ds_offload import ConfigError, check_config, load_config
from ds_offload.config import OffloadConfig, load_schema, read_json

ROOT = Path(__file__).resolve().parents[2]


def block(model=None, optimizer=None, **top):
    cfg = {"train_micro_batch_size_per_gpu": 1, "cpu_offloading": {}}
    if model is not None:
        cfg["cpu_offloading"]["model"] = model
    if optimizer is not None:
        cfg["cpu_offloading"]["optimizer"] = optimizer
    cfg.update(top)
    return cfg


def errors_of(cfg, **facts):
    with pytest.raises(ConfigError) as info:
        load_config(cfg, **facts)
    assert isinstance(info.value, ValueError)
    return info.value.errors


def test_schema_is_valid_draft_2020_12_and_describes_every_key():
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert json.loads((ROOT / "schemas" / "cpu_offloading.schema.json").read_text()) == schema
    for section in ("model", "optimizer"):
        spec = schema["$defs"][section]
        assert spec["additionalProperties"] is False
        for key, prop in spec["properties"].items():
            assert {"type", "default", "description"} <= set(prop), key


def test_defaults_match_megatron_bridge():
    cfg = load_config({"cpu_offloading": {}}).block()
    assert cfg["model"] == {
        "cpu_offloading": False, "cpu_offloading_num_layers": 0, "cpu_offloading_activations": True,
        "cpu_offloading_weights": False, "cpu_offloading_double_buffering": False,
        "cpu_offloading_retain_pinned_cpu_buffers": False, "cpu_offloading_min_offload_bytes": 1 << 20,
        "cpu_offloading_prefetch_depth": 1}
    assert cfg["optimizer"] == {
        "optimizer_cpu_offload": False, "optimizer_offload_fraction": 0.0, "overlap_cpu_optimizer_d2h_h2d": False,
        "use_torch_optimizer_for_cpu_offload": False, "pin_cpu_grads": True, "pin_cpu_params": True}


def test_all_problems_reported_at_once_with_paths_and_did_you_mean():
    cfg = block(model={"cpu_offloading": "yes", "cpu_offloading_num_layer": 2},
                optimizer={"optimizer_offload_fraction": 1.5, "pin_cpu_grads": 1})
    errs = dict(errors_of(cfg))
    assert "expected boolean" in errs["cpu_offloading.model.cpu_offloading"]
    assert "did you mean 'cpu_offloading_num_layers'?" in errs["cpu_offloading.model.cpu_offloading_num_layer"]
    assert "optimizer_offload_fraction must be in [0.0, 1.0]" in errs["cpu_offloading.optimizer.optimizer_offload_fraction"]
    assert "expected boolean" in errs["cpu_offloading.optimizer.pin_cpu_grads"]
    assert all("Fix:" in m for m in errs.values())


@pytest.mark.parametrize("fraction", [-0.1, 1.0001])
def test_fraction_out_of_range(fraction):
    errs = errors_of(block(optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction}))
    assert errs[0][0] == "cpu_offloading.optimizer.optimizer_offload_fraction"
    assert "optimizer_offload_fraction must be in [0.0, 1.0]" in errs[0][1]


def test_unknown_section_key():
    errs = errors_of({"cpu_offloading": {"modle": {}}})
    assert errs[0][0] == "cpu_offloading.modle" and "did you mean 'model'?" in errs[0][1]


def test_malformed_json_reports_file_line_column(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "train_batch_size": 8,\n}\n')
    with pytest.raises(ConfigError) as info:
        read_json(p)
    assert re.search(r"bad\.json:3:1", str(info.value))
    with pytest.raises(ConfigError):
        load_config(str(p))


def test_path_and_dict_give_the_same_config(tmp_path):
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 2})
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    assert load_config(str(p)) == load_config(cfg)


def test_num_layers_must_be_less_than_model_layers():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 4})
    errs = dict(errors_of(cfg, model_layers=4))
    assert "CPU offloading can be done only for layers less than 4" in errs["cpu_offloading.model.cpu_offloading_num_layers"]
    load_config(cfg, model_layers=5)


def test_pipeline_parallelism_refused():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 1})
    msg = errors_of(cfg, pipeline_stages=2)[0][1]
    assert "Currently there is no support for Pipeline parallelism with CPU offloading" in msg
    load_config(cfg, pipeline_stages=1)


@pytest.mark.parametrize("key", ["partition_activations", "cpu_checkpointing", "contiguous_memory_optimization"])
def test_recomputation_refused(key):
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 1}, activation_checkpointing={key: True})
    assert "CPU offloading does not work when activation recomputation is enabled" in errors_of(cfg)[0][1]


def test_model_gradient_checkpointing_refused():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 1})
    assert "activation recomputation is enabled" in errors_of(cfg, gradient_checkpointing=True)[0][1]


def test_cuda_graphs_refused():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 1},
                hybrid_engine={"enable_cuda_graph": True})
    assert "CUDA graphs not supported with CPU offloading." in errors_of(cfg)[0][1]


def test_cuda_graph_rule_reads_only_what_deepspeed_accepts():
    """DeepSpeed 0.19's CompileConfig forbids extra keys and has no torch.compile mode: a rule on
    compile.kwargs could never fire on a config DeepSpeed runs, so there is none."""
    from deepspeed.compile.config import CompileConfig
    from deepspeed.runtime.config import HybridEngineConfig
    assert "kwargs" not in CompileConfig.model_fields and "mode" not in CompileConfig.model_fields
    assert "enable_cuda_graph" in HybridEngineConfig.model_fields
    with pytest.raises(Exception):
        CompileConfig(kwargs={"mode": "reduce-overhead"})


def test_cuda_graphs_allowed_with_optimizer_offload_only():
    cfg = block(optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5},
                hybrid_engine={"enable_cuda_graph": True})
    assert load_config(cfg).optimizer.optimizer_offload_fraction == 0.5


def test_fine_grained_refused():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 1})
    msg = errors_of(cfg, fine_grained=True)[0][1]
    assert "fine_grained_activation_offloading cannot be enabled with cpu_offloading." in msg


def test_nothing_to_offload_names_both_keys():
    cfg = block(model={"cpu_offloading": True, "cpu_offloading_num_layers": 2, "cpu_offloading_activations": False})
    msg = errors_of(cfg)[0][1]
    assert "cpu_offloading_activations" in msg and "cpu_offloading_weights" in msg


def test_zero_layers_warns_not_silent():
    with pytest.warns(UserWarning, match="nothing is offloaded"):
        load_config(block(model={"cpu_offloading": True}))


@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_two_optimizer_offloads_refused(device):
    cfg = block(optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5},
                zero_optimization={"stage": 2, "offload_optimizer": {"device": device}})
    path, msg = errors_of(cfg)[0]
    assert "optimizer_cpu_offload" in msg and "zero_optimization.offload_optimizer.device" in msg


def test_zero3_points_to_deepspeed_ratio():
    cfg = block(optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5},
                zero_optimization={"stage": 3})
    assert "zero_optimization.offload_optimizer.ratio" in errors_of(cfg)[0][1]


def test_non_adam_optimizer_refused():
    cfg = block(optimizer={"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5})
    cfg["optimizer"] = {"type": "Lamb", "params": {"lr": 1e-3}}
    path, msg = errors_of(cfg)[0]
    assert path == "optimizer.type" and "Adam, AdamW" in msg


def test_top_level_typo_warns_with_did_you_mean():
    errors, warns = check_config({"zero_optimisation": {"stage": 2}})
    assert not errors
    assert "Did you mean 'zero_optimization'?" in dict(warns)["zero_optimisation"]


def test_block_off_is_just_defaults():
    assert OffloadConfig().block() == load_config({"cpu_offloading": {}}).block() == load_config({}).block()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_config(str(path), model_layers=16)
    if "cpu_offloading" in cfg:
        assert cfg["$schema"] == "../schemas/cpu_offloading.schema.json"


def test_readme_config_reference_matches_schema():
    readme = (ROOT / "README.md").read_text()
    schema = load_schema()["$defs"]
    for section in ("model", "optimizer"):
        for key, prop in schema[section]["properties"].items():
            row = next((line for line in readme.splitlines() if line.startswith(f"| `{section}.{key}`")), None)
            assert row is not None, f"README lacks a reference row for {section}.{key}"
            assert f"`{json.dumps(prop['default'])}`" in row, f"README default of {section}.{key} is stale"


def test_optimizer_keys_without_the_switch_warn():
    _, warns = check_config({"cpu_offloading": {"optimizer": {"optimizer_offload_fraction": 0.5,
                                                              "overlap_cpu_optimizer_d2h_h2d": True}}})
    paths = dict(warns)
    assert "optimizer_cpu_offload is false" in paths["cpu_offloading.optimizer.optimizer_offload_fraction"]
    assert "no CPU step to overlap" in paths["cpu_offloading.optimizer.overlap_cpu_optimizer_d2h_h2d"]
    assert check_config({"cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True,
                                                          "optimizer_offload_fraction": 0.5}}})[1] == []
