# LLaVA-1.5's two-stage training recipe for DiffLMM and the CLIP-tower baseline (config `training:`,
# stages/training): stage 1 pretrains the projector, stage 2 finetunes a LoRA and the projector and
# writes {OUT}/models/<name> in the layout its family's loader reads, so a run whose lmm.path is that
# folder trains it first. Each stage is one job on the recipe's `gpus` GPUs (resources gpu=N; torchrun
# inside the job for N > 1); its run folder {OUT}/training/<name>/stage<k>/ keeps the checkpoints a
# killed job resumes from, the losses and loss.png (also in the report).
wildcard_constraints:
    trained="|".join(map(re.escape, TRAINING)) or "^$",


rule train_stage1:
    input:
        data=training_data(1),
    output:
        projector=directory(f"{OUT}/training/{{trained}}/projector"),
        curve=report(f"{training_run(1)}/loss.png", caption="../report/training_loss.rst",
                     category="Training", labels={"model": "{trained}", "stage": "1 (projector)"}),
    params:
        code=code_version("train_recipe.py"),
        recipe=training_recipe,
        stage=1,
        run_dir=training_run(1),
    resources:
        gpu=training_gpus,
        slurm_partition=GPU_PARTITION,
    log:
        f"{OUT}/logs/train_stage1/{{trained}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_stage1/{{trained}}.tsv"
    script:
        "../scripts/train_recipe.py"


rule train_stage2:
    input:
        data=training_data(2),
        projector=f"{OUT}/training/{{trained}}/projector",
    output:
        model=directory(f"{OUT}/models/{{trained}}"),
        curve=report(f"{training_run(2)}/loss.png", caption="../report/training_loss.rst",
                     category="Training", labels={"model": "{trained}", "stage": "2 (LoRA)"}),
    params:
        code=code_version("train_recipe.py"),
        recipe=training_recipe,
        stage=2,
        run_dir=training_run(2),
    resources:
        gpu=training_gpus,
        slurm_partition=GPU_PARTITION,
    log:
        f"{OUT}/logs/train_stage2/{{trained}}.log",
    benchmark:
        f"{OUT}/benchmarks/train_stage2/{{trained}}.tsv"
    script:
        "../scripts/train_recipe.py"
