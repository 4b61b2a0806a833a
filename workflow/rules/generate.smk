# LMM generation with attention capture: one GPU job per shard.


rule generate:
    input:
        manifest=artifact("{dataset}", "manifest"),
        lmm=lmm_inputs,
    output:
        generations=artifact("{dataset}", "generations", "{shard}"),
        attention=directory(artifact("{dataset}", "attention", "{shard}", "zarr")),
    params:
        stage=generate_params,
    resources:
        gpu=1,
    log:
        f"{OUT}/logs/generate/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/generate/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/generate.py"
