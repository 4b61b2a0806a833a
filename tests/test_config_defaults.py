"""One source of defaults: the config schema. Every stage dataclass, every stage CLI and the workflow
take a key's default from schemas/config.schema.yaml; these tests fail when any two disagree."""

from __future__ import annotations

import dataclasses

import pytest

from stages import evaluate_gcg, generate, phrases, segment, visualize
from stages.config import DATASET_SECTIONS, config_schema, schema_default, schema_node
from stages.datasets import DatasetConfig
from stages.evaluate_gcg import GcgEvalConfig
from stages.generate import GenerateConfig, LMMConfig
from stages.phrases import PhrasesConfig, TextEncoderConfig
from stages.segment import SamConfig, SegmentConfig
from stages.toy import train_lmm, train_sam
from stages.toy.difflmm import ToySdConfig
from stages.toy.train_lmm import TrainLmmConfig
from stages.toy.train_sam import TrainSamConfig
from stages.toy.world import SyntheticConfig
from stages.training.recipe import Recipe, Stage1Config, Stage2Config
from stages.visualize import VisualizeConfig

# Config section (schema path; "*" = each entry of a named mapping) -> the dataclass it builds.
SECTION_CLASSES = {
    ("synthetic",): SyntheticConfig,
    ("train", "lmm"): TrainLmmConfig,
    ("train", "sam"): TrainSamConfig,
    ("train", "sd"): ToySdConfig,
    ("datasets", "*"): DatasetConfig,
    ("lmm",): LMMConfig,
    ("generate",): GenerateConfig,
    ("phrases",): PhrasesConfig,
    ("phrases", "text_encoder"): TextEncoderConfig,
    ("sam",): SamConfig,
    ("segment",): SegmentConfig,
    ("evaluate", "gcg"): GcgEvalConfig,
    ("visualize",): VisualizeConfig,
    ("training", "*"): Recipe,
    ("training", "*", "stage1"): Stage1Config,
    ("training", "*", "stage2"): Stage2Config,
}
# The whole config, sections that only group others, and a variant's entry (overrides of other sections,
# whose defaults are those sections').
CONTAINERS = {(), ("train",), ("evaluate",), ("variants", "*")}
# Sections the workflow alone reads (common.smk), no stage: where a Slurm run sends its jobs.
WORKFLOW_ONLY = {("cluster",)}
# Dataclass fields that are not config keys: the data set's name is its key in `datasets`; the toy
# trainers' model sizes and optimiser details are fixed by the code, their world follows `synthetic`.
NOT_CONFIG_KEYS = {
    DatasetConfig: {"name"},
    TrainLmmConfig: {"warmup_steps", "weight_decay", "grad_clip", "world_seed", "image_size",
                     "model_image_size", "patch_size", "vision_hidden_size", "vision_layers",
                     "text_hidden_size", "text_layers", "num_attention_heads", "initializer_range",
                     "questions"},
    TrainSamConfig: {"points_per_mask", "weight_decay", "warmup_steps", "final_lr_fraction", "grad_clip",
                     "focal_weight", "focal_alpha", "iou_weight", "last_mask_weight", "world_seed", "image_size",
                     "num_threads"},
    ToySdConfig: {"world_seed", "image_size", "kl_weight", "warmup_steps"},
}


def sections_with_keys(node, path=()):
    """Every schema path whose node declares keys (``properties``), walking named mappings too."""
    if node.get("properties"):
        yield path
        for key, sub in node["properties"].items():
            yield from sections_with_keys(sub, (*path, key))
    if isinstance(node.get("additionalProperties"), dict):
        yield from sections_with_keys(node["additionalProperties"], (*path, "*"))


def field_default(field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def as_config_value(value):
    """A dataclass default as the YAML config writes it (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value


def test_every_schema_section_with_keys_has_its_dataclass():
    found = set(sections_with_keys(config_schema()))
    found -= CONTAINERS | WORKFLOW_ONLY
    assert found == set(SECTION_CLASSES), found ^ set(SECTION_CLASSES)


@pytest.mark.parametrize("path", list(SECTION_CLASSES), ids=".".join)
def test_dataclass_defaults_are_the_schemas(path):
    cls = SECTION_CLASSES[path]
    node = schema_node(*path)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    keys = set(node["properties"]) - (set(DATASET_SECTIONS) if cls is DatasetConfig else set())
    assert keys <= set(fields), f"{'.'.join(path)}: keys without a field: {keys - set(fields)}"
    assert set(fields) - keys == NOT_CONFIG_KEYS.get(cls, set()), f"{cls.__name__}: fields that are no key"
    for key in keys:
        default = field_default(fields[key])
        if key in node.get("required", []):
            assert default is dataclasses.MISSING, f"{'.'.join(path)}.{key} is required but has a default"
        elif dataclasses.is_dataclass(default):
            assert type(default) is SECTION_CLASSES[(*path, key)], f"{'.'.join(path)}.{key}"
        elif "default" not in node["properties"][key]:      # required by some tasks only: absent is None
            assert default is None, f"{'.'.join(path)}.{key}"
        else:
            assert as_config_value(default) == node["properties"][key]["default"], f"{'.'.join(path)}.{key}"


def test_toy_trainers_draw_the_synthetic_sections_world():
    for cls in (TrainLmmConfig, TrainSamConfig):
        assert cls().world_seed == schema_default("synthetic", "seed")
        assert cls().image_size == schema_default("synthetic", "image_size")


def test_generate_decodes_the_schemas_number_of_tokens():
    """The disagreement that started this: GenerateConfig decoded 24 tokens, the schema said 48."""
    assert GenerateConfig().max_new_tokens == schema_node("generate", "max_new_tokens")["default"] == 48


# ------------------------------------------------------------------------------------------------
# The stage CLIs: run each with only its required arguments and catch the config it builds.


def caught(monkeypatch, module, name):
    """Replace ``module.name`` by a recorder; returns the list of its calls' positional arguments."""
    calls = []
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args))
    return calls


