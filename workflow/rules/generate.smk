# LMM generation with attention capture: one GPU job per run, data set and shard, on the run's
# lmm.gpus GPUs (the model spread over them).


rule generate:
    input:
        manifest=manifest_path("{dataset}"),
        lmm=lmm_inputs,
    output:
        generations=artifact("{run}", "{dataset}", "generations", "{shard}"),
        attention=directory(artifact("{run}", "{dataset}", "attention", "{shard}", "zarr")),
    params:
        code=code_version("generate.py"),
        stage=generate_params,
    resources:
        gpu=generate_gpus,
        slurm_partition=GPU_PARTITION,
    log:
        f"{OUT}/logs/generate/{{run}}/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/generate/{{run}}/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/generate.py"
