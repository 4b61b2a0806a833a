"""The config's one source of defaults, its per-data-set and per-variant stage sections, and building
the stages' frozen config dataclasses from plain mappings (the YAML config's sections).

Every default lives once, in the packaged schema ``schemas/config.schema.yaml``: the dataclasses take
theirs with :func:`schema_default`, and the stage CLIs take theirs from the dataclasses.

The stage sections a job of run R on data set D uses (:func:`stage_sections`) are, from weakest to
strongest: the schema's defaults < the config's top-level sections < the data set's own overrides
(``datasets.D.<section>``, and ``datasets.D.question``, short for ``generate.question``) < the
variant's overrides (``variants.R.<section>``). Variants are controls: what a variant changes it
changes on every data set.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import importlib.resources
import types
import typing
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import jsonschema
import yaml

T = TypeVar("T")

# The sections a job's settings come from (stage_sections), and those a data set may override
# (datasets.<name>.<section>): the model sections lmm and sam belong to the run (a variant may override
# them, as generate, phrases and segment; the schema says which), evaluate to the data set.
STAGE_SECTIONS = ("lmm", "generate", "phrases", "sam", "segment", "evaluate")
DATASET_SECTIONS = ("generate", "phrases", "segment", "evaluate")
MAIN_RUN = "main"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


@functools.cache
def config_schema() -> dict[str, Any]:
    """The workflow config's JSON schema (``schemas/config.schema.yaml``, shipped in the package)."""
    return yaml.safe_load(importlib.resources.files("schemas").joinpath("config.schema.yaml").read_text())


def schema_node(*path: str) -> dict[str, Any]:
    """The schema of the config key ``path`` (e.g. ``("generate", "max_new_tokens")``; ``"*"`` steps into
    a mapping of named entries such as ``datasets``)."""
    node = config_schema()
    for key in path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    return node


def schema_default(*path: str) -> Any:
    """The schema's default of the config key ``path``; lists come back as tuples (the dataclasses are
    frozen and hashable)."""
    default = schema_node(*path)["default"]
    return tuple(default) if isinstance(default, list) else default


def read_sections(config_path: str | Path, dataset: str | None = None) -> dict[str, Any]:
    """The stage sections a stage's command line uses, from the YAML config at ``config_path``: its
    top-level sections, or with ``dataset`` those the workflow gives that data set's jobs of the main
    run (:func:`stage_sections`)."""
    config = yaml.safe_load(Path(config_path).read_text()) or {}
    return stage_sections(config, MAIN_RUN, dataset) if dataset else config


DATASET_HELP = ("take the stage sections as this data set of the config gets them (its own overrides "
                "over the top-level sections)")


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s keys replaced (nested mappings merged key by key)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_section(name: str, section: Mapping[str, Any], where: str) -> None:
    """ConfigError naming ``where.<key>`` when ``section`` breaks the schema of config section ``name``."""
    try:
        jsonschema.Draft202012Validator(schema_node(name)).validate(section)
    except jsonschema.ValidationError as error:
        path = ".".join(map(str, error.absolute_path))
        raise ConfigError(f"{where}{'.' + path if path else ''}: {error.message}") from None


def run_folder(config: Mapping[str, Any]) -> str:
    """The run's folder ``config["out"]``, normalised (``results/`` -> ``results``), once it is known to
    keep every output inside the working directory: every output path is this folder joined with fixed
    names and the run, data set and shard wildcards, which the schema restricts to plain names.

    ConfigError naming ``out`` when it is empty or absolute (the outputs would land outside the working
    directory: choose that with ``snakemake --directory`` instead), climbs out with a ``..`` step, or holds
    ``{`` or ``}`` (Snakemake would read a wildcard into every output path).
    """
    out = config["out"]
    problem = ("is empty" if not out.strip() else
               "is an absolute path" if PurePosixPath(out).is_absolute() else
               "climbs out of the working directory with '..'" if ".." in PurePosixPath(out).parts else
               "holds '{' or '}', which Snakemake reads as wildcards" if "{" in out or "}" in out else None)
    if problem:
        raise ConfigError(f"out ({out!r}) {problem}; it must be a folder inside the working directory "
                          "(snakemake --directory chooses that one)")
    return str(PurePosixPath(out))


def dataset_overrides(name: str, entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The stage-section overrides of data set ``name``'s config entry: its sections in
    :data:`DATASET_SECTIONS`, with its ``question`` as ``generate.question`` (giving both is an error)."""
    overrides = {section: dict(entry.get(section) or {}) for section in DATASET_SECTIONS}
    question = entry.get("question")
    if question:
        if "question" in overrides["generate"]:
            raise ConfigError(f"datasets.{name}: give the question once, as question or as generate.question")
        overrides["generate"]["question"] = question
    return overrides


def stage_sections(config: Mapping[str, Any], run: str, dataset: str) -> dict[str, dict[str, Any]]:
    """The stage sections (:data:`STAGE_SECTIONS`) a job of ``run`` (``"main"`` or a variant's name) on
    ``dataset`` uses: top-level sections < data set overrides < variant overrides (module docstring).

    ``config`` is a workflow config; keys it leaves out are left out of the sections too (the stage
    dataclasses then take the schema's defaults; Snakemake's ``validate`` has filled them in already).
    Each merged section is validated against the schema; a ConfigError names the key as
    ``datasets.<dataset>.<section>.<key>`` or ``variants.<run>.<section>.<key>``.
    """
    variants, datasets = config.get("variants") or {}, config.get("datasets") or {}
    if run != MAIN_RUN and run not in variants:
        raise ConfigError(f"unknown run {run!r}; known: {[MAIN_RUN, *variants]}")
    if dataset not in datasets:
        raise ConfigError(f"unknown data set {dataset!r}; known: {list(datasets)}")
    of_dataset = dataset_overrides(dataset, datasets[dataset])
    of_variant = variants.get(run, {}) if run != MAIN_RUN else {}
    sections = {}
    for name in STAGE_SECTIONS:
        top = config.get(name) or {}
        section = _merged(top, of_dataset.get(name, {}))
        _check_section(name, section, f"datasets.{dataset}.{name}")
        if of_variant.get(name):
            _check_section(name, _merged(top, of_variant[name]), f"variants.{run}.{name}")
            section = _merged(section, of_variant[name])
            _check_section(name, section, f"variants.{run}.{name} (on data set {dataset})")
        sections[name] = section
    return sections


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``mapping``: unknown keys are an error naming the key;
    missing keys take the dataclass default; nested dataclass fields are built recursively;
    lists become tuples so that the result is hashable and frozen."""
    mapping = dict(mapping or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _convert(hints[name], value, f"{where or cls.__name__}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_mapping(hint, value, where=where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                return from_mapping(arg, value, where=where)
    if isinstance(value, list):
        return tuple(_convert(Any, v, where) for v in value)
    return value


def resolve_model_path(spec: str) -> str:
    """Resolve a model reference to what ``from_pretrained`` takes.

    ``python:<module>`` names a model shipped inside an installed Python package (the module's
    ``MODEL_DIR``); anything else (hub id or folder) is returned unchanged.
    """
    if spec.startswith("python:"):
        module_name = spec.removeprefix("python:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({exc})") from None
        model_dir = getattr(module, "MODEL_DIR", None)
        if model_dir is None or not Path(model_dir).is_dir():
            raise ConfigError(f"model {spec!r}: module {module_name!r} ships no MODEL_DIR folder")
        return str(model_dir)
    return spec
