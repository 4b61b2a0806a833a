"""The training loop of one stage: data parallel with ``accelerate``, resumable, with progress lines.

One optimiser step takes the next ``global_batch_size`` entries of the data order (a permutation of
the entries per epoch, drawn from ``seed + epoch``; an epoch has ``len(data) // global_batch_size``
steps, at least one: the last partial batch is dropped, as the data order decides which). Each of the
W processes takes every W-th of them and runs them in micro-batches of ``per_device_batch_size``
(gradient accumulation); gradients are averaged over micro-batches and processes. AdamW
(betas 0.9 / 0.999, eps 1e-8, weight decay on matrices only), linear warm-up over ``warmup_ratio`` of
the steps then cosine decay to 0 (transformers' ``get_cosine_schedule_with_warmup``, as LLaVA's
``--lr_scheduler_type cosine``), gradients clipped to norm 1.0 (the HF Trainer's default).
Stage 2 has two parameter groups: the LoRA at ``lr``, the projector at ``mm_projector_lr``.

Resuming: every ``save_steps`` steps the run folder gets ``checkpoints/step-<N>`` (written under a
temporary name, then renamed): the trainable weights (``trainable.safetensors``), the optimizer
(``optimizer.pt``), the scheduler, the step and loss history (``state.json``) and every process's RNG
states (torch, CUDA, NumPy, Python: ``rng-<rank>.*``). A restarted job builds the model as at the
start, loads the newest complete checkpoint and continues at its step; the data order is a function of
the step, so it continues with the batch the killed job would have trained next. On the same machine
and software the resumed run ends with the same weights as an uninterrupted one
(``tests/test_training.py``). Checkpoints of other settings (:func:`fingerprint`: another recipe, another
stage-1 projector) are deleted rather than resumed. Older checkpoints beyond ``save_total_limit`` are deleted.

Progress: a log line every ``log_steps`` steps and at the end (step, loss, learning rate, tokens/s,
elapsed, ETA); the losses of every step go to ``losses.json`` and ``loss.png`` in the run folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.config import ConfigError
from stages.io.atomic import atomic_path
from stages.training.curve import draw_loss_curve
from stages.training.data import TrainingData, read_entries
from stages.training.model import (
    build_trainee,
    export_difflmm,
    export_llava_original,
    read_projector,
    save_projector,
)
from stages.training.recipe import Recipe

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0
CHECKPOINT = re.compile(r"step-(\d+)")


def precision_of(recipe: Recipe, device: torch.device) -> str:
    """"bf16" or "fp32": ``recipe.precision``, auto = bf16 on a GPU that supports it."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if recipe.precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if recipe.precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise ConfigError("training.precision bf16: this GPU does not support bfloat16; use fp32 or auto")
    return recipe.precision


