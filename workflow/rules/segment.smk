# Attention peaks as SAM prompts: one GPU job per run, data set and shard.


rule segment:
    input:
        manifest=manifest_path("{dataset}"),
        generations=artifact("{run}", "{dataset}", "generations", "{shard}"),
        attention=artifact("{run}", "{dataset}", "attention", "{shard}", "zarr"),
        phrases=artifact("{run}", "{dataset}", "phrases", "{shard}"),
        sam=sam_inputs,
    output:
        artifact("{run}", "{dataset}", "masks", "{shard}"),
    params:
        code=code_version("segment.py"),
        stage=section_params("segment", "sam"),
    resources:
        gpu=gpus(1),
        slurm_partition=GPU_PARTITION,
    log:
        f"{OUT}/logs/segment/{{run}}/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/segment/{{run}}/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/segment.py"
