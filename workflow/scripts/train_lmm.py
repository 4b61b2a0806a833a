"""Rules train_lmm / random_lmm: the toy LLaVA trained on captions only, or its untrained twin."""
from stages.config import from_mapping
from stages.runner import stage_logging
from stages.toy import train_lmm

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(train_lmm.TrainLmmConfig, snakemake.params.train, where="train.lmm")  # noqa: F821
    if snakemake.params.get("untrained", False):  # noqa: F821
        train_lmm.init_toy_llava(snakemake.output[0], cfg)  # noqa: F821
    else:
        train_lmm.train_toy_llava(snakemake.output[0], cfg)  # noqa: F821
