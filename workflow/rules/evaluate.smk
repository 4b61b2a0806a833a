# Evaluators: gather every shard of a data set.


rule evaluate_instance_seg:
    input:
        unpack(dataset_inputs),
        manifest=artifact("{dataset}", "manifest"),
        masks=shard_artifacts("masks"),
        phrases=shard_artifacts("phrases"),
    output:
        predictions=f"{OUT}/{{dataset}}/predictions/instance_seg.json",
        metrics=report(
            f"{OUT}/{{dataset}}/metrics/instance_seg.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{dataset}",
        ),
    log:
        f"{OUT}/logs/evaluate_instance_seg/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_instance_seg/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_instance_seg.py"


rule evaluate_gcg:
    input:
        unpack(dataset_inputs),
        manifest=artifact("{dataset}", "manifest"),
        generations=shard_artifacts("generations"),
        masks=shard_artifacts("masks"),
    output:
        mask_predictions=f"{OUT}/{{dataset}}/predictions/gcg_masks.json",
        caption_predictions=f"{OUT}/{{dataset}}/predictions/gcg_captions.json",
        metrics=report(
            f"{OUT}/{{dataset}}/metrics/gcg.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{dataset}",
        ),
    params:
        gcg=config["evaluate"]["gcg"],
    log:
        f"{OUT}/logs/evaluate_gcg/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_gcg/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_gcg.py"
