"""The internvl2_5 family against an independent eager reference written from InternVL's published code.

The checkpoints are tiny InternVL2.5 models in the published hub layout (:mod:`internvl_hub`: InternLM2 as
InternVL2_5-8B, Qwen2 as InternVL2_5-1B). The reference below reads their files with plain torch under the
*original* key names and re-implements, from github.com/OpenGVLab/InternVL at commit
2410d1dbf208f0e799459aff9376e5747dbf41a2 (``internvl_chat/internvl/...``):

- ``train/dataset.py`` ``dynamic_preprocess`` / ``find_closest_aspect_ratio``: the tile grid (cols, rows)
  closest to the image's aspect ratio among those with min..max tiles (candidates sorted by tile count; on an
  equal distance a later candidate wins when the image area exceeds half its canvas), the image resized
  (PIL bicubic) to the canvas and cut row-major into 448 px tiles, the whole image resized to 448 px appended
  as a thumbnail when there is more than one tile; ``build_transform``: /255, ImageNet mean/std;
- ``model/internvl_chat/modeling_intern_vit.py``: class token + position embedding (bicubic-resampled patch
  part), fused qkv, softmax attention, layer scales ``ls1``/``ls2``, LayerNorm, GELU MLP, last layer
  (``select_layer`` -1) without its class token;
- ``model/internvl_chat/modeling_internvl_chat.py``: ``pixel_shuffle`` with ``ps_version`` "v2", the ``mlp1``
  projector (LayerNorm, Linear, GELU, Linear), image features spliced into the ``<IMG_CONTEXT>`` embeddings
  in order, ``chat`` / ``batch_chat`` prompts: ``<img>`` + ``<IMG_CONTEXT>`` x 256 x tiles + ``</img>`` in
  place of ``<image>``, eos = ``<|im_end|>``;
- ``model/internlm2/modeling_internlm2.py``: grouped ``wqkv`` rows (per key/value head: its query heads, its
  key, its value), rotary embedding (half rotation; dynamic NTK inactive below ``max_position_embeddings``),
  RMSNorm in float32, SiLU MLP ``w2(silu(w1 x) * w3 x)``, eager softmax attention (for Qwen2: the
  transformers Qwen2 layer the release imports: q/k/v projections with biases);
- ``conversation.py`` template ``internvl2_5`` (MPT style, its Chinese system message), tokenised as
  ``tokenization_internlm2.py`` does: ``<s>`` + sentencepiece pieces of the text between added tokens.

The map is the release's (github.com/Shengcao-Cao/groundLMM ``aas/more_models/internvl2_5.py`` at commit
928a4a70c78ddeb13d2e61da5b468cde5b4f2f15): per generated token, the newest query's attention to the
``<IMG_CONTEXT>`` keys averaged over layers and heads; the tiles' 16 x 16 grids stitched as (rows, cols, 16,
16) -> (16 rows, 16 cols) with the thumbnail dropped, or (``--use-thumbnail-attention``) the last 256 keys
alone. The pipeline (``load_lmm("internvl2_5", ...)``, its processor, ``image_layouts`` and the capture of
the generate stage) must give the same prompt ids, tokens and maps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from internvl_hub import token_ids, write_internvl_checkpoint
from PIL import Image

from stages.capture import AttentionCapture, eager_reference_rows, padded_positions
from stages.generate import build_prompt
from stages.models.registry import LMM_FAMILIES, load_lmm

QUESTION = "Describe the image in detail."
SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                  "多模态大语言模型。")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TILE, SIDE = 448, 16                       # a tile: 448 px, 16 x 16 tokens (32 x 32 patches, pixel shuffle)
MAX_NEW_TOKENS = 5
IM_END_SCALE = 2.0                         # the <|im_end|> head row scaled so that EOS_PAIR's first ends early
# Image sizes (width, height) -> tile grid (cols, rows) under (min, max) tiles.
SQUARE_SMALL, WIDE_3, WIDE_6, SQUARE_BIG = (300, 300), (672, 224), (600, 400), (1000, 1000)
EOS_PAIR = ((SQUARE_SMALL, 0), (WIDE_3, 6))    # (size, noise seed): the first ends before the second
ATOL = 1e-5


# ---------------------------------------------------------------------------------------------- reference


def closest_grid(width: int, height: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (cols, rows) tile grid of ``find_closest_aspect_ratio`` for an image of this size."""
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_distance = (1, 1), math.inf
    for cols, rows in grids:
        distance = abs(width / height - cols / rows)
        if distance < best_distance:
            best, best_distance = (cols, rows), distance
        elif distance == best_distance and width * height > 0.5 * TILE * TILE * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: Image.Image, min_tiles: int, max_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``dynamic_preprocess`` + ``build_transform``: (tiles [+ thumbnail], 3, 448, 448) float32 and (cols, rows)."""
    cols, rows = closest_grid(*image.size, min_tiles, max_tiles)
    canvas = image.resize((TILE * cols, TILE * rows), Image.BICUBIC)
    tiles = [canvas.crop((c * TILE, r * TILE, (c + 1) * TILE, (r + 1) * TILE)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((TILE, TILE), Image.BICUBIC))
    pixels = torch.stack([torch.from_numpy(np.asarray(t.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                          for t in tiles])
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None], (cols, rows)


def stitch(row: torch.Tensor, grid: tuple[int, int], thumbnail: bool) -> torch.Tensor:
    """The release's map of one step from the attention to the image tokens (256 per tile, thumbnail last)."""
    cols, rows = grid
    if thumbnail:
        return row[-SIDE * SIDE:].reshape(SIDE, SIDE)
    if cols * rows > 1:
        row = row[:-SIDE * SIDE]
    return row.reshape(rows, cols, SIDE, SIDE).permute(0, 2, 1, 3).reshape(rows * SIDE, cols * SIDE)


