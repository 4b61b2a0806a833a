# The embedded default's inputs, built deterministically: a synthetic data set and tiny models.


rule synthetic_data:
    output:
        images=directory(f"{SYNTHETIC}/images"),
        instances=f"{SYNTHETIC}/instances.json",
        mask_gt=f"{SYNTHETIC}/{SYNTHETIC_SPLIT}_gcg_coco_mask_gt.json",
        caption_gt=f"{SYNTHETIC}/{SYNTHETIC_SPLIT}_gcg_coco_caption_gt.json",
    params:
        synthetic=config["synthetic"],
    log:
        f"{OUT}/logs/synthetic_data.log",
    benchmark:
        f"{OUT}/benchmarks/synthetic_data.tsv"
    script:
        "../scripts/synthetic_data.py"


rule toy_lmm:
    input:
        captions=f"{SYNTHETIC}/{SYNTHETIC_SPLIT}_gcg_coco_caption_gt.json",
    output:
        directory(TOY_LMM),
    params:
        seed=config["synthetic"]["seed"],
        questions=[config["generate"]["question"]] + [ds["question"] for ds in DATASETS.values() if ds.get("question")],
    log:
        f"{OUT}/logs/toy_lmm.log",
    benchmark:
        f"{OUT}/benchmarks/toy_lmm.tsv"
    script:
        "../scripts/toy_lmm.py"


rule toy_sam:
    output:
        TOY_SAM,
    params:
        seed=config["synthetic"]["seed"],
    log:
        f"{OUT}/logs/toy_sam.log",
    benchmark:
        f"{OUT}/benchmarks/toy_sam.tsv"
    script:
        "../scripts/toy_sam.py"
