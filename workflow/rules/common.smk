# Helpers shared by the rules: runs, paths, shard lists, per-stage params and input functions.
#
# A "run" is the main configuration ("main") or one of config["variants"] (controls), which override
# whole keys of the stage sections; every run processes every data set under {out}/{run}/{dataset}.
import copy
from pathlib import Path

import jsonschema
import yaml

OUT = config["out"]
DATASETS = config["datasets"]
SHARDS = list(range(config["shards"]))
TOY_LMM = f"{OUT}/models/toy-llava"
TOY_SAM = f"{OUT}/models/toy-sam.safetensors"
SYNTHETIC = f"{OUT}/synthetic"
SYNTHETIC_SPLIT = config["synthetic"]["split"]
EVALUATED_TASKS = ("instance_seg", "gcg")
RUN_SECTIONS = ("lmm", "generate", "phrases", "sam", "segment")
MAIN_RUN = "main"


def _merged(base, override):
    """`base` with `override`'s keys replaced (nested mappings merged key by key)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _runs():
    """Run name -> its stage sections, each variant's overrides validated against the schema."""
    if MAIN_RUN in config["variants"]:
        raise ValueError(f"variants: the name {MAIN_RUN!r} is the main run's; choose another")
    schema = yaml.safe_load(Path(workflow.basedir, "schemas", "config.schema.yaml").read_text())
    runs = {MAIN_RUN: {name: config[name] for name in RUN_SECTIONS}}
    for variant, overrides in config["variants"].items():
        sections = {name: _merged(config[name], overrides.get(name, {})) for name in RUN_SECTIONS}
        for name, section in sections.items():
            try:
                jsonschema.Draft202012Validator(schema["properties"][name]).validate(section)
            except jsonschema.ValidationError as error:
                path = ".".join(map(str, error.absolute_path))
                raise ValueError(f"variants.{variant}.{name}{'.' + path if path else ''}: {error.message}") from None
        runs[variant] = sections
    return runs


RUNS = _runs()


wildcard_constraints:
    run="|".join(RUNS),
    dataset="|".join(DATASETS) or "^$",
    shard=r"\d+",


def _world():
    """The toy world the models are trained on: the synthetic section's seed and image sizes."""
    return {"world_seed": config["synthetic"]["seed"], "image_size": config["synthetic"]["image_size"]}


def train_lmm_params(wildcards):
    """The LMM training section, the world, and every question the pipeline asks."""
    questions = [config["generate"]["question"]]
    questions += [ds["question"] for ds in DATASETS.values() if ds.get("question")]
    return {**config["train"]["lmm"], **_world(), "questions": list(dict.fromkeys(questions))}


def train_sam_params(wildcards):
    """The SAM training section and the world."""
    return {**config["train"]["sam"], **_world()}


def manifest_path(dataset):
    """The manifest of a data set (shared by every run)."""
    return f"{OUT}/manifests/{dataset}.parquet"


def artifact(run, dataset, kind, shard, suffix="parquet"):
    """Path of one shard's artifact of `kind` (generations, attention, phrases, masks)."""
    return f"{OUT}/{run}/{dataset}/{kind}/shard-{shard}.{suffix}"


def section(wildcards, name):
    """The run's config section `name`."""
    return RUNS[wildcards.run][name]


def section_params(*names):
    """Params function: the run's sections `names` (what decides the stage's output)."""

    def params(wildcards):
        return {name: section(wildcards, name) for name in names}

    return params


def dataset_config(wildcards):
    """The data set's config section, with its name."""
    return {"name": wildcards.dataset, **DATASETS[wildcards.dataset]}


def dataset_inputs(wildcards):
    """Annotation files and image folder of a data set (built by rule synthetic_data when toy)."""
    ds = DATASETS[wildcards.dataset]
    return {key: ds[key] for key in ("images", "instances", "mask_gt", "caption_gt") if key in ds}


def lmm_inputs(wildcards):
    """The run's LMM folder when it is local (toy models are then built by their rules)."""
    path = section(wildcards, "lmm")["path"]
    return [path] if path.startswith(f"{OUT}/models/") or Path(path).is_dir() else []


def sam_inputs(wildcards):
    """The run's SAM checkpoint, except in attention-only runs, which use no SAM."""
    if section(wildcards, "segment")["prompt"] == "attention":
        return []
    return [section(wildcards, "sam")["checkpoint"]]


def generate_params(wildcards):
    """Everything that decides generate's output: the run's generate and lmm sections and the question
    (lmm.gpus, which decides only where the model runs, is left out: changing it reruns nothing)."""
    generate = dict(section(wildcards, "generate"))
    question = DATASETS[wildcards.dataset].get("question")
    if question:
        generate["question"] = question
    lmm = {key: value for key, value in section(wildcards, "lmm").items() if key != "gpus"}
    return {"generate": generate, "lmm": lmm}


def generate_gpus(wildcards):
    """GPUs one generate job of the run requests (resources gpu=N): its lmm.gpus."""
    return section(wildcards, "lmm")["gpus"]


def instances_input(wildcards):
    ds = DATASETS[wildcards.dataset]
    return [ds["instances"]] if ds["task"] == "instance_seg" else []


def shard_artifacts(kind, suffix="parquet"):
    """Input function: one run's and data set's artifact of `kind` for every shard."""

    def inputs(wildcards):
        return [artifact(wildcards.run, wildcards.dataset, kind, shard, suffix) for shard in SHARDS]

    return inputs


def metrics_path(run, dataset):
    return f"{OUT}/{run}/{dataset}/metrics/{DATASETS[dataset]['task']}.json"


def all_metrics():
    """Metrics of every run on every evaluated data set."""
    return [metrics_path(run, name) for run in RUNS for name, ds in DATASETS.items()
            if ds["task"] in EVALUATED_TASKS]


def final_targets():
    """Every shard artifact of every run, the metrics, their summary and the visualisations.

    Shard artifacts are targets themselves so that a deleted shard file is rebuilt (and what
    gathers it rerun) even when the metrics downstream of it are present."""
    targets = []
    for run in RUNS:
        for name in DATASETS:
            for shard in SHARDS:
                targets += [artifact(run, name, kind, shard) for kind in ("generations", "phrases", "masks")]
                targets.append(artifact(run, name, "attention", shard, "zarr"))
            targets.append(f"{OUT}/{run}/{name}/visualize")
    if all_metrics():
        targets.append(f"{OUT}/summary.md")
    return targets
