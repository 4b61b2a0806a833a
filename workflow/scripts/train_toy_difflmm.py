"""Rule train_toy_difflmm: the toy DiffLMM (frozen toy SD + CLIP tower) trained on captions only with train.lmm's budget."""
from stages.config import from_mapping
from stages.runner import stage_logging
from stages.toy import difflmm, train_lmm

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(train_lmm.TrainLmmConfig, snakemake.params.train, where="train.lmm")  # noqa: F821
    difflmm.train_toy_difflmm(snakemake.output[0], snakemake.input.sd, cfg)  # noqa: F821
