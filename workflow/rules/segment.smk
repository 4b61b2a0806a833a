# Attention peaks as SAM prompts: one GPU job per shard.


rule segment:
    input:
        manifest=artifact("{dataset}", "manifest"),
        generations=artifact("{dataset}", "generations", "{shard}"),
        attention=artifact("{dataset}", "attention", "{shard}", "zarr"),
        phrases=artifact("{dataset}", "phrases", "{shard}"),
        sam=config["sam"]["checkpoint"],
    output:
        artifact("{dataset}", "masks", "{shard}"),
    params:
        segment=config["segment"],
        sam=config["sam"],
    resources:
        gpu=1,
    log:
        f"{OUT}/logs/segment/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/segment/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/segment.py"
