"""Rule toy_lmm: the tiny random LLaVA-architecture model, its tokenizer trained on the toy captions."""
import json

from stages.models.toy_lmm import build_toy_llava
from stages.runner import stage_logging

with stage_logging(snakemake.log[0], threads=snakemake.threads):  # noqa: F821 (injected by Snakemake)
    captions = [ann["caption"] for ann in json.loads(open(snakemake.input.captions).read())["annotations"]]  # noqa: F821
    build_toy_llava(snakemake.output[0], captions + list(snakemake.params.questions),  # noqa: F821
                    seed=snakemake.params.seed)  # noqa: F821