def plan(num_entries: int, global_batch_size: int, epochs: float, max_steps: int | None,
         world_size: int) -> tuple[int, int, int]:
    """(entries per step, steps per epoch, total steps)."""
    per_step = min(global_batch_size, num_entries)
    per_step -= per_step % world_size
    if per_step < 1:
        raise ConfigError(f"training: {num_entries} entries cannot be shared by {world_size} processes")
    steps_per_epoch = max(1, num_entries // per_step)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    return per_step, steps_per_epoch, total


def step_indices(num_entries: int, seed: int, step: int, per_step: int, steps_per_epoch: int) -> list[int]:
    """The entries of optimiser step ``step`` (0-based): a slice of epoch ``step // steps_per_epoch``'s
    permutation, drawn from ``seed + epoch``."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(num_entries, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * per_step:(offset + 1) * per_step]


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    plain = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda_keys = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    cuda = [tensors[key] for key in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``step-N`` folder in ``folder`` (a folder exists only once complete)."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := CHECKPOINT.fullmatch(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(accelerator: Any, folder: Path, step: int, trainee: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int) -> None:
    """``folder/step-<step>`` (module docstring), written by every process under a shared temporary
    name and renamed by the main one; then older checkpoints beyond ``keep`` are deleted."""
    from safetensors.torch import save_file

    final = folder / f"step-{step}"
    partial = folder / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tensors, plain = _rng_state()
    rank = accelerator.process_index
    save_file(tensors, partial / f"rng-{rank}.safetensors")
    (partial / f"rng-{rank}.json").write_text(json.dumps(plain))
    if accelerator.is_main_process:
        save_file(trainee.trainable_state(), partial / "trainable.safetensors")
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        (partial / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (partial / "state.json").write_text(json.dumps({**state, "step": step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(partial, final)
        steps = sorted(int(m.group(1)) for p in folder.glob("step-*") if (m := CHECKPOINT.fullmatch(p.name)))
        for old in steps[:-keep]:
            shutil.rmtree(folder / f"step-{old}", ignore_errors=True)
        log.info("checkpoint %s", final)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, rank: int, trainee: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its state (step, history)."""
    from safetensors.torch import load_file

    from stages.models.checkpoints import load_weights_only

    trainable = load_file(path / "trainable.safetensors")
    own = dict(trainee.named_parameters())
    if set(trainable) != {name for name, p in own.items() if p.requires_grad}:
        raise ConfigError(f"checkpoint {path} does not hold this recipe's trainable weights; delete the run "
                          f"folder's checkpoints to start over")
    with torch.no_grad():
        for name, value in trainable.items():
            own[name].copy_(value)
    optimizer.load_state_dict(load_weights_only(path / "optimizer.pt", what="optimizer state"))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng-{rank}.safetensors"
    if rng_file.is_file():     # a job resumed on more processes than it was saved from: fresh streams
        _set_rng_state(load_file(rng_file), json.loads((path / f"rng-{rank}.json").read_text()))
    return json.loads((path / "state.json").read_text())


# ------------------------------------------------------------------------------------------------
# The loop


def fingerprint(recipe: Recipe, stage: int, projector: str | os.PathLike | None) -> str:
    """What a checkpoint must share with the job resuming from it: the recipe's settings that decide the
    weights (not gpus, logging or saving) and stage 1's projector file."""
    import dataclasses
    import hashlib

    settings = dataclasses.asdict(recipe)
    for key in ("gpus", "log_steps", "save_steps", "save_total_limit"):
        settings.pop(key)
    digest = hashlib.sha256(json.dumps([settings, stage], sort_keys=True).encode())
    if projector is not None:
        digest.update((Path(projector) / "mm_projector.bin").read_bytes())
    return digest.hexdigest()[:16]


def _optimizer(trainee: Any, recipe: Recipe, stage: int) -> torch.optim.Optimizer:
    cfg = recipe.stage(stage)
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, parameter in trainee.named_parameters():
        if not parameter.requires_grad:
            continue
        lr = cfg.lr if stage == 1 or "lora_" in name else cfg.mm_projector_lr
        decay = cfg.weight_decay if parameter.ndim >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(parameter)
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay}
                              for (lr, decay), params in groups.items()], betas=(0.9, 0.999), eps=1e-8)


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def train_stage(recipe: Recipe, stage: int, run_dir: str | os.PathLike, out: str | os.PathLike, *,
                projector: str | os.PathLike | None = None, name: str = "model") -> Path:
    """Train ``stage`` (1 or 2) of ``recipe``; resumable in ``run_dir``; writes ``out`` (stage 1: the
    projector folder; stage 2: the model in its family's layout) atomically, and ``run_dir/loss.png``.
    ``projector``: stage 1's output folder (stage 2 only). Run it in every process of a torchrun /
    accelerate launch, or alone."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from transformers import get_cosine_schedule_with_warmup

    cfg = recipe.stage(stage)
    run_dir, out = Path(run_dir), Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = precision_of(recipe, device)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              cpu=device.type == "cpu",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    world, rank = accelerator.num_processes, accelerator.process_index
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    projector_state = read_projector(projector) if stage == 2 else None
    trainee, tokenizer, image_processor, image_tokens, base_folder = build_trainee(
        recipe, stage, frozen_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        projector_state=projector_state)
    data = TrainingData(read_entries(cfg.data), tokenizer, image_processor,
                        "plain" if stage == 1 else "v1", image_tokens, cfg.max_length, cfg.image_folder,
                        cfg.image_aspect_ratio)
    per_step, steps_per_epoch, total = plan(len(data), cfg.global_batch_size, cfg.epochs, cfg.max_steps,
                                            world)
    optimizer = _optimizer(trainee, recipe, stage)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    # The learning rate logged: the group at the stage's lr (stage 2: the LoRA's, not the projector's).
    main_group = next(k for k, group in enumerate(optimizer.param_groups) if group["lr"] == cfg.lr)
    checkpoints = run_dir / "checkpoints"
    key = fingerprint(recipe, stage, projector)
    state: dict[str, Any] = {"step": 0, "history": [], "tokens": 0}
    latest = latest_checkpoint(checkpoints)
    if latest is not None and json.loads((latest / "state.json").read_text()).get("fingerprint") != key:
        log.warning("checkpoints in %s are of other settings; starting over", checkpoints)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(checkpoints)
        accelerator.wait_for_everyone()
        latest = None
    if latest is not None:
        state = load_checkpoint(latest, rank, trainee, optimizer, scheduler)
        log.info("resuming stage %d of %s from %s (step %d of %d)", stage, name, latest, state["step"], total)
    model = accelerator.prepare_model(trainee)
    model.train()
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    log.info("stage %d of %s: %d entries, %d steps (%d per epoch) of %d sequences on %d process(es), "
             "%s, %d trainable parameters", stage, name, len(data), total, steps_per_epoch, per_step, world,
             precision, sum(p.numel() for p in trainable))
    start_step, started = state["step"], time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    for step in range(start_step, total):
        mine = step_indices(len(data), recipe.seed, step, per_step, steps_per_epoch)[rank::world]
        size = cfg.per_device_batch_size
        micros = [mine[k:k + size] for k in range(0, len(mine), size)]
        losses, tokens = [], 0
        for k, micro in enumerate(micros):
            batch = data.batch(micro)
            tokens += int(batch["attention_mask"].sum())
            batch = {key: (value.to(accelerator.device) if value is not None else None)
                     for key, value in batch.items()}
            sync = contextlib.nullcontext() if k == len(micros) - 1 else accelerator.no_sync(model)
            with sync:
                loss = model(**batch)
                accelerator.backward(loss / len(micros))
            losses.append(float(loss.detach()))
        accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        lr = scheduler.get_last_lr()[main_group]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        summed = accelerator.reduce(torch.tensor([sum(losses) / len(losses), float(tokens)],
                                                 device=accelerator.device), reduction="sum")
        step_loss, step_tokens = float(summed[0]) / world, int(summed[1])
        state["history"].append([step + 1, step_loss, lr])
        state["tokens"] += step_tokens
        window_tokens += step_tokens
        done = step + 1
        if done % recipe.log_steps == 0 or done == total:
            now = time.perf_counter()
            rate = window_tokens / max(now - window_start, 1e-9)
            per_step_s = (now - started) / (done - start_step)
            log.info("stage %d %s: step %d/%d, loss %.4f, lr %.3e, tokens/s %.0f, elapsed %s, ETA %s",
                     stage, name, done, total, step_loss, lr, rate, _eta(now - started),
                     _eta(per_step_s * (total - done)))
            window_tokens, window_start = 0, now
        if done % recipe.save_steps == 0 and done < total:
            save_checkpoint(accelerator, checkpoints, done, trainee, optimizer, scheduler,
                            {"history": state["history"], "tokens": state["tokens"], "fingerprint": key},
                            recipe.save_total_limit)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainee = accelerator.unwrap_model(model)
        trainee.eval()
        steps = [int(h[0]) for h in state["history"]]
        losses_all = [float(h[1]) for h in state["history"]]
        (run_dir / "losses.json").write_text(json.dumps({"step": steps, "loss": losses_all,
                                                         "lr": [h[2] for h in state["history"]]}))
        draw_loss_curve(steps, losses_all, run_dir / "loss.png", f"{name}: stage {stage} training loss")
        with atomic_path(out) as tmp:
            if stage == 1:
                save_projector(trainee, tmp, recipe, base_folder)
            elif recipe.family == "difflmm":
                export_difflmm(trainee, tmp, recipe, base_folder)
            else:
                export_llava_original(trainee, tmp, recipe, base_folder, tokenizer)
        log.info("stage %d of %s written to %s", stage, name, out)
    accelerator.wait_for_everyone()
    return out
