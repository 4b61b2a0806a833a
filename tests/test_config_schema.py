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
