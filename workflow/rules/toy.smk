# The embedded default's inputs, built deterministically: the toy world's evaluated split and the
# toy models, trained on the world's train split (the LMM on captions only).
TOY_LMM_RANDOM = f"{OUT}/models/toy-llava-random"
# The toy DiffLMM (config/toy-towers.yaml): built only when a run's lmm.path names it.
TOY_SD = f"{OUT}/models/toy-sd"
TOY_DIFFLMM = f"{OUT}/models/toy-difflmm"


rule synthetic_data:
    output:
        images=directory(f"{SYNTHETIC}/images"),
        instances=f"{SYNTHETIC}/instances.json",
        mask_gt=f"{SYNTHETIC}/{SYNTHETIC_SPLIT}_gcg_coco_mask_gt.json",
        caption_gt=f"{SYNTHETIC}/{SYNTHETIC_SPLIT}_gcg_coco_caption_gt.json",
        refs=f"{SYNTHETIC}/refs(unc).p",
        narratives=f"{SYNTHETIC}/png_coco_{SYNTHETIC_SPLIT}.json",
        panoptic=f"{SYNTHETIC}/panoptic_{SYNTHETIC_SPLIT}.json",
        panoptic_masks=directory(f"{SYNTHETIC}/panoptic_{SYNTHETIC_SPLIT}"),
    params:
        code=code_version("synthetic_data.py"),
        synthetic=config["synthetic"],
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/synthetic_data.log",
    benchmark:
        f"{OUT}/benchmarks/synthetic_data.tsv"
    script:
        "../scripts/synthetic_data.py"


rule train_lmm:
    output:
        directory(TOY_LMM),
    params:
        code=code_version("train_lmm.py"),
        train=train_lmm_params,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/train_lmm.log",
    benchmark:
        f"{OUT}/benchmarks/train_lmm.tsv"
    script:
        "../scripts/train_lmm.py"


rule random_lmm:
    output:
        directory(TOY_LMM_RANDOM),
    params:
        code=code_version("train_lmm.py"),
        train=train_lmm_params,
        untrained=True,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/random_lmm.log",
    benchmark:
        f"{OUT}/benchmarks/random_lmm.tsv"
    script:
        "../scripts/train_lmm.py"


rule pretrain_toy_sd:
    output:
        directory(TOY_SD),
    params:
        code=code_version("pretrain_toy_sd.py"),
        train=train_sd_params,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/pretrain_toy_sd.log",
    benchmark:
        f"{OUT}/benchmarks/pretrain_toy_sd.tsv"
    script:
        "../scripts/pretrain_toy_sd.py"


rule train_toy_difflmm:
    input:
        sd=TOY_SD,
    output:
        directory(TOY_DIFFLMM),
    params:
        code=code_version("train_toy_difflmm.py"),
        train=train_lmm_params,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/train_toy_difflmm.log",
    benchmark:
        f"{OUT}/benchmarks/train_toy_difflmm.tsv"
    script:
        "../scripts/train_toy_difflmm.py"


rule train_sam:
    output:
        TOY_SAM,
    params:
        code=code_version("train_sam.py"),
        train=train_sam_params,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/train_sam.log",
    benchmark:
        f"{OUT}/benchmarks/train_sam.tsv"
    script:
        "../scripts/train_sam.py"


rule toy_diagnostics:
    input:
        trained=TOY_LMM,
        untrained=TOY_LMM_RANDOM,
    output:
        json=f"{OUT}/toy_diagnostics.json",
        markdown=f"{OUT}/toy_diagnostics.md",
        html=report(f"{OUT}/toy_diagnostics.html", caption="../report/toy_diagnostics.rst",
                    category="Summary", labels={"table": "toy LMM diagnostics (val split)"}),
    params:
        code=code_version("toy_diagnostics.py"),
        # On the val split, as many images as the evaluated split has.
        settings={**_world(), "split": "val", "num_images": config["synthetic"]["num_images"],
                  "question": config["generate"]["question"]},
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/toy_diagnostics.log",
    benchmark:
        f"{OUT}/benchmarks/toy_diagnostics.tsv"
    script:
        "../scripts/toy_diagnostics.py"
