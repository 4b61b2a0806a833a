"""The toy DiffLMM: the toy LLaVA with DiffLMM's tower (diffusion UNet features + CLIP features), for the
CLIP-tower vs UNet-tower comparison in miniature.

Two steps, each a rule of the workflow:

1. :func:`pretrain_toy_sd`: a tiny Stable-Diffusion-1.5-style folder (``vae/``, ``unet/``, ``scheduler/``,
   ``text_encoder/``, ``tokenizer/``, ``model_index.json``) trained on the toy world's *train* images
   alone, no captions and no labels: first the AutoencoderKL as an autoencoder (mean squared
   reconstruction error + a small KL term), its ``scaling_factor`` set to 1 / the standard deviation of
   its latents as SD's was; then the UNet2DConditionModel as an epsilon-predicting denoiser of those
   latents (SD's scaled-linear schedule, 1,000 steps, uniform timesteps), its cross-attention context
   the empty prompt's text-encoder output (the unconditional input of SD; the text encoder is random
   and never trained, it only supplies that vector, which the difflmm loader adds to the implicit
   caption). Images enter as the difflmm loader's processor makes them (CLIP preprocessing at
   ``resolution`` px, padded to a square), so the frozen SD sees at feature time what it was trained on.
2. :func:`train_toy_difflmm`: the DiffLMM of the ``difflmm`` family (:mod:`stages.models.difflmm`) with
   that SD frozen, a toy CLIP ViT and a Llama language model of the toy LLaVA's sizes, initialised as the
   toy LLaVA is (:func:`stages.toy.model.build_toy_llava`, same seed and tokenizer), trained with the toy
   LLaVA's loop (:func:`stages.toy.train_lmm.train_model`: same captions, loss, steps, batch, learning
   rate, schedule and seed). Trained: CLIP, the implicit-caption MLP and position embedding, DiffLMM's
   projector and the whole language model; frozen: VAE and UNet (the caption's gradient flows through
   the UNet's cross-attention into the implicit-caption MLP, as in the release). No boxes, masks,
   points or coordinates anywhere.

Geometry: DiffLMM's CLIP reads the image at 7/8 of the SD resolution, so the toy DiffLMM reads 128 px
(SD: VAE factor 8, a 16 x 16 latent; the UNet's up-block 1, as the release's, gives an 8 x 8 grid) and
its CLIP 112 px in 14 px patches: the same 8 x 8 grid of image tokens as the toy LLaVA's 96 px in 12 px
patches, each token covering the same part of the image; the CLIP's sizes are the toy's.

On-disk layout: the published DiffLMM LoRA layout, self-contained (the loader resolves these relative
names inside the folder): ``config.json`` (Llama fields + ``mm_*``; ``mm_vision_tower`` "sd",
``mm_vision_sd_clip`` "clip"), ``sd/`` (the frozen SD folder of step 1), ``clip/`` (CLIPVisionModel),
``language_model/`` (LlamaForCausalLM, the toy tokenizer, generation config), ``adapter_config.json`` +
``adapter_model.safetensors`` (a zero LoRA, ``lora_B`` = 0, base ``language_model``: the trained
language model is the base, so merging the adapter changes nothing) and ``non_lora_trainables.bin``
(the projector). ``lmm.family: difflmm`` with this folder as ``lmm.path`` loads it like the release.

CLI::

    python -m stages.toy.difflmm sd --out results/models/toy-sd
    python -m stages.toy.difflmm lmm --sd results/models/toy-sd --out results/models/toy-difflmm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stages.config import schema_default
from stages.io.atomic import atomic_path
from stages.toy.train_lmm import TrainLmmConfig, deterministic_training, preprocess_image, train_model

log = logging.getLogger(__name__)

RESOLUTION = 128             # SD input; CLIP reads 112 px (7/8)
CLIP_PATCH = 14              # 112 / 14 = 8 x 8 tokens, as the toy LLaVA's 96 / 12
FEATURE_BLOCK = 1            # the release's up-block
TIMESTEP = 100               # the release's feature timestep
CROSS_DIM = 32               # UNet cross-attention width = implicit caption width
TRAIN_TIMESTEPS = 1000
LORA_TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class ToySdConfig:
    """The toy SD's pretraining: ``num_train_images`` train-split images of the world (``world_seed``,
    sides in ``image_size``), ``vae_steps`` then ``unet_steps`` AdamW steps of ``batch_size`` images at
    ``lr`` (constant after a short warm-up), seeded by ``seed``."""

    num_train_images: int = schema_default("train", "sd", "num_train_images")
    vae_steps: int = schema_default("train", "sd", "vae_steps")
    unet_steps: int = schema_default("train", "sd", "unet_steps")
    batch_size: int = schema_default("train", "sd", "batch_size")
    lr: float = schema_default("train", "sd", "lr")
    seed: int = schema_default("train", "sd", "seed")
    world_seed: int = schema_default("synthetic", "seed")
    image_size: tuple[int, int] = schema_default("synthetic", "image_size")
    kl_weight: float = 1e-4
    warmup_steps: int = 20


def image_processor():
    """The difflmm loader's image processor at :data:`RESOLUTION` (CLIP statistics, as the release)."""
    from transformers import CLIPImageProcessor

    from stages.models.llava_v1 import CLIP_MEAN, CLIP_STD

    return CLIPImageProcessor(size={"shortest_edge": RESOLUTION},
                              crop_size={"height": RESOLUTION, "width": RESOLUTION},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def _train_pixels(cfg: ToySdConfig):
    """(N, 3, R, R) pixel values of the train images, as the loader's processor makes them."""
    import torch

    from stages.toy.world import JPEG_QUALITY, make_example

    processor = SimpleNamespace(image_processor=image_processor())
    return torch.stack([
        preprocess_image(make_example(cfg.world_seed, "train", i, cfg.image_size).pixels, processor,
                         jpeg_quality=JPEG_QUALITY) for i in range(cfg.num_train_images)])


def _fit(module, loss_of, data, steps: int, cfg: ToySdConfig, name: str) -> None:
    """``steps`` AdamW steps of ``loss_of(batch)`` over shuffled batches of ``data`` (a tensor)."""
    import torch

    from stages.progress import ProgressLog

    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0)
    progress = ProgressLog(steps, name, logger=log)
    order: list[int] = []
    running = None
    for step in range(steps):
        indices = []
        while len(indices) < cfg.batch_size:
            if not order:
                order = torch.randperm(len(data)).tolist()
            indices.append(order.pop())
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        loss = loss_of(data[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        progress.update(loss=running)
    module.eval()


def _write_text_encoder(folder: Path) -> None:
    """SD's text_encoder/ and tokenizer/: a tiny random CLIP text model and a character vocabulary;
    used only for the empty prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{c}</w>": 2 + i for i, c in enumerate("abcdefgh")}}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=CROSS_DIM, intermediate_size=2 * CROSS_DIM, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(folder / "text_encoder")


def pretrain_toy_sd(out_dir: str | os.PathLike, cfg: ToySdConfig = ToySdConfig()) -> Path:
    """Write the toy SD folder (module doc, step 1) to ``out_dir``; deterministic, atomic."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from stages.models.difflmm import _null_caption

    with deterministic_training(cfg.seed), tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        pixels = _train_pixels(cfg)
        log.info("%d train images ready in %.1f s", len(pixels), time.perf_counter() - start)
        work = Path(work)
        _write_text_encoder(work)
        null = _null_caption(str(work), torch.float32).view(1, 1, -1)

        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION)

        def vae_loss(batch):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
            return F.mse_loss(recon, batch) + cfg.kl_weight * posterior.kl().mean() / posterior.mean[0].numel()

        vae_start = time.perf_counter()
        _fit(vae, vae_loss, pixels, cfg.vae_steps, cfg, "pretrain toy SD VAE")
        with torch.no_grad():     # the posterior of every image, once (the VAE is frozen from here)
            posteriors = [vae.encode(pixels[i:i + 64]).latent_dist for i in range(0, len(pixels), 64)]
        means = torch.cat([p.mean for p in posteriors])
        stds = torch.cat([p.std for p in posteriors])
        vae.register_to_config(scaling_factor=float(1.0 / means.std()))
        log.info("VAE: %d steps in %.1f s; latent std %.3f", cfg.vae_steps, time.perf_counter() - vae_start,
                 float(means.std()))

        scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                  steps_offset=1)
        alphas = scheduler.alphas_cumprod.float()
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32, 64, 64), norm_num_groups=8, cross_attention_dim=CROSS_DIM,
            attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae.requires_grad_(False)

        def unet_loss(indices):
            clean = (means[indices] + stds[indices] * torch.randn_like(means[indices])) * vae.config.scaling_factor
            t = torch.randint(0, TRAIN_TIMESTEPS, (len(indices),))
            noise = torch.randn_like(clean)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * clean + (1 - a).sqrt() * noise
            predicted = unet(noisy, t, encoder_hidden_states=null.expand(len(indices), -1, -1)).sample
            return F.mse_loss(predicted, noise)

        unet_start = time.perf_counter()
        _fit(unet, unet_loss, torch.arange(len(pixels)), cfg.unet_steps, cfg, "pretrain toy SD UNet")
        log.info("UNet: %d steps in %.1f s", cfg.unet_steps, time.perf_counter() - unet_start)

        out_dir = Path(out_dir)
        with atomic_path(out_dir) as tmp:
            tmp = Path(tmp)
            shutil.copytree(work / "tokenizer", tmp / "tokenizer")
            shutil.copytree(work / "text_encoder", tmp / "text_encoder")
            vae.save_pretrained(tmp / "vae")
            unet.save_pretrained(tmp / "unet")
            scheduler.save_pretrained(tmp / "scheduler")
            (tmp / "model_index.json").write_text(json.dumps({
                "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
        log.info("toy SD written to %s in %.1f s", out_dir, time.perf_counter() - start)
        return out_dir


# ---------------------------------------------------------------------------------------------
# The DiffLMM folder


def write_difflmm(folder: Path, *, sd_folder: Path, clip, language_model, tokenizer,
                  projector_state: dict[str, Any]) -> None:
    """Write the toy DiffLMM layout (module doc) into the existing empty ``folder``.

    ``clip``: CLIPVisionModel; ``language_model``: LlamaForCausalLM; ``projector_state``: the release's
    SDCLIPBlock parameters by name (``clip_projector.*``, ``clip_pe``, ``sd_norm_layer.*``,
    ``clip_norm_layer.*``, ``vt_pe``, ``linear.*``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    shutil.copytree(sd_folder, folder / "sd")
    clip.save_pretrained(folder / "clip")
    language_model.save_pretrained(folder / "language_model")
    tokenizer.save_pretrained(folder / "language_model")
    language_model.generation_config.save_pretrained(folder / "language_model")
    unet = json.loads((Path(sd_folder) / "unet" / "config.json").read_text())
    vae = json.loads((Path(sd_folder) / "vae" / "config.json").read_text())
    channels = list(reversed(unet["block_out_channels"]))
    cells = RESOLUTION // (2 ** (len(vae["block_out_channels"]) - 1)
                           * 2 ** (len(unet["up_block_types"]) - 2 - FEATURE_BLOCK))
    text = language_model.config.to_dict()
    text = {key: value for key, value in text.items()
            if key not in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")}
    config = {
        **text, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "image_aspect_ratio": "pad", "mm_hidden_size": [*channels, clip.config.hidden_size],
        "mm_patch_merge_type": "flat", "mm_projector_type": "SDCLIPBlock", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_resolution": RESOLUTION, "mm_vision_sd_clip": "clip",
        "mm_vision_sd_clip_proj_in": clip.config.hidden_size, "mm_vision_sd_clip_proj_out": unet["cross_attention_dim"],
        "mm_vision_sd_concat_clip": True, "mm_vision_sd_ensemble_size": 1,
        "mm_vision_sd_implicit_caption": True, "mm_vision_sd_pe": cells * cells,
        "mm_vision_sd_timestep": TIMESTEP, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": FEATURE_BLOCK, "mm_vision_tower": "sd", "use_mm_proj": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        adapter = get_peft_model(language_model, LoraConfig(r=1, lora_alpha=1, target_modules=LORA_TARGETS,
                                                            lora_dropout=0.0, bias="none",
                                                            task_type="CAUSAL_LM"))
        adapter.save_pretrained(folder)
        adapter.unload()          # peft wrapped the modules in place: give the caller its model back
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "language_model"
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    torch.save({f"base_model.model.model.mm_projector.{key}": value.detach().clone().contiguous()
                for key, value in projector_state.items()}, folder / "non_lora_trainables.bin")


def _causal_lm(text_config, decoder, lm_head, generation_config):
    """A LlamaForCausalLM of ``text_config`` holding the given decoder and LM head weights (the
    language model of a LLaVA-style model, as a model of its own)."""
    from transformers import LlamaForCausalLM

    language_model = LlamaForCausalLM(text_config)
    language_model.model.load_state_dict(decoder.state_dict())
    language_model.lm_head.load_state_dict(lm_head.state_dict())
    language_model.generation_config = generation_config
    return language_model


def _tower_parts(cfg: TrainLmmConfig, corpus: Sequence[str], folder: Path):
    """(CLIPVisionModel, LlamaForCausalLM, tokenizer) initialised as the toy LLaVA of ``cfg`` (its
    builder, at 112 px in 14 px patches)."""
    from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    from stages.toy.model import build_toy_llava

    side = RESOLUTION * 7 // 8
    path = build_toy_llava(folder / "toy-llava", corpus, seed=cfg.seed, image_size=side, patch_size=CLIP_PATCH,
                           vision_hidden_size=cfg.vision_hidden_size, vision_layers=cfg.vision_layers,
                           text_hidden_size=cfg.text_hidden_size, text_layers=cfg.text_layers,
                           num_attention_heads=cfg.num_attention_heads, initializer_range=cfg.initializer_range)
    llava = LlavaForConditionalGeneration.from_pretrained(path)
    clip = CLIPVisionModel(llava.config.vision_config)
    clip.load_state_dict(llava.model.vision_tower.state_dict())
    language_model = _causal_lm(llava.config.text_config, llava.model.language_model, llava.lm_head,
                                llava.generation_config)
    return clip, language_model, AutoProcessor.from_pretrained(path, trust_remote_code=False).tokenizer


def _initial_projector(clip_channels: int, sd_channels: int, cross: int, hidden: int, pe: int) -> dict[str, Any]:
    """The SDCLIPBlock's initial parameters: PyTorch's default Linear / LayerNorm initialisation,
    position embeddings zero."""
    import torch
    from torch import nn

    from stages.models.difflmm import SDCLIPProjector

    clip_projector = nn.Sequential(nn.Linear(clip_channels, cross), nn.GELU(), nn.Linear(cross, cross))
    state = {f"clip_projector.{key}": value for key, value in clip_projector.state_dict().items()}
    state["clip_pe"] = torch.zeros(pe, cross)
    state.update(SDCLIPProjector(sd_channels, clip_channels, hidden, pe).state_dict())
    return state


def load_toy_difflmm(folder: str | os.PathLike):
    """(model, processor) of a toy DiffLMM folder through the registry, float32 on the CPU; VAE and UNet
    frozen."""
    import torch

    from stages.models.registry import load_lmm

    loaded = load_lmm("difflmm", str(folder), dtype=torch.float32, attn_implementation="sdpa",
                      device=torch.device("cpu"))
    tower = loaded.model.model.vision_tower
    tower.vae.requires_grad_(False)
    tower.unet.requires_grad_(False)
    return loaded.model, loaded.processor


def build_toy_difflmm(out_dir: str | os.PathLike, corpus: Sequence[str], sd_folder: str | os.PathLike,
                      cfg: TrainLmmConfig | None = None) -> Path:
    """Write the untrained toy DiffLMM of ``cfg`` (default: train.lmm's defaults; initialised from
    ``cfg.seed``; the SD of ``sd_folder``) to ``out_dir``; atomic."""
    import torch

    cfg = cfg or TrainLmmConfig()

    sd_folder = Path(sd_folder)
    unet = json.loads((sd_folder / "unet" / "config.json").read_text())
    sd_channels = list(reversed(unet["block_out_channels"]))[FEATURE_BLOCK]
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as work:
        torch.manual_seed(cfg.seed)
        clip, language_model, tokenizer = _tower_parts(cfg, corpus, Path(work))
        cells = (RESOLUTION * 7 // 8) // CLIP_PATCH
        projector = _initial_projector(clip.config.hidden_size, sd_channels, unet["cross_attention_dim"],
                                       language_model.config.hidden_size, cells * cells)
        out_dir = Path(out_dir)
        with atomic_path(out_dir) as tmp:
            write_difflmm(Path(tmp), sd_folder=sd_folder, clip=clip, language_model=language_model,
                          tokenizer=tokenizer, projector_state=projector)
    return out_dir


def _trained_parts(model) -> tuple[Any, Any, dict[str, Any]]:
    """(CLIPVisionModel, LlamaForCausalLM, projector state) of a loaded toy DiffLMM."""
    tower = model.model.vision_tower
    language_model = _causal_lm(model.config.text_config, model.model.language_model, model.lm_head,
                                model.generation_config)
    state = {f"clip_projector.{key}": value for key, value in tower.clip_projector.state_dict().items()}
    state["clip_pe"] = tower.clip_pe.detach()
    state.update(model.model.multi_modal_projector.state_dict())
    return tower.clip, language_model, state


def train_toy_difflmm(out_dir: str | os.PathLike, sd_folder: str | os.PathLike,
                      cfg: TrainLmmConfig | None = None, *, device: str = "cpu") -> Path:
    """Train the toy DiffLMM (module doc, step 2) on the toy LLaVA's data with its loop (``cfg``,
    default: train.lmm's defaults) and write it to ``out_dir`` (self-contained difflmm layout);
    deterministic, atomic."""
    cfg = cfg or TrainLmmConfig()
    sd_folder = Path(sd_folder)

    def init(cfg: TrainLmmConfig, corpus: Sequence[str], work: str | os.PathLike):
        return load_toy_difflmm(build_toy_difflmm(Path(work) / "init", corpus, sd_folder, cfg))

    def write(model, processor, folder: Path) -> None:
        clip, language_model, projector = _trained_parts(model)
        write_difflmm(folder, sd_folder=sd_folder, clip=clip, language_model=language_model,
                      tokenizer=processor.tokenizer, projector_state=projector)

    return train_model(out_dir, cfg, device=device, init=init, write=write, name="toy difflmm")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.toy.difflmm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sd = commands.add_parser("sd", help="pretrain the toy SD (VAE, then UNet as a denoiser)")
    sd.add_argument("--out", required=True)
    for field in dataclasses.fields(ToySdConfig):
        if field.name != "image_size":
            sd.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    lmm = commands.add_parser("lmm", help="train the toy DiffLMM on captions (train.lmm's budget)")
    lmm.add_argument("--out", required=True)
    lmm.add_argument("--sd", required=True, help="the toy SD folder")
    lmm.add_argument("--steps", type=int, default=TrainLmmConfig().steps)
    lmm.add_argument("--num-train-images", type=int, default=TrainLmmConfig().num_train_images)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "sd":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToySdConfig) if f.name != "image_size"}
        pretrain_toy_sd(args.out, ToySdConfig(**values))
    else:
        train_toy_difflmm(args.out, args.sd, TrainLmmConfig(steps=args.steps,
                                                           num_train_images=args.num_train_images))


if __name__ == "__main__":
    main()
