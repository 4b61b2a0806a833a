"""Rule pretrain_toy_sd: the toy DiffLMM's Stable Diffusion (VAE, then UNet as a denoiser) on train images."""
from stages.config import from_mapping
from stages.runner import stage_logging
from stages.toy import difflmm

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    cfg = from_mapping(difflmm.ToySdConfig, snakemake.params.train, where="train.sd")  # noqa: F821
    difflmm.pretrain_toy_sd(snakemake.output[0], cfg)  # noqa: F821
