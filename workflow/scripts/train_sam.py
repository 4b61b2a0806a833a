"""Rule train_sam: the tiny SAM trained on the toy world's masks with point prompts."""
from stages.config import from_mapping
from stages.runner import stage_logging
from stages.toy import train_sam

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(train_sam.TrainSamConfig, snakemake.params.train, where="train.sam")  # noqa: F821
    train_sam.train_toy_sam(snakemake.output[0], cfg)  # noqa: F821
