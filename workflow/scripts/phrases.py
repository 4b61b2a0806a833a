"""Rule phrases: Snakemake job -> stages.phrases.run."""
from stages import phrases
from stages.config import from_mapping
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(phrases.PhrasesConfig, snakemake.params.stage["phrases"], where="phrases")  # noqa: F821
    instances = snakemake.input.instances  # noqa: F821
    phrases.run(cfg, snakemake.input.generations, snakemake.output[0],  # noqa: F821
                instances_path=instances[0] if instances else None,
                manifest_path=snakemake.input.manifest)  # noqa: F821
