# Attend-and-segment: pixel grounding read out of a multimodal model's attention.
# Data path: images + annotations -> manifest -> generate (GPU, per shard) -> phrases (CPU, per shard)
# -> segment (GPU, per shard) -> evaluate (gather) -> visualize/report, summary over runs.
# Artifacts, their paths and the repository layout: docs/architecture.md; what each stage computes:
# docs/method.md.
from snakemake.utils import min_version, validate

min_version("9.0")


# `snakemake --report`: this text opens the report; rules mark what it shows with report(...).
report: "workflow/report/workflow.rst"


# config.yaml is the embedded toy run. A run given its own configs (`--configfile config/paper/<preset>.yaml
# [overlay.yaml ...]`) is that config alone: Snakemake would otherwise deep-merge config.yaml's toy data
# sets and variants into it. Whatever a config leaves out takes the schema's default (validate below).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"



validate(config, "schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/toy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/phrases.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/visualize.smk"


rule all:
    input:
        final_targets(),
    default_target: True
