# Helpers shared by the rules: runs, paths, shard lists, per-stage params and input functions.
#
# A "run" is the main configuration ("main") or one of config["variants"] (controls); every run
# processes every data set under {out}/{run}/{dataset}, except that a run reads the answers, attention
# and phrases of an earlier run whose settings of those stages are the same (producing_run) instead of
# computing them again. The stage sections of one run on one data set
# come from stages.config.stage_sections: top-level sections < the data set's overrides < the variant's.
# Each rule's params hold only its own run's and data set's sections, so changing one data set's
# settings reruns that data set's jobs only; they also hold the version of the code the rule runs
# (code_version), so changing that code reruns the rule and what follows.
import re
from pathlib import Path

from stages.code_version import code_version as script_code_version
from stages.config import DATASET_SECTIONS, MAIN_RUN, run_folder, stage_sections

# Every output is OUT joined with fixed names and the run, data set and shard wildcards (plain names).
OUT = run_folder(config)
DATASETS = config["datasets"]
SHARDS = list(range(config["shards"]))
TOY_LMM = f"{OUT}/models/toy-llava"
TOY_SAM = f"{OUT}/models/toy-sam.safetensors"
SYNTHETIC = f"{OUT}/synthetic"
SYNTHETIC_SPLIT = config["synthetic"]["split"]
EVALUATED_TASKS = ("instance_seg", "gcg", "res", "png")
# A data set's files (config keys) that the manifest and the evaluators read; the proposals a segment job
# reads with segment.mask_source proposals are separate (changing them reruns segment, not the manifest).
DATA_FILE_KEYS = ("images", "instances", "mask_gt", "caption_gt", "refs", "narratives", "panoptic",
                  "panoptic_masks")
PROPOSAL_KEYS = ("proposals", "proposals_folder")
SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
RUNS = [MAIN_RUN, *config["variants"]]
# Slurm partitions (config `cluster`): each rule names its own in its resources (slurm_partition), so a
# Slurm run (workflow/profiles/slurm, which names none) sends GPU rules to one and the rest to the other.
CPU_PARTITION = config["cluster"]["cpu_partition"]
GPU_PARTITION = config["cluster"]["gpu_partition"]
# (run, data set) -> the stage sections its jobs use, every one validated against the schema.
SECTIONS = {(run, name): stage_sections(config, run, name) for run in RUNS for name in DATASETS}


wildcard_constraints:
    run="|".join(RUNS),
    dataset="|".join(DATASETS) or "^$",
    shard=r"\d+",


def code_version(script):
    """Params value naming the version of workflow/scripts/<script> and of every module of stages/ and
    schemas/ that script imports, transitively (stages.code_version). Any change to that code, except
    to comments, formatting and docstrings, reruns the jobs that run it and what follows."""
    return f"{script} {script_code_version(SCRIPTS / script)}"


def _world():
    """The toy world the models are trained on: the synthetic section's seed and image sizes."""
    return {"world_seed": config["synthetic"]["seed"], "image_size": config["synthetic"]["image_size"]}


def train_lmm_params(wildcards):
    """The LMM training section, the world, and every question the pipeline asks (a referring-expression
    template, 'Describe the "{expression}".', is no question: the toy LMM is trained on captions only)."""
    questions = [config["generate"]["question"]]
    questions += [sections["generate"]["question"] for sections in SECTIONS.values()
                  if "{expression}" not in sections["generate"]["question"]]
    return {**config["train"]["lmm"], **_world(), "questions": list(dict.fromkeys(questions))}


def train_sd_params(wildcards):
    """The toy SD's pretraining section and the world."""
    return {**config["train"]["sd"], **_world()}


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
    """The config section `name` of the job's run and data set."""
    return SECTIONS[wildcards.run, wildcards.dataset][name]


def section_params(*names):
    """Params function: the sections `names` of the job's run and data set (what decides the output)."""

    def params(wildcards):
        return {name: section(wildcards, name) for name in names}

    return params


def dataset_config(wildcards):
    """What describes the data set itself (task, files, split, max_pixels), with its name: not its question,
    its proposals nor its stage-section overrides, which decide later stages only."""
    entry = DATASETS[wildcards.dataset]
    data = {key: value for key, value in entry.items() if key not in (*DATASET_SECTIONS, "question", *PROPOSAL_KEYS)}
    return {"name": wildcards.dataset, **data}


def dataset_inputs(wildcards):
    """Annotation files and image folder of a data set (built by rule synthetic_data when toy)."""
    ds = DATASETS[wildcards.dataset]
    return {key: ds[key] for key in DATA_FILE_KEYS if ds.get(key) is not None}


def proposals_inputs(wildcards):
    """The data set's precomputed masks when the job's points pick proposals (segment.mask_source proposals
    with prompt point; prompt attention makes its own masks)."""
    segment = section(wildcards, "segment")
    if segment["mask_source"] != "proposals" or segment["prompt"] != "point":
        return {}
    ds = DATASETS[wildcards.dataset]
    return {key: ds[key] for key in PROPOSAL_KEYS if ds.get(key) is not None}


def lmm_inputs(wildcards):
    """The run's LMM folder when it is local (toy models are then built by their rules)."""
    path = section(wildcards, "lmm")["path"]
    return [path] if path.startswith(f"{OUT}/models/") or Path(path).is_dir() else []


def sam_inputs(wildcards):
    """The run's SAM checkpoint, except in jobs that use no SAM (prompt attention, mask_source proposals)."""
    segment = section(wildcards, "segment")
    if segment["prompt"] == "attention" or segment["mask_source"] == "proposals":
        return []
    return [section(wildcards, "sam")["checkpoint"]]