def pixel_shuffle_v2(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """``InternVLChatModel.pixel_shuffle`` with ps_version "v2": (n, w, h, c) -> (n, w*s, h*s, c/s^2)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclasses.dataclass
class Run:
    """One reference generation: prompt ids, generated ids (up to and including <|im_end|>), and per step
    the attention row over the <IMG_CONTEXT> keys (mean over layers and heads)."""

    prompt_ids: list[int]
    tokens: list[int]
    rows: torch.Tensor                # (steps, 256 * tiles)
    grid: tuple[int, int]             # (cols, rows) of tiles

    def maps(self, thumbnail: bool = False) -> torch.Tensor:
        return torch.stack([stitch(row, self.grid, thumbnail) for row in self.rows])


class Reference:
    """InternVL2.5 chat in plain torch on the published files of ``folder`` (float32)."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        self.config = json.loads((folder / "config.json").read_text())
        self.w = {}
        for file in sorted(folder.glob("*.safetensors")):
            self.w.update({k: v.float() for k, v in load_file(file).items()})
        self.text = self.config["llm_config"]
        self.internlm2 = self.text["architectures"][0] == "InternLM2ForCausalLM"
        self.ids = token_ids("internlm2" if self.internlm2 else "qwen2")
        if self.internlm2:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            self.encode_text, self.bos = (lambda text: sp.encode(text)), [1]
        else:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            self.encode_text, self.bos = _qwen_encoder(vocab, (folder / "merges.txt").read_text(encoding="utf-8")), []

    def prompt_ids(self, tiles: int, question: str = QUESTION) -> list[int]:
        prompt = (f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n<image>\n{question}"
                  "<|im_end|>\n<|im_start|>assistant\n")
        prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * SIDE * SIDE * tiles + "</img>", 1)
        specials = [t for t in self.ids if t.startswith("<") and t not in ("<s>", "</s>", "<unk>")]
        ids = list(self.bos)
        for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", prompt):
            if piece in self.ids:
                ids.append(self.ids[piece])
            elif piece:
                ids.extend(self.encode_text(piece))
        return ids

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """InternViT + pixel shuffle + mlp1: (tiles, 3, 448, 448) -> (tiles, 256, hidden)."""
        w, vc = self.w, self.config["vision_config"]
        assert not vc["qk_normalization"] and vc["norm_type"] == "layer_norm"
        e = "vision_model.embeddings."
        x = F.conv2d(pixels, w[e + "patch_embedding.weight"], w[e + "patch_embedding.bias"], stride=vc["patch_size"])
        n, c, h, wd = x.shape
        x = torch.cat([w[e + "class_embedding"].expand(n, 1, c), x.flatten(2).transpose(1, 2)], dim=1)
        side = vc["image_size"] // vc["patch_size"]
        position = w[e + "position_embedding"]
        patches = F.interpolate(position[:, 1:].reshape(1, side, side, c).permute(0, 3, 1, 2), size=(h, wd),
                                mode="bicubic", align_corners=False).reshape(1, c, h * wd).permute(0, 2, 1)
        x = x + torch.cat([position[:, :1], patches], dim=1)
        heads, eps = vc["num_attention_heads"], vc["layer_norm_eps"]
        d = c // heads
        for k in range(vc["num_hidden_layers"]):
            p = f"vision_model.encoder.layers.{k}."
            y = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps)
            q, key, v = F.linear(y, w[p + "attn.qkv.weight"], w.get(p + "attn.qkv.bias")).reshape(
                n, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
            y = ((q * d ** -0.5) @ key.transpose(-2, -1)).softmax(-1) @ v
            y = F.linear(y.transpose(1, 2).reshape(n, -1, c), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
            x = x + y * w[p + "ls1"]
            y = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                         w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
            x = x + y * w[p + "ls2"]
        x = x[:, 1:]
        grid = int(x.shape[1] ** 0.5)
        x = pixel_shuffle_v2(x.reshape(n, grid, grid, c), self.config["downsample_ratio"]).reshape(n, -1, 4 * c)
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``mlp1``: LayerNorm (eps 1e-5), Linear, GELU, Linear."""
        w = self.w
        x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
        return F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"])

    def _qkv(self, k: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, hidden) -> query (heads, L, d), key and value (kv_heads, L, d) of layer k."""
        t, w = self.text, self.w
        heads, kv, length = t["num_attention_heads"], t["num_key_value_heads"], y.shape[0]
        d = t["hidden_size"] // heads
        p = f"language_model.model.layers.{k}."
        if self.internlm2:
            qkv = F.linear(y, w[p + "attention.wqkv.weight"]).reshape(length, kv, heads // kv + 2, d)
            q, key, v = qkv[:, :, :-2].reshape(length, heads, d), qkv[:, :, -2], qkv[:, :, -1]
        else:
            q = F.linear(y, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"]).reshape(length, heads, d)
            key = F.linear(y, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"]).reshape(length, kv, d)
            v = F.linear(y, w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"]).reshape(length, kv, d)
        return q.transpose(0, 1), key.transpose(0, 1), v.transpose(0, 1)

    def language_step(self, x: torch.Tensor, start: int, cache: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions start..start+L-1 of one sequence given the keys/values before them (``cache``, extended).
        Returns the last position's logits and its attention row (mean over layers and heads, all keys)."""
        t, w = self.text, self.w
        heads, kv, eps = t["num_attention_heads"], t["num_key_value_heads"], t["rms_norm_eps"]
        d = t["hidden_size"] // heads
        length = x.shape[0]
        inv_freq = 1.0 / (t["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
        angles = torch.einsum("i,j->ij", torch.arange(start, start + length).float(), inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        mask = torch.full((length, start + length), -math.inf).triu(start + 1)
        norms = ("attention_norm", "ffn_norm") if self.internlm2 else ("input_layernorm", "post_attention_layernorm")
        rows = []
        for k in range(t["num_hidden_layers"]):
            p = f"language_model.model.layers.{k}."
            q, key, v = self._qkv(k, rms_norm(x, w[p + norms[0] + ".weight"], eps))
            q, key = q * cos + rotate_half(q) * sin, key * cos + rotate_half(key) * sin
            if len(cache) > k:
                key, v = torch.cat([cache[k][0], key], 1), torch.cat([cache[k][1], v], 1)
                cache[k] = (key, v)
            else:
                cache.append((key, v))
            key, v = key.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
            probs = torch.softmax(q @ key.transpose(1, 2) / math.sqrt(d) + mask, dim=-1, dtype=torch.float32)
            rows.append(probs[:, -1])
            out = (probs @ v).transpose(0, 1).reshape(length, heads * d)
            x = x + F.linear(out, w[p + ("attention.wo.weight" if self.internlm2 else "self_attn.o_proj.weight")])
            y = rms_norm(x, w[p + norms[1] + ".weight"], eps)
            if self.internlm2:
                y = F.linear(F.silu(F.linear(y, w[p + "feed_forward.w1.weight"])) * F.linear(y, w[p + "feed_forward.w3.weight"]),
                             w[p + "feed_forward.w2.weight"])
            else:
                y = F.linear(F.silu(F.linear(y, w[p + "mlp.gate_proj.weight"])) * F.linear(y, w[p + "mlp.up_proj.weight"]),
                             w[p + "mlp.down_proj.weight"])
            x = x + y
        x = rms_norm(x[-1], w["language_model.model.norm.weight"], eps)
        head = "language_model.output.weight" if self.internlm2 else "language_model.lm_head.weight"
        return F.linear(x, w[head]), torch.stack(rows).mean(dim=(0, 1))

    @torch.no_grad()
    def generate(self, image: Image.Image, min_tiles: int, max_tiles: int,
                 max_new_tokens: int = MAX_NEW_TOKENS, features: torch.Tensor | None = None) -> Run:
        """Greedy ``chat``: tokens until <|im_end|> (included) or ``max_new_tokens``. ``features``: image
        features to splice instead of the vision tower's (tiles, 256, hidden)."""
        pixels, grid = tile_image(image, min_tiles, max_tiles)
        prompt = self.prompt_ids(len(pixels))
        ids = torch.tensor(prompt)
        embed = "language_model.model.tok_embeddings.weight" if self.internlm2 else "language_model.model.embed_tokens.weight"
        x = self.w[embed][ids].clone()
        image_keys = ids == self.ids["<IMG_CONTEXT>"]
        x[image_keys] = (self.vision(pixels) if features is None else features).reshape(-1, x.shape[-1])
        cache: list = []
        tokens, rows, start = [], [], 0
        for _ in range(max_new_tokens):
            logits, row = self.language_step(x, start, cache)
            rows.append(row[:len(prompt)][image_keys])
            tokens.append(int(logits.argmax()))
            if tokens[-1] == self.ids["<|im_end|>"]:
                break
            start += x.shape[0]
            x = self.w[embed][tokens[-1:]]
        return Run(prompt, tokens, torch.stack(rows), grid)


def _qwen_encoder(vocab: dict, merges: str):
    """Qwen2's byte-level BPE (NFC, its split regex) on the published vocab.json/merges.txt, built with the
    ``tokenizers`` library independently of the loader."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pairs = [tuple(line.split(" ")) for line in merges.splitlines()[1:] if line]
    tokenizer = Tokenizer(models.BPE(vocab, pairs, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random RGB image of (width, height) ``size``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def internlm2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("internvl2_5_8b")
    write_internvl_checkpoint(folder, llm="internlm2", seed=0, im_end_scale=IM_END_SCALE)
    return folder


@pytest.fixture(scope="session")
def qwen2_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("internvl2_5_1b")
    write_internvl_checkpoint(folder, llm="qwen2", seed=1)
    return folder


@pytest.fixture(scope="module")
def reference(internlm2_folder) -> Reference:
    return Reference(internlm2_folder)


@pytest.fixture(scope="module")
def reference_run(reference):
    """Reference runs of noise images, each computed once: (size, seed, min_tiles, max_tiles) -> Run."""
    return functools.cache(lambda size, seed, min_tiles, max_tiles:
                           reference.generate(noise_image(size, seed), min_tiles, max_tiles))


@pytest.fixture(scope="module")
def loaders(internlm2_folder):
    """load_lmm for the InternLM2 checkpoint, one load per (implementation, grid, min, max), kept."""
    if "internvl2_5" not in LMM_FAMILIES:
        pytest.skip("the internvl2_5 family is not registered yet")
    loaded = {}

    def load(implementation: str = "sdpa", grid: str = "tiles", min_tiles: int = 1, max_tiles: int = 12):
        key = (implementation, grid, min_tiles, max_tiles)
        if key not in loaded:
            loaded[key] = load_lmm("internvl2_5", str(internlm2_folder), dtype=torch.float32,
                                   attn_implementation=implementation, device="cpu", grid=grid,
                                   min_tiles=min_tiles, max_tiles=max_tiles)
            loaded[key].processor.tokenizer.padding_side = "left"
        return loaded[key]

    return load


def pipeline_inputs(lmm, images: list[Image.Image]):
    prompt = build_prompt(lmm.processor, QUESTION, None)
    return lmm.processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")


def captured_generation(lmm, inputs, max_new_tokens: int = MAX_NEW_TOKENS):
    """Greedy generation with the generate stage's capture: (sequences, per item (steps, R, C) maps)."""
    layouts = lmm.image_layouts(inputs)
    capture = AttentionCapture(lmm.model, layers="all", heads="all")
    with torch.no_grad(), capture.recording([layout.positions for layout in layouts]):
        sequences = lmm.model.generate(**lmm.model_inputs(inputs), do_sample=False, max_new_tokens=max_new_tokens)
    rows = capture.item_rows()
    return sequences, [rows[b].reshape(rows[b].shape[0], *layout.grid) for b, layout in enumerate(layouts)]


def unpadded(inputs, b: int) -> list[int]:
    return inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()


def assert_matches(lmm, inputs, sequences, maps, runs: list[Run], thumbnail: bool = False) -> None:
    """Prompt ids, generated tokens (then padding) and maps of each item equal the reference runs."""
    prompt_length = inputs["input_ids"].shape[1]
    for b, run in enumerate(runs):
        assert unpadded(inputs, b) == run.prompt_ids
        generated = sequences[b, prompt_length:].tolist()
        assert generated[:len(run.tokens)] == run.tokens
        assert all(t == lmm.processor.tokenizer.pad_token_id for t in generated[len(run.tokens):])
        expected = run.maps(thumbnail)
        assert maps[b].shape[1:] == expected.shape[1:]
        torch.testing.assert_close(maps[b][:len(run.tokens)], expected, atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- reference alone


@pytest.mark.parametrize(("size", "limits", "grid"), [
    (SQUARE_SMALL, (1, 12), (1, 1)), (WIDE_3, (1, 12), (3, 1)), (WIDE_6, (1, 12), (3, 2)),
    (SQUARE_BIG, (1, 12), (3, 3)),                  # ties (1,1)/(2,2)/(3,3): the larger wins on a large image
    (SQUARE_SMALL, (3, 9), (2, 2)), (WIDE_3, (3, 9), (3, 1)), (WIDE_6, (3, 9), (3, 2)), (SQUARE_BIG, (3, 9), (3, 3)),
    ((1000, 400), (1, 12), (5, 2)), ((1000, 400), (3, 9), (3, 1)), ((224, 672), (1, 12), (1, 3))])
def test_reference_tiling(size, limits, grid):
    pixels, got = tile_image(noise_image(size, 0), *limits)
    assert got == grid
    assert pixels.shape == (grid[0] * grid[1] + (grid != (1, 1)), 3, TILE, TILE)


def test_stitching_puts_tile_blocks_row_major():
    """Token k of tile t (tiles row-major over (rows, cols)) lands in block (t // cols, t % cols), cell
    (k // 16, k % 16) of the block; the thumbnail is dropped, or alone with thumbnail=True."""
    cols, rows = 3, 2
    tiles = cols * rows + 1
    code = torch.arange(tiles)[:, None] * 1000 + torch.arange(SIDE * SIDE)[None, :]
    stitched = stitch(code.reshape(-1).float(), (cols, rows), thumbnail=False)
    r, c = torch.meshgrid(torch.arange(rows * SIDE), torch.arange(cols * SIDE), indexing="ij")
    assert torch.equal(stitched, ((r // SIDE * cols + c // SIDE) * 1000 + r % SIDE * SIDE + c % SIDE).float())
    assert torch.equal(stitch(code.reshape(-1).float(), (cols, rows), thumbnail=True),
                       (cols * rows * 1000 + torch.arange(SIDE * SIDE)).reshape(SIDE, SIDE).float())


def corner_image(size: tuple[int, int]) -> Image.Image:
    """A black image with a white square in its bottom-right corner, a tenth of the width on a side."""
    image = Image.new("RGB", size, (0, 0, 0))
    side = size[0] // 10
    image.paste((255, 255, 255), (size[0] - side, size[1] - side, size[0], size[1]))
    return image


def token_brightness(pixels: torch.Tensor) -> torch.Tensor:
    """Mean normalised value of each token's 28 x 28 pixel block: (tiles, 256), token k = block (k // 16, k % 16)."""
    return F.avg_pool2d(pixels.mean(1, keepdim=True), TILE // SIDE).reshape(len(pixels), SIDE * SIDE)


def assert_bright_corner(stitched: torch.Tensor) -> None:
    """The white square of :func:`corner_image` on 600 x 400 (3 x 2 tiles, a 32 x 48 map) covers the map's
    cells from (27.2, 43.2) to the corner: bright there, dark elsewhere."""
    assert stitched.shape == (32, 48)
    bright = stitched > (stitched.max() + stitched.min()) / 2
    assert bright[28:, 44:].all() and bright.sum() <= 5 * 5


def test_reference_pixel_to_map_cell():
    """Through the reference's tiling, the pixel-shuffle token order and the release's stitching, a bright
    corner of the image is the same corner of the map."""
    pixels, grid = tile_image(corner_image(WIDE_6), 1, 12)
    assert grid == (3, 2)
    # pixel shuffle v2 of a per-patch code keeps 2 x 2 patch blocks in token order (k // 16, k % 16).
    patch_code = torch.arange(32 * 32, dtype=torch.float32).reshape(1, 32, 32, 1).expand(1, 32, 32, 1)
    shuffled = pixel_shuffle_v2(patch_code).reshape(SIDE * SIDE, 4)
    k = torch.arange(SIDE * SIDE)
    assert torch.equal(shuffled[:, 0], (k // SIDE * 2 * 32 + k % SIDE * 2).float())
    assert_bright_corner(stitch(token_brightness(pixels).reshape(-1), grid, thumbnail=False))


def test_reference_generation_is_not_degenerate_and_ends_early(reference, reference_run):
    """The fabricated weights give image-dependent tokens, attention rows that are probabilities, and (with
    IM_END_SCALE) an <|im_end|> within MAX_NEW_TOKENS for the first image of EOS_PAIR only."""
    first, second = (reference_run(size, seed, 1, 12) for size, seed in EOS_PAIR)
    assert first.tokens[-1] == reference.ids["<|im_end|>"] and len(first.tokens) < MAX_NEW_TOKENS
    assert len(second.tokens) == MAX_NEW_TOKENS and reference.ids["<|im_end|>"] not in second.tokens
    assert first.tokens[:2] != second.tokens[:2]                      # different images, different tokens
    assert first.rows.sum(1).min() > 0 and (first.rows.sum(1) <= 1 + 1e-5).all()


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("limits", [(1, 12), (3, 9)], ids=["model-1-12", "release-3-9"])
def test_processor_tiles_as_dynamic_preprocess(loaders, reference, limits):
    """Pixel values, prompt ids and grids of the processor for 1 (or 4), 3, 6 and 9 tiles, in one batch."""
    lmm = loaders("sdpa", "tiles", *limits)
    sizes = [SQUARE_SMALL, WIDE_3, WIDE_6, SQUARE_BIG, (224, 672)]
    images = [noise_image(size, k) for k, size in enumerate(sizes)]
    inputs = pipeline_inputs(lmm, images)
    expected = [tile_image(image, *limits) for image in images]
    torch.testing.assert_close(inputs["pixel_values"], torch.cat([p for p, _ in expected]), atol=ATOL, rtol=0)
    layouts = lmm.image_layouts(inputs)
    image_token = reference.ids["<IMG_CONTEXT>"]
    assert lmm.image_token_id == image_token
    for b, ((pixels, (cols, rows)), layout) in enumerate(zip(expected, layouts)):
        assert unpadded(inputs, b) == reference.prompt_ids(len(pixels))
        assert layout.grid == (rows * SIDE, cols * SIDE)
        assert (inputs["input_ids"][b, layout.positions] == image_token).all()


@pytest.fixture(scope="module")
def planted_forward(loaders):
    """One forward of a batch with the projector's output replaced by codes of (tile, token row, token column);
    returns a function (lmm, images) -> (inputs, inputs_embeds of the language model)."""

    def run(lmm, images):
        inputs = pipeline_inputs(lmm, images)
        seen = {}
        model = lmm.model.model

        def plant(module, args, output):
            tiles = output.shape[0]
            code = torch.zeros_like(output)
            k = torch.arange(SIDE * SIDE)
            code[..., 0] = torch.arange(tiles, dtype=output.dtype)[:, None]
            code[..., 1], code[..., 2] = (k // SIDE).to(output.dtype), (k % SIDE).to(output.dtype)
            code[..., 3] = token_brightness(seen["pixels"]).to(output.dtype)
            return code

        hooks = [model.vision_tower.register_forward_pre_hook(
                     lambda module, args, kwargs: seen.update(pixels=(args[0] if args else kwargs["pixel_values"])),
                     with_kwargs=True),
                 model.multi_modal_projector.register_forward_hook(plant),
                 model.language_model.register_forward_pre_hook(
                     lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)]
        try:
            with torch.no_grad():
                lmm.model(**lmm.model_inputs(inputs))
        finally:
            for hook in hooks:
                hook.remove()
        return inputs, seen["embeds"]

    return run


@pytest.mark.parametrize("grid", ["tiles", "thumbnail"])
def test_layout_cells_carry_their_tile_tokens(loaders, planted_forward, grid):
    """Planted features: layout cell (r, c) holds token (r % 16, c % 16) of tile (r // 16) * cols + c // 16
    (tiles grid), or token (r, c) of the thumbnail (the only tile of a 1-tile image)."""
    lmm = loaders("sdpa", grid, 1, 12)
    images = [noise_image(WIDE_6, 0), noise_image(SQUARE_SMALL, 1)]
    inputs, embeds = planted_forward(lmm, images)
    first_tile = 0
    for b, (image, layout) in enumerate(zip(images, lmm.image_layouts(inputs))):
        pixels, (cols, rows) = tile_image(image, 1, 12)
        cell = embeds[b, layout.positions].reshape(*layout.grid, -1)[..., :3] - torch.tensor([first_tile, 0, 0])
        r, c = torch.meshgrid(torch.arange(layout.grid[0]), torch.arange(layout.grid[1]), indexing="ij")
        if grid == "tiles":
            assert layout.grid == (rows * SIDE, cols * SIDE)
            expected = torch.stack([r // SIDE * cols + c // SIDE, r % SIDE, c % SIDE], -1)
        else:
            assert layout.grid == (SIDE, SIDE)
            expected = torch.stack([torch.full_like(r, len(pixels) - 1), r, c], -1)
        assert torch.equal(cell, expected.float())
        first_tile += len(pixels)


def test_bright_corner_lands_in_the_maps_corner(loaders, planted_forward):
    lmm = loaders("sdpa", "tiles", 1, 12)
    inputs, embeds = planted_forward(lmm, [corner_image(WIDE_6)])
    layout = lmm.image_layouts(inputs)[0]
    assert_bright_corner(embeds[0, layout.positions, 3].reshape(layout.grid))


@pytest.mark.parametrize(("implementation", "grid", "limits", "size"), [
    ("sdpa", "tiles", (1, 12), WIDE_6), ("eager", "tiles", (1, 12), WIDE_6),
    ("sdpa", "thumbnail", (3, 9), WIDE_3)])
def test_batch1_matches_reference(loaders, reference_run, implementation, grid, limits, size):
    """One image: prompt ids, greedy tokens and maps equal the reference's (eager: the release's way, from
    ``output_attentions``; sdpa: the generate stage's capture)."""
    lmm = loaders(implementation, grid, *limits)
    image = noise_image(size, 5)
    inputs = pipeline_inputs(lmm, [image])
    run = reference_run(size, 5, *limits)
    if implementation == "eager":
        layouts = lmm.image_layouts(inputs)
        with torch.no_grad():
            out = lmm.model.generate(**lmm.model_inputs(inputs), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                     output_attentions=True, return_dict_in_generate=True)
        rows = eager_reference_rows(out.attentions, padded_positions([layouts[0].positions])[0])
        sequences, maps = out.sequences, [rows[0].reshape(rows.shape[1], *layouts[0].grid)]
    else:
        sequences, maps = captured_generation(lmm, inputs)
    assert_matches(lmm, inputs, sequences, maps, [run], thumbnail=grid == "thumbnail")


def test_left_padded_batch_with_eos_matches_reference(loaders, reference_run):
    """Two images of 1 and 3 (+ thumbnail) tiles, left-padded: the first ends with <|im_end|> before the
    second; each item's tokens and maps equal the reference's run of that image alone."""
    lmm = loaders("sdpa", "tiles", 1, 12)
    images = [noise_image(size, seed) for size, seed in EOS_PAIR]
    inputs = pipeline_inputs(lmm, images)
    assert inputs["attention_mask"][0, 0] == 0                        # the shorter prompt is left-padded
    runs = [reference_run(size, seed, 1, 12) for size, seed in EOS_PAIR]
    assert len(runs[0].tokens) < len(runs[1].tokens) == MAX_NEW_TOKENS
    sequences, maps = captured_generation(lmm, inputs)
    assert_matches(lmm, inputs, sequences, maps, runs)


def test_qwen2_variant_matches_reference(qwen2_folder):
    if "internvl2_5" not in LMM_FAMILIES:
        pytest.skip("the internvl2_5 family is not registered yet")
    reference = Reference(qwen2_folder)
    lmm = load_lmm("internvl2_5", str(qwen2_folder), dtype=torch.float32, attn_implementation="sdpa",
                   device="cpu", grid="tiles", min_tiles=1, max_tiles=12)
    lmm.processor.tokenizer.padding_side = "left"
    image = noise_image(WIDE_3, 4)
    inputs = pipeline_inputs(lmm, [image])
    assert lmm.image_token_id == token_ids("qwen2")["<IMG_CONTEXT>"] == 151667
    sequences, maps = captured_generation(lmm, inputs)
    assert_matches(lmm, inputs, sequences, maps, [reference.generate(image, 1, 12)])


def test_left_padded_batch_of_9_and_4_tiles_matches_reference(loaders, reference_run):
    """The release's 3..9 tiles: a large square image (3 x 3 tiles, the tie rule's larger grid) and a small
    one (2 x 2), each with its thumbnail, left-padded in one batch."""
    lmm = loaders("sdpa", "tiles", 3, 9)
    pair = [(SQUARE_SMALL, 8), (SQUARE_BIG, 7)]
    inputs = pipeline_inputs(lmm, [noise_image(size, seed) for size, seed in pair])
    runs = [reference_run(size, seed, 3, 9) for size, seed in pair]
    assert [run.grid for run in runs] == [(2, 2), (3, 3)]
    sequences, maps = captured_generation(lmm, inputs)
    assert_matches(lmm, inputs, sequences, maps, runs)
