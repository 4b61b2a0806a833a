# One manifest per data set: image ids, files, sizes and the shard of every image.


rule manifest:
    input:
        unpack(dataset_inputs),
    output:
        artifact("{dataset}", "manifest"),
    params:
        dataset=dataset_config,
        shards=config["shards"],
    log:
        f"{OUT}/logs/manifest/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/manifest/{{dataset}}.tsv"
    script:
        "../scripts/manifest.py"
