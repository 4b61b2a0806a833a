"""The config schema: documented defaults, and errors that name the bad key or value."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def validate(config):
    jsonschema.Draft202012Validator(SCHEMA).validate(config)


def test_schema_is_valid_2020_12_and_documents_every_key():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"].endswith("2020-12/schema")

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}.{key} has no description"
            conditionally_required = {k for rule in node.get("allOf", []) for k in rule["then"]["required"]}
            assert "default" in sub or key in set(node.get("required", [])) | conditionally_required, \
                f"{path}.{key} has no default"
            walk(sub, f"{path}.{key}")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*")

    walk(SCHEMA, "config")


def test_shipped_config_is_valid():
    validate(DEFAULT)


@pytest.mark.parametrize("mutate, named", [
    (lambda c: c["generate"].update(batch_sz=3), "batch_sz"),
    (lambda c: c.update(shard=3), "shard"),
    (lambda c: c["generate"].update(batch_size=0), "batch_size"),
    (lambda c: c["segment"].update(pool="median"), "median"),
    (lambda c: c["generate"].update(layers="first"), "layers"),
    (lambda c: c["datasets"]["toy_gcg"].pop("caption_gt"), "caption_gt"),
    (lambda c: c["datasets"]["toy_instances"].update(task="detection"), "detection"),
    (lambda c: c["lmm"].update(dtype="int4"), "int4"),
    (lambda c: c["lmm"].update(gpus=0), "gpus"),
    (lambda c: c["lmm"].update(gpus=1.5), "gpus"),
    (lambda c: c["cluster"].update(request_gpus="no"), "request_gpus"),
    (lambda c: c["cluster"].update(gpu_partition=""), "gpu_partition"),
    (lambda c: c["datasets"].update({"bad name": {"task": "images", "images": "x"}}), "bad name"),
])
def test_bad_key_or_value_is_named(mutate, named):
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(jsonschema.ValidationError) as info:
        validate(config)
    error = info.value
    text = str(error) + " ".join(map(str, error.absolute_path))
    assert named in text


# ------------------------------------------------------------------------------------------------
# Per-data-set and per-variant stage sections (stages.config.stage_sections).


def with_defaults(config):
    """``config`` with the schema's defaults filled in, as Snakemake's validate leaves it."""
    from snakemake.utils import validate as snakemake_validate

    config = copy.deepcopy(config)
    snakemake_validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


def two_task_config(**variants):
    config = copy.deepcopy(DEFAULT)
    config["segment"].update(pool="mean", more_masks=False, remove_corner=True)
    config["datasets"]["toy_instances"]["segment"] = {"more_masks": True}
    config["datasets"]["toy_gcg"]["segment"] = {"pool": "max"}
    config["datasets"]["toy_gcg"]["evaluate"] = {"gcg": {"iou_thresh": 0.75}}
    config["variants"] = variants
    return with_defaults(config)


def test_precedence_is_defaults_then_top_level_then_data_set_then_variant():
    from stages.config import stage_sections

    config = two_task_config(one_head={"generate": {"heads": [-2]}, "segment": {"pool": "mean"}})
    instances = stage_sections(config, "main", "toy_instances")
    gcg = stage_sections(config, "main", "toy_gcg")
    assert (instances["segment"]["pool"], instances["segment"]["more_masks"]) == ("mean", True)
    assert (gcg["segment"]["pool"], gcg["segment"]["more_masks"]) == ("max", False)
    assert instances["segment"]["remove_corner"] and gcg["segment"]["remove_corner"]     # top level
    assert instances["segment"]["box_thresh"] == 0.75                                   # schema default
    assert gcg["evaluate"]["gcg"] == {**config["evaluate"]["gcg"], "iou_thresh": 0.75}
    assert instances["evaluate"] == config["evaluate"]
    assert gcg["generate"]["question"] == config["datasets"]["toy_gcg"]["question"]
    assert instances["generate"]["question"] == config["generate"]["question"]
    variant_gcg = stage_sections(config, "one_head", "toy_gcg")
    assert variant_gcg["segment"]["pool"] == "mean" and variant_gcg["generate"]["heads"] == [-2]
    assert variant_gcg["generate"]["question"] == gcg["generate"]["question"]
    assert stage_sections(config, "one_head", "toy_instances")["segment"]["more_masks"] is True


@pytest.mark.parametrize(("dataset_entry", "named"), [
    ({"segment": {"pool": "median"}}, "datasets.toy_gcg.segment.pool"),
    ({"segment": {"pooling": "max"}}, "datasets.toy_gcg.segment"),
    ({"generate": {"max_new_tokens": 0}}, "datasets.toy_gcg.generate.max_new_tokens"),
    ({"evaluate": {"gcg": {"iou_thresh": "high"}}}, "datasets.toy_gcg.evaluate.gcg.iou_thresh"),
    ({"generate": {"question": "Another?"}}, "give the question once"),
])
def test_bad_data_set_override_is_named(dataset_entry, named):
    from stages.config import ConfigError, stage_sections

    config = copy.deepcopy(DEFAULT)
    config["datasets"]["toy_gcg"].update(dataset_entry)
    config = with_defaults(config)
    with pytest.raises(ConfigError) as info:
        stage_sections(config, "main", "toy_gcg")
    assert named in str(info.value)


def test_data_set_may_not_override_the_model_sections():
    config = copy.deepcopy(DEFAULT)
    config["datasets"]["toy_gcg"]["lmm"] = {"path": "elsewhere"}
    with pytest.raises(jsonschema.ValidationError, match="lmm"):
        validate(config)


def test_data_set_config_leaves_the_stage_overrides_to_the_stages():
    from stages.datasets import dataset_config

    entry = {"task": "images", "images": "x", "segment": {"pool": "max"}, "generate": {"max_new_tokens": 3}}
    cfg = dataset_config("d", entry)
    assert (cfg.name, cfg.task, cfg.images) == ("d", "images", "x")