def _generate_settings(run, dataset):
    """Everything that decides generate's output: the generate section (with the data set's question)
    and the lmm section (lmm.gpus, which decides only where the model runs, is left out: changing it
    reruns nothing)."""
    sections = SECTIONS[run, dataset]
    lmm = {key: value for key, value in sections["lmm"].items() if key != "gpus"}
    return {"generate": sections["generate"], "lmm": lmm}


def generate_params(wildcards):
    """generate's params: what decides its output (_generate_settings)."""
    return _generate_settings(wildcards.run, wildcards.dataset)


def _upstream_settings(run, dataset, kind):
    """What decides a run's artifacts of `kind` on a data set: generate's settings for generations and
    attention, those and the phrases section for phrases."""
    settings = _generate_settings(run, dataset)
    if kind == "phrases":
        settings["phrases"] = SECTIONS[run, dataset]["phrases"]
    return settings


def _first_run_with_same_settings(run, dataset, kind):
    wanted = _upstream_settings(run, dataset, kind)
    return next(other for other in RUNS if _upstream_settings(other, dataset, kind) == wanted)


# (run, data set, kind) -> the run that makes the artifacts of that kind the run reads (producing_run).
PRODUCING_RUNS = {(run, name, kind): _first_run_with_same_settings(run, name, kind)
                  for run in RUNS for name in DATASETS for kind in ("generations", "attention", "phrases")}


def producing_run(run, dataset, kind):
    """The run whose artifacts of `kind` `run` reads on `dataset`: for generations, attention and phrases
    the first run of RUNS (main first) whose settings of the stages that make them are the same, for masks
    the run itself. A variant that changes only later stages (segment, sam) reuses main's answers, attention
    and phrases instead of computing them again; its folder holds only what it computes itself."""
    return run if kind == "masks" else PRODUCING_RUNS[run, dataset, kind]


def upstream_artifact(kind, suffix="parquet"):
    """Input function: the job's shard of `kind`, made by the run it is read from (producing_run)."""

    def inputs(wildcards):
        run = producing_run(wildcards.run, wildcards.dataset, kind)
        return artifact(run, wildcards.dataset, kind, wildcards.shard, suffix)

    return inputs


def gpus(count):
    """resources gpu= of a GPU rule: `count` GPUs, or none (0: the job computes on the CPU) when
    cluster.request_gpus is false, for a GPU partition without GPUs."""
    return count if config["cluster"]["request_gpus"] else 0


def generate_gpus(wildcards):
    """GPUs one generate job of the run requests (resources gpu=N): its lmm.gpus (none without
    cluster.request_gpus)."""
    return gpus(section(wildcards, "lmm")["gpus"])


def instances_input(wildcards):
    ds = DATASETS[wildcards.dataset]
    return [ds["instances"]] if ds["task"] == "instance_seg" else []


def shard_artifacts(kind, suffix="parquet"):
    """Input function: one run's and data set's artifact of `kind` for every shard (generations, attention
    and phrases made by the run they are read from: producing_run)."""

    def inputs(wildcards):
        run = producing_run(wildcards.run, wildcards.dataset, kind)
        return [artifact(run, wildcards.dataset, kind, shard, suffix) for shard in SHARDS]

    return inputs


def metrics_path(run, dataset):
    return f"{OUT}/{run}/{dataset}/metrics/{DATASETS[dataset]['task']}.json"


def all_metrics():
    """Metrics of every run on every evaluated data set."""
    return [metrics_path(run, name) for run in RUNS for name, ds in DATASETS.items()
            if ds["task"] in EVALUATED_TASKS]


def final_targets():
    """Every shard artifact of every run, the metrics, their summary and the visualisations (and, when
    the main LMM is the embedded toy, its diagnostics; and every model of the `training` section).

    Shard artifacts are targets themselves so that a deleted shard file is rebuilt (and what
    gathers it rerun) even when the metrics downstream of it are present; a run's generations,
    attention and phrases only where it makes them itself (producing_run)."""
    targets = []
    kinds = {"generations": "parquet", "attention": "zarr", "phrases": "parquet", "masks": "parquet"}
    for run in RUNS:
        for name in DATASETS:
            made = [kind for kind in kinds if producing_run(run, name, kind) == run]
            targets += [artifact(run, name, kind, shard, kinds[kind]) for kind in made for shard in SHARDS]
            targets.append(f"{OUT}/{run}/{name}/visualize")
    if all_metrics():
        targets.append(f"{OUT}/summary.md")
    if config["lmm"]["path"] == TOY_LMM:
        targets.append(f"{OUT}/toy_diagnostics.md")
    targets += [f"{OUT}/models/{name}" for name in config["training"]]      # trained even if no run reads it
    return targets

# The training section (workflow/rules/train.smk): one entry per model the workflow trains.
TRAINING = config["training"]


def training_recipe(wildcards):
    """The recipe (the config entry as given; stages.training.recipe fills in the defaults)."""
    return TRAINING[wildcards.trained]


def training_gpus(wildcards):
    """GPUs a training stage job requests: the recipe's gpus (none without cluster.request_gpus)."""
    return gpus(TRAINING[wildcards.trained].get("gpus", 1))


def training_data(stage):
    """Input function: the stage's JSON file (images are read from its image folder, not tracked)."""

    def inputs(wildcards):
        from stages.config import schema_default

        section = TRAINING[wildcards.trained].get(f"stage{stage}", {})
        return [section.get("data", schema_default("training", "*", f"stage{stage}", "data"))]

    return inputs


def training_run(stage):
    return f"{OUT}/training/{{trained}}/stage{stage}"
