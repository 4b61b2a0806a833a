"""LLaVA-1.5's two-stage recipe (stages/training) on tiny SD-1.5 / CLIP / Vicuna checkpoints fabricated in
their hub layouts (tests/difflmm_hub.py) and tiny data sets in LLaVA's JSON formats: the token ids and
labels, both stages learning a memorisable batch, the published DiffLMM layout loaded by the difflmm
loader, the CLIP baseline in the original layout loaded by the llava_original loader, a SIGKILLed stage 2
resuming to the uninterrupted run's weights, and the rules through the DAG up to the generate stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from difflmm_hub import BASE_ID, CLIP_ID, GRID, RESOLUTION, SD_ID, write_base, write_clip, write_sd
from fake_hub import snapshot, use_offline_cache
from PIL import Image

from stages.config import from_mapping
from stages.generate import build_prompt
from stages.models.llava_v1 import IMAGE_TOKEN, LLAVA_V1_CHAT_TEMPLATE, encode_release_prompt, load_tokenizer
from stages.training.data import IGNORE_INDEX, IMAGE_INDEX, encode_entry
from stages.training.recipe import Recipe
from stages.training.trainer import train_stage

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square on grey noise", "two blue dots in a field"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    folders = {repo: snapshot(cache, repo) for repo in (SD_ID, CLIP_ID, BASE_ID)}
    write_sd(folders[SD_ID])
    write_clip(folders[CLIP_ID])
    write_base(folders[BASE_ID])
    return cache, folders


@pytest.fixture
def offline(hub, monkeypatch):
    use_offline_cache(monkeypatch, hub[0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # the same float reductions in every run of a test
    yield hub[1]
    torch.set_num_threads(threads)


def write_data(folder: Path) -> dict[str, str]:
    """Two noise images (non-square), LCS-558K-style pairs and llava_v1_5_mix665k-style conversations
    (multi-turn, the image placeholder after the question, one text-only entry)."""
    images = folder / "images"
    (images / "coco").mkdir(parents=True)
    for k in range(2):
        pixels = np.random.default_rng(k).integers(0, 256, (RESOLUTION, RESOLUTION + 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / "coco" / f"{k}.jpg")
    pretrain = [{"id": f"{k}", "image": f"coco/{k}.jpg", "conversations": [
        {"from": "human", "value": "Give a brief description of the image.\n<image>"},
        {"from": "gpt", "value": CAPTIONS[k]}]} for k in range(2)]
    finetune = [{"id": f"{k}", "image": f"coco/{k}.jpg", "conversations": [
        {"from": "human", "value": "What is in the image?\n<image>"},
        {"from": "gpt", "value": CAPTIONS[k].capitalize() + "."},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]} for k in range(2)]
    finetune.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                                    {"from": "gpt", "value": "Hi."}]})
    (folder / "pretrain.json").write_text(json.dumps(pretrain))
    (folder / "finetune.json").write_text(json.dumps(finetune))
    return {"pretrain": str(folder / "pretrain.json"), "finetune": str(folder / "finetune.json"),
            "images": str(images)}


def recipe_mapping(data: dict[str, str], **overrides) -> dict:
    """A tiny recipe: the fabricated hub ids, a 64 px DiffLMM (8 x 8 image tokens), learning rates high
    enough to memorise two images in a few steps, no warm-up."""
    stage = {"image_folder": data["images"], "warmup_ratio": 0.0, "per_device_batch_size": 2}
    recipe = {"base": BASE_ID, "mm_vision_sd_pe": GRID * GRID, "mm_vision_resolution": RESOLUTION,
              "log_steps": 1, "save_steps": 100, "seed": 0,
              "stage1": {**stage, "data": data["pretrain"], "global_batch_size": 2, "max_steps": 6,
                         "lr": 0.01},
              "stage2": {**stage, "data": data["finetune"], "global_batch_size": 3, "max_steps": 6,
                         "lr": 0.01,
                         "mm_projector_lr": 0.001, "lora_r": 4, "lora_alpha": 8}}
    for key, value in overrides.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    return recipe


def losses(run_dir: Path) -> list[float]:
    return json.loads((run_dir / "losses.json").read_text())["loss"]


def test_ids_and_labels_follow_the_release_templates(offline):
    tokenizer = load_tokenizer(offline[BASE_ID], BASE_ID)
    entry = {"id": "0", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "What is in the image?\n<image>"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "No."}]}
    ids, labels = encode_entry(tokenizer, entry, "v1", GRID * GRID, 2048)
    assert ids.count(IMAGE_INDEX) == GRID * GRID and len(ids) == len(labels)
    # The prompt up to the first "ASSISTANT:" is what the generate stage gives the trained model.
    class Processor:
        chat_template = LLAVA_V1_CHAT_TEMPLATE

        def apply_chat_template(self, messages, **kwargs):
            from jinja2 import Template
            return Template(self.chat_template).render(messages=messages, **kwargs)
    prompt = build_prompt(Processor(), "What is in the image?", None)
    prompt_ids = encode_release_prompt(tokenizer, prompt, IMAGE_INDEX, GRID * GRID)
    assert ids[:len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in labels[:len(prompt_ids)])
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current)
    assert [tokenizer.decode(span) for span in spans if span] == ["A red square.</s>", "No.</s>"]
    assert all(span[-1] == tokenizer.eos_token_id for span in spans if span)

    ids, labels = encode_entry(tokenizer, {"image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": CAPTIONS[0]}]},
        "plain", GRID * GRID, 2048)
    assert ids[:1 + GRID * GRID] == [tokenizer.bos_token_id] + [IMAGE_INDEX] * GRID * GRID
    labelled = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == CAPTIONS[0] + "\n"
    with pytest.raises(ValueError, match="cuts through the image"):
        encode_entry(tokenizer, {"image": "x.jpg", "conversations": entry["conversations"]}, "v1",
                     GRID * GRID, 40)
    assert IMAGE_TOKEN not in tokenizer.convert_ids_to_tokens([i for i in ids if i >= 0])


def test_difflmm_trains_in_two_stages_into_the_published_layout(offline, tmp_path, caplog):
    """Both stages lower the loss on a memorisable batch; the model lands in the published DiffLMM layout
    and the difflmm loader reads it with the trained projector and LoRA."""
    from safetensors.torch import load_file

    from stages.models.registry import load_lmm

    data = write_data(tmp_path)
    recipe = from_mapping(Recipe, recipe_mapping(data), where="training.tiny")
    caplog.set_level("INFO")
    train_stage(recipe, 1, tmp_path / "run1", tmp_path / "projector", name="tiny")
    train_stage(recipe, 2, tmp_path / "run2", tmp_path / "model", projector=tmp_path / "projector",
                name="tiny")
    for run in ("run1", "run2"):
        curve = losses(tmp_path / run)
        assert len(curve) == 6 and curve[-1] < curve[0] - 0.5, (run, curve)
        assert (tmp_path / run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [r.getMessage() for r in caplog.records if "tiny: step" in r.getMessage()]
    assert len(lines) == 12 and all(k in lines[-1] for k in ("loss", "lr", "tokens/s", "ETA"))
    assert {p.name for p in (tmp_path / "projector").iterdir()} == {"mm_projector.bin", "config.json"}

    model = tmp_path / "model"
    assert {p.name for p in model.iterdir()} >= {"config.json", "adapter_config.json",
                                                  "adapter_model.safetensors", "non_lora_trainables.bin"}
    config = json.loads((model / "config.json").read_text())
    assert (config["mm_projector_type"], config["mm_vision_tower"], config["mm_vision_sd_clip"]) == \
        ("SDCLIPBlock", SD_ID, CLIP_ID)
    assert (config["mm_vision_select_layer"], config["mm_vision_sd_timestep"], config["mm_vision_sd_pe"],
            config["mm_vision_sd_concat_clip"], config["mm_vision_sd_implicit_caption"],
            config["image_aspect_ratio"]) == (1, 100, GRID * GRID, True, True, "pad")
    adapter = json.loads((model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE_ID and adapter["r"] == 4
    lora = load_file(model / "adapter_model.safetensors")
    assert lora and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in lora)
    assert len(lora) == 2 * 7 * 2                        # A and B of 7 linear layers in each of 2 layers
    projector = torch.load(model / "non_lora_trainables.bin", weights_only=True)
    assert all(k.startswith("base_model.model.model.mm_projector.") for k in projector)

    loaded = load_lmm("difflmm", str(model), dtype=torch.float32, attn_implementation="sdpa",
                      device=torch.device("cpu"))
    state = loaded.model.state_dict()
    torch.testing.assert_close(state["model.multi_modal_projector.vt_pe"],
                               projector["base_model.model.model.mm_projector.vt_pe"])
    torch.testing.assert_close(state["model.vision_tower.clip_pe"],
                               projector["base_model.model.model.mm_projector.clip_pe"])
    base = load_file(offline[BASE_ID] / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    a = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = lora["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(state["model.language_model.layers.0.self_attn.q_proj.weight"],
                               base + 8 / 4 * b @ a)
    assert b.abs().max() > 0                              # the LoRA trained away from its zero start


KILLED_RUN = """
import os, signal, sys
import torch
from huggingface_hub import constants
constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = os.environ["HF_HUB_CACHE"], True
torch.set_num_threads(1)
from pathlib import Path
from stages.training import data, launch
checkpoint = Path(sys.argv[1]) / "checkpoints" / "step-2"
batch, calls = data.TrainingData.batch, []
def batch_then_die(self, indices):
    if checkpoint.is_dir():
        calls.append(indices)
        if len(calls) == 2:                 # step 3, after its first micro-batch's forward and backward
            os.kill(os.getpid(), signal.SIGKILL)
    return batch(self, indices)
