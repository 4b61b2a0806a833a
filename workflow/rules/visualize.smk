# Overlays (masks, points, phrases) and per-token attention grids for the first images: the report.


rule visualize:
    input:
        manifest=artifact("{dataset}", "manifest"),
        generations=shard_artifacts("generations"),
        attention=shard_artifacts("attention", "zarr"),
        phrases=shard_artifacts("phrases"),
        masks=shard_artifacts("masks"),
    output:
        report(
            directory(f"{OUT}/{{dataset}}/visualize"),
            patterns=["{name}.png"],
            caption="../report/visualize.rst",
            category="Overlays",
            subcategory="{dataset}",
        ),
    params:
        visualize=config["visualize"],
    log:
        f"{OUT}/logs/visualize/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/visualize/{{dataset}}.tsv"
    script:
        "../scripts/visualize.py"
