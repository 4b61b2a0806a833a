# Attention peaks as SAM prompts (or picking precomputed proposals): one GPU job per run, data set and shard.


rule segment:
    input:
        unpack(proposals_inputs),
        manifest=manifest_path("{dataset}"),
        generations=upstream_artifact("generations"),
        attention=upstream_artifact("attention", "zarr"),
        phrases=upstream_artifact("phrases"),
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