data.TrainingData.batch = batch_then_die
launch.main(["--recipe", sys.argv[2], "--stage", "2", "--run-dir", sys.argv[1], "--out", sys.argv[3],
             "--projector", sys.argv[4], "--name", "tiny"])
"""


@pytest.mark.slow
def test_killed_stage_2_resumes_to_the_uninterrupted_weights(offline, tmp_path, hub, caplog):
    """SIGKILL in step 3 of 6 (after the step-2 checkpoint, mid-accumulation), rerun: it continues at step
    2 and ends with exactly the weights of the uninterrupted run (same seed, same machine, one thread).
    Slow (about 10 s): a training process of its own to kill, besides the two trainings it compares."""
    from safetensors.torch import load_file

    data = write_data(tmp_path)
    mapping = recipe_mapping(data, save_steps=2, stage1={"max_steps": 1},
                             stage2={"global_batch_size": 3, "per_device_batch_size": 1})
    recipe = from_mapping(Recipe, mapping, where="training.tiny")
    train_stage(recipe, 1, tmp_path / "run1", tmp_path / "projector")
    train_stage(recipe, 2, tmp_path / "reference-run", tmp_path / "reference",
                projector=tmp_path / "projector")

    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(mapping))
    run_dir, out = tmp_path / "run2", tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(hub[0]), "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run_dir), str(recipe_file), str(out),
                             str(tmp_path / "projector")], env=env, capture_output=True, text=True,
                            check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-2").is_dir() and not out.exists()

    caplog.set_level("INFO")
    train_stage(recipe, 2, run_dir, out, projector=tmp_path / "projector")
    assert any("from" in r.getMessage() and "(step 2 of 6)" in r.getMessage() for r in caplog.records)
    assert losses(run_dir) == losses(tmp_path / "reference-run")
    resumed, reference = load_file(out / "adapter_model.safetensors"), load_file(
        tmp_path / "reference" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    resumed, reference = (torch.load(folder / "non_lora_trainables.bin", weights_only=True)
                          for folder in (out, tmp_path / "reference"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_clip_baseline_trains_into_the_original_layout(offline, tmp_path):
    """The same rules train the CLIP-tower LLaVA; the llava_original loader reads the result."""
    from safetensors.torch import load_file

    from stages.models.registry import load_lmm

    data = write_data(tmp_path)
    recipe = from_mapping(Recipe, recipe_mapping(data, family="llava_original", vision_tower=CLIP_ID,
                                                 stage1={"max_steps": 2}, stage2={"max_steps": 2}))
    train_stage(recipe, 1, tmp_path / "run1", tmp_path / "projector")
    train_stage(recipe, 2, tmp_path / "run2", tmp_path / "model", projector=tmp_path / "projector")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["mm_projector_type"], config["mm_vision_tower"], config["mm_vision_select_layer"]) == \
        ("mlp2x_gelu", CLIP_ID, -2)
    weights = load_file(tmp_path / "model" / "model.safetensors")
    assert "model.mm_projector.0.weight" in weights and not any("lora" in key for key in weights)
    loaded = load_lmm("llava_original", str(tmp_path / "model"), dtype=torch.float32,
                      attn_implementation="sdpa", device=torch.device("cpu"))
    torch.testing.assert_close(loaded.model.state_dict()["model.multi_modal_projector.linear_1.weight"],
                               weights["model.mm_projector.0.weight"])
    [layout] = loaded.image_layouts({"input_ids": torch.tensor([[1] + [loaded.image_token_id] * 64 + [2]])})
    assert layout.grid == (GRID, GRID)


@pytest.mark.slow
def test_rules_train_then_generate_on_the_trained_model(hub, tmp_path):
    """`lmm.path: results/models/tiny` with `training: {tiny: ...}`: the DAG trains stage 1 and 2 (rules
    train_stage1, train_stage2) and the generate stage runs on the trained DiffLMM."""
    import yaml
    from test_workflow import snakemake

    from stages.io.tables import read_table

    workdir = tmp_path / "work"
    workdir.mkdir()
    data = write_data(workdir)
    config = {"shards": 1, "training": {"tiny": recipe_mapping(data, stage1={"max_steps": 2},
                                                               stage2={"max_steps": 2})},
              "lmm": {"family": "difflmm", "path": "results/models/tiny", "dtype": "float32"},
              "generate": {"max_new_tokens": 4},
              "datasets": {"noise": {"task": "images", "images": data["images"] + "/coco"}}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/main/noise/generations/shard-0.parquet"
    env_keys = {"HF_HUB_CACHE": str(hub[0])}
    os.environ.update(env_keys)
    try:
        snakemake(workdir, target, "--cores", "1", "--configfile", str(workdir / "config.yaml"))
    finally:
        for key in env_keys:
            os.environ.pop(key)
    table = read_table(workdir / target, "generations")
    assert len(table) == 2 and table["error"].isna().all() and (table["grid_h"] == GRID).all()
    for stage in (1, 2):
        assert (workdir / f"results/training/tiny/stage{stage}/loss.png").is_file()
        assert "tiny: step 2/2" in (workdir / f"results/logs/train_stage{stage}/tiny.log").read_text()
    assert (workdir / "results/models/tiny/non_lora_trainables.bin").is_file()


def test_training_overlay_sets_the_recipes_of_the_paper_comparison():
    """config/training/difflmm_vs_clip.yaml over a paper preset: both recipes with LLaVA-1.5's values and
    DiffLMM's options, the main run on the trained DiffLMM, a variant on the CLIP baseline."""
    from test_presets import PAPER, load_config

    from stages.config import stage_sections

    config = load_config(PAPER / "difflmm_coco.yaml", ROOT / "config" / "training" / "difflmm_vs_clip.yaml")
    diff = from_mapping(Recipe, config["training"]["difflmm-7b"])
    clip = from_mapping(Recipe, config["training"]["llava-clip-7b"])
    assert (diff.tower, diff.projector_type, diff.select_layer, diff.mm_vision_resolution,
            diff.mm_vision_sd_pe, diff.mm_vision_sd_timestep, diff.mm_vision_sd_ensemble_size) == \
        (SD_ID, "SDCLIPBlock", 1, 384, 576, 100, 1)
    assert (clip.tower, clip.projector_type, clip.select_layer) == (CLIP_ID, "mlp2x_gelu", -2)
    for recipe in (diff, clip):
        s1, s2 = recipe.stage1, recipe.stage2
        assert (s1.lr, s1.global_batch_size, s1.per_device_batch_size, s1.epochs, s1.warmup_ratio,
                s1.weight_decay, s1.max_length) == (1e-3, 256, 32, 1, 0.03, 0.0, 2048)
        assert (s2.lr, s2.mm_projector_lr, s2.global_batch_size, s2.per_device_batch_size, s2.lora_r,
                s2.lora_alpha, s2.lora_dropout, s2.max_length, s2.image_aspect_ratio) == \
            (2e-4, 2e-5, 128, 16, 128, 256, 0.05, 2048, "pad")
        assert recipe.gpus == 8 and recipe.precision == "auto" and recipe.gradient_checkpointing
    out = config["out"]
    assert stage_sections(config, "main", "coco_val2017")["lmm"]["path"] == f"{out}/models/difflmm-7b"
    clip_lmm = stage_sections(config, "clip_baseline", "coco_val2017")["lmm"]
    assert (clip_lmm["family"], clip_lmm["path"], clip_lmm["base"]) == \
        ("llava_original", f"{out}/models/llava-clip-7b", None)
