# Overlays (masks, points, phrases) and per-token attention grids for the first images: the report.

# The report lists each image once, with a toggle between its two figures (stages/visualize.py); the
# label that sorts first (the overlay) is the one shown first.
FIGURES = {"overlay": "masks and points", "attention": "per-token attention"}


rule visualize:
    input:
        manifest=manifest_path("{dataset}"),
        generations=shard_artifacts("generations"),
        attention=shard_artifacts("attention", "zarr"),
        phrases=shard_artifacts("phrases"),
        masks=shard_artifacts("masks"),
    output:
        report(
            directory(f"{OUT}/{{run}}/{{dataset}}/visualize"),
            patterns=["{image}_{figure}.png"],
            caption="../report/visualize.rst",
            category="Overlays",
            subcategory="{run}: {dataset}",
            labels=lambda wildcards: {"image": wildcards.image,
                                      "figure": FIGURES.get(wildcards.figure, wildcards.figure)},
        ),
    params:
        code=code_version("visualize.py"),
        visualize=config["visualize"],
        # The attention maps are laid on the image as the run's segment stage lays them.
        upsample=lambda wildcards: section(wildcards, "segment")["upsample"],
    resources:
        slurm_partition=CPU_PARTITION,
    log:
        f"{OUT}/logs/visualize/{{run}}/{{dataset}}.log",
    benchmark:
        f"{OUT}/benchmarks/visualize/{{run}}/{{dataset}}.tsv"
    script:
        "../scripts/visualize.py"
