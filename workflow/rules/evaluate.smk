# Evaluators (gather every shard of a run and data set) and the summary over runs.


rule evaluate_instance_seg:
    input:
        unpack(dataset_inputs),
        manifest=manifest_path("{dataset}"),
        masks=shard_artifacts("masks"),
        phrases=shard_artifacts("phrases"),
    output:
        predictions=f"{OUT}/{{run}}/{{dataset}}/predictions/instance_seg.json",
        metrics=report(
            f"{OUT}/{{run}}/{{dataset}}/metrics/instance_seg.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{run}: {dataset}",
        ),
    params:
        code=code_version("evaluate_instance_seg.py"),
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/evaluate_instance_seg/{{run}}/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_instance_seg/{{run}}/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_instance_seg.py"


rule evaluate_gcg:
    input:
        unpack(dataset_inputs),
        manifest=manifest_path("{dataset}"),
        generations=shard_artifacts("generations"),
        masks=shard_artifacts("masks"),
    output:
        mask_predictions=f"{OUT}/{{run}}/{{dataset}}/predictions/gcg_masks.json",
        caption_predictions=f"{OUT}/{{run}}/{{dataset}}/predictions/gcg_captions.json",
        metrics=report(
            f"{OUT}/{{run}}/{{dataset}}/metrics/gcg.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{run}: {dataset}",
        ),
    params:
        code=code_version("evaluate_gcg.py"),
        gcg=lambda wildcards: section(wildcards, "evaluate")["gcg"],
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/evaluate_gcg/{{run}}/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_gcg/{{run}}/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_gcg.py"


rule evaluate_res:
    input:
        unpack(dataset_inputs),
        manifest=manifest_path("{dataset}"),
        masks=shard_artifacts("masks"),
    output:
        predictions=f"{OUT}/{{run}}/{{dataset}}/predictions/res.json",
        metrics=report(
            f"{OUT}/{{run}}/{{dataset}}/metrics/res.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{run}: {dataset}",
        ),
    params:
        code=code_version("evaluate_res.py"),
        dataset=dataset_config,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/evaluate_res/{{run}}/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_res/{{run}}/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_res.py"


rule evaluate_png:
    input:
        unpack(dataset_inputs),
        manifest=manifest_path("{dataset}"),
        masks=shard_artifacts("masks"),
    output:
        predictions=f"{OUT}/{{run}}/{{dataset}}/predictions/png.json",
        metrics=report(
            f"{OUT}/{{run}}/{{dataset}}/metrics/png.json",
            caption="../report/metrics.rst",
            category="Metrics",
            subcategory="{run}: {dataset}",
        ),
    params:
        code=code_version("evaluate_png.py"),
        dataset=dataset_config,
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/evaluate_png/{{run}}/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/evaluate_png/{{run}}/{{dataset}}.tsv"
    script:
        "../scripts/evaluate_png.py"


rule summary:
    input:
        all_metrics(),
    output:
        table=f"{OUT}/summary.md",
        json=f"{OUT}/summary.json",
        html=report(f"{OUT}/summary.html", caption="../report/summary.rst", category="Summary",
                    labels={"table": "metrics of every run and data set"}),
    params:
        code=code_version("summary.py"),
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/summary.log",
    benchmark:
        f"{OUT}/benchmarks/summary.tsv"
    script:
        "../scripts/summary.py"
