# Noun phrases of each answer, their tokens and (instance segmentation) their categories: CPU.


rule phrases:
    input:
        generations=upstream_artifact("generations"),
        manifest=manifest_path("{dataset}"),
        instances=instances_input,
    output:
        artifact("{run}", "{dataset}", "phrases", "{shard}"),
    params:
        code=code_version("phrases.py"),
        stage=section_params("phrases"),
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/phrases/{{run}}/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/phrases/{{run}}/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/phrases.py"
