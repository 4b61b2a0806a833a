"""One training stage as one job on N GPUs: in this process for one GPU (or the CPU), else ``torchrun``
with one process per GPU, each running :func:`stages.training.trainer.train_stage` (accelerate reads
torchrun's environment and wraps the model in DistributedDataParallel).

CLI (what torchrun runs; also usable by hand)::

    python -m stages.training --recipe recipe.json --stage 2 --run-dir results/training/m/stage2 \\
        --out results/models/m --projector results/training/m/projector [--name m]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.config import from_mapping
from stages.training.recipe import Recipe

log = logging.getLogger(__name__)


def run_stage(recipe: Mapping[str, Any], stage: int, run_dir: str | os.PathLike, out: str | os.PathLike, *,
              projector: str | os.PathLike | None = None, name: str = "model",
              devices: Sequence[str] = ("cpu",), log_stream: Any = None) -> None:
    """Train ``stage`` of ``recipe`` (the config mapping of one ``training`` entry) on ``devices``
    (torch device strings the job holds: ``claimed_devices``). Several CUDA devices: ``torchrun`` on
    them (``CUDA_VISIBLE_DEVICES`` narrowed to them), its output to ``log_stream``."""
    from stages.training.trainer import train_stage

    cfg = from_mapping(Recipe, recipe, where=f"training.{name}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cuda = [device for device in devices if device.startswith("cuda")]
    if len(cuda) <= 1:
        if cuda:
            import torch

            torch.cuda.set_device(torch.device(cuda[0]))
        train_stage(cfg, stage, run_dir, out, projector=projector, name=name)
        return
    import torch

    from stages.devices import visible_device_ids

    visible = visible_device_ids(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
    ids = [visible[int(device.split(":")[1])] for device in cuda]
    recipe_file = run_dir / "recipe.json"
    recipe_file.write_text(json.dumps(dict(recipe), indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(ids)}",
               "-m", "stages.training", "--recipe", str(recipe_file), "--stage", str(stage),
               "--run-dir", str(run_dir), "--out", str(out), "--name", name]
    if projector is not None:
        command += ["--projector", str(projector)]
    log.info("launching %s on GPUs %s", " ".join(command), ",".join(ids))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}
    subprocess.run(command, check=True, env=env, stdout=log_stream,
                   stderr=subprocess.STDOUT if log_stream else None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.training", description="Train one stage of a "
                                     "recipe (one process of a torchrun launch, or alone).")
    parser.add_argument("--recipe", required=True,
                        help="JSON file: one entry of the config's training section")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--run-dir", required=True, help="folder of checkpoints, losses and loss.png")
    parser.add_argument("--out", required=True,
                        help="stage 1: the projector folder; stage 2: the model folder")
    parser.add_argument("--projector", help="stage 1's output folder (stage 2)")
    parser.add_argument("--name", default="model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from stages.training.trainer import train_stage

    recipe = from_mapping(Recipe, json.loads(Path(args.recipe).read_text()), where=f"training.{args.name}")
    train_stage(recipe, args.stage, args.run_dir, args.out, projector=args.projector, name=args.name)
