# One manifest per data set (shared by every run): image ids, files, sizes and shards.


rule manifest:
    input:
        unpack(dataset_inputs),
    output:
        manifest_path("{dataset}"),
    params:
        code=code_version("manifest.py"),
        dataset=dataset_config,
        shards=config["shards"],
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/manifest/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/manifest/{{dataset}}.tsv"
    script:
        "../scripts/manifest.py"
