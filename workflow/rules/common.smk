# Helpers shared by the rules: paths, shard lists, per-stage params and input functions.
from pathlib import Path

OUT = config["out"]
DATASETS = config["datasets"]
SHARDS = list(range(config["shards"]))
TOY_LMM = f"{OUT}/models/toy-llava"
TOY_SAM = f"{OUT}/models/toy-sam.safetensors"
SYNTHETIC = f"{OUT}/synthetic"
SYNTHETIC_SPLIT = config["synthetic"]["split"]
EVALUATED_TASKS = ("instance_seg", "gcg")


wildcard_constraints:
    dataset="|".join(DATASETS) or "^$",
    shard=r"\d+",


def artifact(dataset, kind, shard=None, suffix="parquet"):
    """Path of one artifact of a data set; `kind` is a folder of {out}/{dataset}."""
    name = "manifest" if shard is None else f"shard-{shard}"
    folder = f"{OUT}/{dataset}" if shard is None else f"{OUT}/{dataset}/{kind}"
    return f"{folder}/{name}.{suffix}"


def dataset_config(wildcards):
    """The data set's config section, with its name."""
    return {"name": wildcards.dataset, **DATASETS[wildcards.dataset]}


def dataset_inputs(wildcards):
    """Annotation files and image folder of a data set (built by rule synthetic_data when toy)."""
    ds = DATASETS[wildcards.dataset]
    return {key: ds[key] for key in ("images", "instances", "mask_gt", "caption_gt") if key in ds}


def lmm_inputs(wildcards):
    """The LMM folder when it is local (the toy model is then built by rule toy_lmm)."""
    path = config["lmm"]["path"]
    return [path] if path == TOY_LMM or Path(path).is_dir() else []


def generate_params(wildcards):
    """Everything that decides generate's output: the generate and lmm sections and the question."""
    section = dict(config["generate"])
    question = DATASETS[wildcards.dataset].get("question")
    if question:
        section["question"] = question
    return {"generate": section, "lmm": config["lmm"]}


def instances_input(wildcards):
    ds = DATASETS[wildcards.dataset]
    return [ds["instances"]] if ds["task"] == "instance_seg" else []


def shard_artifacts(kind, suffix="parquet"):
    """Input function: one data set's artifact of `kind` for every shard."""

    def inputs(wildcards):
        return [artifact(wildcards.dataset, kind, shard, suffix) for shard in SHARDS]

    return inputs


def final_targets():
    """Every shard artifact, the metrics of every evaluated data set, and the visualisations.

    Shard artifacts are targets themselves so that a deleted shard file is rebuilt (and what
    gathers it rerun) even when the metrics downstream of it are present."""
    targets = []
    for name, ds in DATASETS.items():
        for shard in SHARDS:
            targets += [artifact(name, kind, shard) for kind in ("generations", "phrases", "masks")]
            targets.append(artifact(name, "attention", shard, "zarr"))
        if ds["task"] in EVALUATED_TASKS:
            targets.append(f"{OUT}/{name}/metrics/{ds['task']}.json")
        targets.append(f"{OUT}/{name}/visualize")
    return targets
