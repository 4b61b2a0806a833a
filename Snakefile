# Attend-and-segment: pixel grounding read out of a multimodal model's attention.
# Data path: images + annotations -> manifest -> generate (GPU, per shard) -> phrases (CPU, per shard)
# -> segment (GPU, per shard) -> evaluate (gather) -> visualize/report, summary over runs.
# Artifacts, their paths and the repository layout: docs/architecture.md; what each stage computes:
# docs/method.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/toy.smk"
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