def empty_config(tmp_path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text("{}\n")
    return str(path)


def test_generate_cli_defaults(tmp_path, monkeypatch):
    calls = caught(monkeypatch, generate, "run")
    generate.main(["--config", empty_config(tmp_path), "--manifest", "m", "--shard", "0",
                   "--generations", "g", "--attention", "a"])
    generate_cfg, lmm_cfg = calls[0][:2]
    assert generate_cfg == GenerateConfig() and lmm_cfg == LMMConfig()


def test_phrases_and_segment_cli_defaults(tmp_path, monkeypatch):
    phrases_calls = caught(monkeypatch, phrases, "run")
    phrases.main(["--config", empty_config(tmp_path), "--generations", "g", "--out", "o"])
    assert phrases_calls[0][0] == PhrasesConfig()
    segment_calls = caught(monkeypatch, segment, "run")
    segment.main(["--config", empty_config(tmp_path), "--manifest", "m", "--generations", "g",
                  "--attention", "a", "--phrases", "p", "--out", "o"])
    assert segment_calls[0][:2] == (SegmentConfig(), SamConfig())


def test_evaluate_gcg_cli_defaults(monkeypatch):
    calls = caught(monkeypatch, evaluate_gcg, "run")
    monkeypatch.setattr(evaluate_gcg.json, "dumps", lambda *args, **kwargs: "")
    evaluate_gcg.main(["--mask-gt", "m", "--caption-gt", "c", "--manifest", "x", "--generations", "g",
                       "--masks", "k", "--mask-predictions", "p", "--caption-predictions", "q",
                       "--metrics", "r"])
    assert calls[0][0] == GcgEvalConfig()


def test_visualize_cli_defaults(monkeypatch):
    calls = caught(monkeypatch, visualize, "run")
    visualize.main(["--manifest", "m", "--generations", "g", "--attention", "a", "--phrases", "p",
                    "--masks", "k", "--out", "o"])
    cfg, *_, upsample = calls[0]
    assert cfg == VisualizeConfig()
    assert upsample == SegmentConfig().upsample


@pytest.mark.parametrize(("module", "function", "cls"), [
    (train_lmm, "train_toy_llava", TrainLmmConfig), (train_sam, "train_toy_sam", TrainSamConfig)])
def test_toy_trainer_cli_defaults(monkeypatch, module, function, cls):
    seen = []
    monkeypatch.setattr(module, function, lambda out, cfg, *args, **kwargs: seen.append(cfg))
    module.main(["--out", "o"])
    defaults = cls()
    for key in schema_node("train", "lmm" if cls is TrainLmmConfig else "sam")["properties"]:
        assert getattr(seen[0], key) == getattr(defaults, key), key



def test_stage_clis_take_a_data_sets_sections(tmp_path, monkeypatch):
    """--dataset NAME: the generate, phrases and segment CLIs use the sections that data set's jobs get."""
    config = tmp_path / "config.yaml"
    config.write_text("generate: {max_new_tokens: 7}\nsegment: {pool: mean}\nphrases: {category_thresh: 0.2}\n"
                      "datasets:\n  d: {task: images, images: x, generate: {max_new_tokens: 9},\n"
                      "      segment: {pool: max}, phrases: {category_thresh: 0.8}}\n")
    generate_calls, phrases_calls, segment_calls = (caught(monkeypatch, module, "run")
                                                    for module in (generate, phrases, segment))
    for dataset in ([], ["--dataset", "d"]):
        generate.main(["--config", str(config), "--manifest", "m", "--shard", "0", "--generations", "g",
                       "--attention", "a", *dataset])
        phrases.main(["--config", str(config), "--generations", "g", "--out", "o", *dataset])
        segment.main(["--config", str(config), "--manifest", "m", "--generations", "g", "--attention", "a",
                      "--phrases", "p", "--out", "o", *dataset])
    assert [call[0].max_new_tokens for call in generate_calls] == [7, 9]
    assert [call[0].category_thresh for call in phrases_calls] == [0.2, 0.8]
    assert [call[0].pool for call in segment_calls] == ["mean", "max"]
