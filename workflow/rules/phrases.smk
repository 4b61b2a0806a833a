# Noun phrases of each answer, their tokens and (instance segmentation) their categories: CPU.


rule phrases:
    input:
        generations=artifact("{dataset}", "generations", "{shard}"),
        instances=instances_input,
    output:
        artifact("{dataset}", "phrases", "{shard}"),
    params:
        phrases=config["phrases"],
    log:
        f"{OUT}/logs/phrases/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{OUT}/benchmarks/phrases/{{dataset}}/shard-{{shard}}.tsv"
    script:
        "../scripts/phrases.py"
