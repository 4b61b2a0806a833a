"""The cambrian family on a tiny Cambrian-1 in the published layout (:mod:`cambrian_hub`: the checkpoint and
its four towers under their own hub ids in a fake Hugging Face cache), loaded once through the registry.

The reference is written here from the release's definitions (cambrian-mllm/cambrian @ 539ffc3: encoder
classes, ``process_images``, ``tokenizer_image_token``, ``prepare_inputs_labels_for_multimodal``, the SVA of
``vision_sampler.py``, the SVA layers of ``cambrian_llama.py``), in plain torch on the *published* tensor
names (timm trunk keys for SigLIP / ConvNeXt, the checkpoint's keys for the connector and Llama; CLIP and
DINOv2 are published as transformers models and run as such), one item at a time without padding and without
a KV cache, with eager attention: its greedy tokens and its rows (mean over layers and heads of the newest
query's attention at each grid cell's token) must equal what the pipeline's model and capture give, at batch
1 and in a left-padded batch of 2, on images of several aspect ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cambrian_hub import (
    CLIP_MEAN,
    CONVNEXT_DEPTHS,
    GRID,
    IMAGENET_MEAN,
    IMAGENET_STD,
    REPO_ID,
    fabricate_cambrian_hub,
    published_config,
)
from fake_hub import use_offline_cache
from PIL import Image

from stages.capture import AttentionCapture
from stages.generate import build_prompt
from stages.models.registry import LMM_FAMILIES, load_lmm

QUESTION = "Describe the image in detail."
STEPS = 4
BATCH2 = [(90, 60), (72, 72)]            # a tall and a square image: the square one is left-padded


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cambrian-hub")
    tensors = fabricate_cambrian_hub(cache)
    with pytest.MonkeyPatch.context() as patch:
        use_offline_cache(patch, cache)
        lmm = load_lmm("cambrian", REPO_ID, dtype=torch.float32, attn_implementation="sdpa", device="cpu")
        lmm.processor.tokenizer.padding_side = "left"
        yield {"lmm": lmm, "tensors": tensors, "reference": Reference(tensors)}


def noise_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------------------
# The reference (release definitions, published names)
# --------------------------------------------------------------------------------------------------------

def release_pixels(image: Image.Image, size: int, pad_mean, mean, std) -> torch.Tensor:
    """process_images for one tower: expand2square(int(x * 255) of the processor's image_mean), PIL resize
    to size x size (bicubic), ToTensor, Normalize -> (1, 3, size, size)."""
    width, height = image.size
    colour = tuple(int(x * 255) for x in pad_mean)
    if width > height:
        square = Image.new(image.mode, (width, width), colour)
        square.paste(image, (0, (width - height) // 2))
    elif height > width:
        square = Image.new(image.mode, (height, height), colour)
        square.paste(image, ((height - width) // 2, 0))
    else:
        square = image
    x = torch.from_numpy(np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1)[None]


def interp(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The towers' ``interpolate``: (1, T, C) -> (1, count, C) bilinear unless T == count."""
    if tokens.shape[1] == count:
        return tokens
    side, target = int(tokens.shape[1] ** 0.5), int(count ** 0.5)
    maps = tokens.view(1, side, side, -1).permute(0, 3, 1, 2).float()
    return F.interpolate(maps, size=(target, target), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)


def timm_vit(trunk, x: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """timm VisionTransformer.forward_features (no class token, exact GELU, LayerNorm eps 1e-6)."""
    x = F.conv2d(x, trunk["patch_embed.proj.weight"], trunk["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2) + trunk["pos_embed"]
    blocks = 1 + max(int(k.split(".")[1]) for k in trunk if k.startswith("blocks."))
    for b in range(blocks):
        p = f"blocks.{b}."
        width = x.shape[-1]
        h = F.layer_norm(x, (width,), trunk[p + "norm1.weight"], trunk[p + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, trunk[p + "attn.qkv.weight"], trunk[p + "attn.qkv.bias"]).view(
            1, -1, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-1, -2)) * (width // heads) ** -0.5).softmax(-1) @ v
        x = x + F.linear(attention.transpose(1, 2).reshape(1, -1, width), trunk[p + "attn.proj.weight"],
                         trunk[p + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), trunk[p + "norm2.weight"], trunk[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, trunk[p + "mlp.fc1.weight"], trunk[p + "mlp.fc1.bias"])),
                         trunk[p + "mlp.fc2.weight"], trunk[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (x.shape[-1],), trunk["norm.weight"], trunk["norm.bias"], 1e-6)


def timm_convnext_stages(trunk, x: torch.Tensor, eps: float = 1e-5) -> list[torch.Tensor]:
    """timm ConvNeXt stem + stages (convnext_xxlarge: LayerNorm eps 1e-5); each stage's NCHW output."""
    def ln2d(x, prefix):
        return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), trunk[prefix + "weight"], trunk[prefix + "bias"],
                            eps).permute(0, 3, 1, 2)

    x = ln2d(F.conv2d(x, trunk["stem.0.weight"], trunk["stem.0.bias"], stride=4), "stem.1.")
    outputs = []
    for s, depth in enumerate(CONVNEXT_DEPTHS):
        if s:
            x = F.conv2d(ln2d(x, f"stages.{s}.downsample.0."), trunk[f"stages.{s}.downsample.1.weight"],
                         trunk[f"stages.{s}.downsample.1.bias"], stride=2)
        for b in range(depth):
            p = f"stages.{s}.blocks.{b}."
            h = F.conv2d(x, trunk[p + "conv_dw.weight"], trunk[p + "conv_dw.bias"], padding=3, groups=x.shape[1])
            h = F.layer_norm(h.permute(0, 2, 3, 1), (x.shape[1],), trunk[p + "norm.weight"], trunk[p + "norm.bias"], eps)
            h = F.linear(F.gelu(F.linear(h, trunk[p + "mlp.fc1.weight"], trunk[p + "mlp.fc1.bias"])),
                         trunk[p + "mlp.fc2.weight"], trunk[p + "mlp.fc2.bias"]) * trunk[p + "gamma"]
            x = x + h.permute(0, 3, 1, 2)
        outputs.append(x)
    return outputs


def unpad_span(width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """cambrian_arch.unpad_image's cut on a side x side grid: (row0, row1, col0, col1)."""
    if width / height > side / side:
        padding = (side - int(height * (side / width))) // 2
        return padding, side - padding, 0, side
    padding = (side - int(width * (side / height))) // 2
    return 0, side, padding, side - padding


class Reference:
    """The release's forward for one image and prompt, on the published tensors."""

    def __init__(self, tensors):
        from transformers import CLIPVisionModel, Dinov2Model

        self.w = tensors["checkpoint"]
        self.siglip, self.convnext = tensors["siglip"], tensors["convnext"]
        folders = tensors["folders"]
        self.clip = CLIPVisionModel.from_pretrained(folders["clip"], attn_implementation="eager").eval()
        self.dino = Dinov2Model.from_pretrained(folders["dinov2"], attn_implementation="eager").eval()
        self.config = published_config()

    def linear(self, x, prefix, bias=True):
        return F.linear(x, self.w[prefix + "weight"], self.w.get(prefix + "bias") if bias else None)

    def layer_norm(self, x, prefix, eps=1e-5):
        return F.layer_norm(x, (x.shape[-1],), self.w[prefix + "weight"], self.w[prefix + "bias"], eps)

    def tower_tokens(self, image: Image.Image) -> list[torch.Tensor]:
        """Per tower (1, token_len, C), after mm_projector_aux_{i}."""
        lens = self.config["mm_vision_tower_aux_token_len_list"]
        raw = [interp(timm_vit(self.siglip, release_pixels(image, 384, CLIP_MEAN, [0.5] * 3, [0.5] * 3)), lens[0]),
               interp(self.clip(release_pixels(image, 336, CLIP_MEAN, CLIP_MEAN,
                                               [0.26862954, 0.26130258, 0.27577711]),
                                output_hidden_states=True).hidden_states[-2][:, 1:], lens[1]),
               interp(self.dino(release_pixels(image, 378, IMAGENET_MEAN, IMAGENET_MEAN, IMAGENET_STD))
                      .last_hidden_state[:, 1:], lens[2])]
        side = int(lens[3] ** 0.5)
        stages = timm_convnext_stages(self.convnext, release_pixels(image, 1024, CLIP_MEAN, CLIP_MEAN,
                                                                    [0.26862954, 0.26130258, 0.27577711]))
        raw.append(torch.cat([F.interpolate(s, size=(side, side), mode="bilinear", align_corners=False)
                              .flatten(2).transpose(1, 2) for s in stages], -1))
        out = []
        for i, tokens in enumerate(raw):
            p = f"model.mm_projector_aux_{i}."
            out.append(self.layer_norm(self.linear(F.gelu(self.linear(tokens, p + "0.")), p + "2."), p + "3."))
        return out

    def cells(self, tokens: torch.Tensor, width: int, height: int, unpad: bool):
        """rearrange_vision_tower_features_inference for one tower: (cells, r * r, C) and masks."""
        side = int(tokens.shape[1] ** 0.5)
        r = side // GRID
        mask = torch.ones(side, side, dtype=torch.bool)
        if width / height > 1:
            padding = (side - int(height * (side / width))) // 2
            if padding > 0:
                mask[:padding], mask[-padding:] = False, False
        else:
            padding = (side - int(width * (side / height))) // 2
            if padding > 0:
                mask[:, :padding], mask[:, -padding:] = False, False
        feats = tokens[0].view(GRID, r, GRID, r, -1).permute(0, 2, 1, 3, 4)
        masks = mask.view(GRID, r, GRID, r).permute(0, 2, 1, 3)
        if unpad:
            row0, row1, col0, col1 = unpad_span(width, height, GRID)
            feats, masks = feats[row0:row1, col0:col1], masks[row0:row1, col0:col1]
        feats, masks = feats.reshape(-1, r * r, feats.shape[-1]), masks.reshape(-1, r * r).clone()
        masks[masks.sum(-1) == 0] = True
        return feats, masks

    def sva_layer(self, p, queries, context, kvs, masks):
        x = self.linear(torch.cat([queries, self.linear(context, p + "proj_context.", False)], -1), p + "proj_in.", False)
        heads, dim = 16, x.shape[-1]
        q = self.linear(self.layer_norm(x, p + "cross_attn.q_proj.0."), p + "cross_attn.q_proj.1.", False)
        keys, values = [], []
        for i, kv in enumerate(kvs):
            if p + f"pos_embed_{i}" in self.w and kv.shape[1] > 1:
                kv = kv + self.w[p + f"pos_embed_{i}"][None]
            for name, store in (("k", keys), ("v", values)):
                store.append(self.linear(self.layer_norm(kv, p + f"cross_attn.{name}_proj_{i}.0."),
                                         p + f"cross_attn.{name}_proj_{i}.1.", False))
        n = q.shape[0]
        split = lambda t: t.view(n, -1, heads, dim // heads).transpose(1, 2)
        scores = split(q) @ split(torch.cat(keys, 1)).transpose(-1, -2) / math.sqrt(dim // heads)
        scores = scores.masked_fill(~torch.cat(masks, 1)[:, None, None, :], float("-inf"))
        attended = (scores.softmax(-1) @ split(torch.cat(values, 1))).transpose(1, 2).reshape(n, -1, dim)
        x = self.layer_norm(x + self.linear(attended, p + "cross_attn.o_proj.", False), p + "norm.")
        return self.linear(F.gelu(self.linear(x, p + "proj_out.linear_1.", False)), p + "proj_out.linear_2.", False) + queries

    def image(self, image: Image.Image):
        """(image-token embeddings (rows * (cols + 1), H), (rows, cols), what the LLM's SVA layers read)."""
        width, height = image.size
        towers = self.tower_tokens(image)
        context = towers[0].mean(1)
        all_cells = [self.cells(t, width, height, unpad=False) for t in towers]
        queries = self.w["model.vision_query"][0].expand(GRID * GRID, 1, -1)
        ctx = context.expand(GRID * GRID, 1, -1)
        for layer in range(self.config["connector_depth"]):
            queries = self.sva_layer(f"model.vision_sampler_0.layers.{layer}.", queries, ctx,
                                     [c for c, _ in all_cells], [m for _, m in all_cells])
        mapped = self.linear(F.gelu(self.linear(queries.view(GRID, GRID, -1), "model.mm_projector.0.")),
                             "model.mm_projector.2.")
        row0, row1, col0, col1 = unpad_span(width, height, GRID)
        kept = mapped[row0:row1, col0:col1]
        newline = self.w["model.image_newline"].expand(row1 - row0, 1, -1)
        embeds = torch.cat([kept, newline], 1).reshape(-1, kept.shape[-1])
        unpadded = [self.cells(t, width, height, unpad=True) for t in towers]
        return embeds, (row1 - row0, col1 - col0), (context, unpadded)

    def llama(self, embeds, sampler_at, start, grid, vision):
        """Eager Llama-3 over (L, H) embeddings (no padding, positions 0..L-1) with the SVA layers after
        decoder layers ``sampler_at``; returns (last logits (V,), per layer (heads, L, L) probabilities)."""
        c = self.config
        hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        head_dim, length = hidden // heads, embeds.shape[0]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(length).float(), inv)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

        def rope(x):
            half = x.shape[-1] // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        def rms(x, name):
            return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

        causal = torch.ones(length, length, dtype=torch.bool).tril()
        rows, cols = grid
        cell_positions = (start + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None]).reshape(-1)
        x, probabilities = embeds, []
        for layer in range(c["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = rms(x, p + "input_layernorm.weight")
            q = rope(F.linear(h, self.w[p + "self_attn.q_proj.weight"]).view(length, heads, head_dim).transpose(0, 1))
            k = rope(F.linear(h, self.w[p + "self_attn.k_proj.weight"]).view(length, kv_heads, head_dim).transpose(0, 1))
            v = F.linear(h, self.w[p + "self_attn.v_proj.weight"]).view(length, kv_heads, head_dim).transpose(0, 1)
            k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
            probs = ((q @ k.transpose(-1, -2)) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf")).softmax(-1)
            probabilities.append(probs)
            x = x + F.linear((probs @ v).transpose(0, 1).reshape(length, hidden), self.w[p + "self_attn.o_proj.weight"])
            h = rms(x, p + "post_attention_layernorm.weight")
            x = x + F.linear(F.silu(F.linear(h, self.w[p + "mlp.gate_proj.weight"])) * F.linear(h, self.w[p + "mlp.up_proj.weight"]),
                             self.w[p + "mlp.down_proj.weight"])
            if layer in sampler_at:
                context, unpadded = vision
                cells = self.sva_layer(f"model.vision_sampler_layers.{sampler_at[layer]}.layers.0.",
                                       x[cell_positions][:, None], context.expand(len(cell_positions), 1, -1),
                                       [f for f, _ in unpadded], [m for _, m in unpadded])
                x = x.clone()
                x[cell_positions] = cells[:, 0]
        x = rms(x, "model.norm.weight")
        return F.linear(x[-1], self.w["lm_head.weight"]), probabilities

    @torch.no_grad()
    def generate(self, tokenizer, prompt: str, image: Image.Image, steps: int):
        """Greedy tokens (steps,) and rows (steps, rows, cols) of the release for one item; the image at
        config image_position (tokenizer_image_token puts it there for the default llama_3 prompt)."""
        chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
        offset = int(chunks[0][0] == tokenizer.bos_token_id)
        before, after = chunks[0], chunks[1][offset:]
        assert len(before) == self.config["image_position"]
        embeds, grid, vision = self.image(image)
        c = self.config
        sampler_at = {c["start_of_vision_sampler_layers"] + k * c["stride_of_vision_sampler_layers"]: k
                      for k in range(c["num_of_vision_sampler_layers"])}
        embed = self.w["model.embed_tokens.weight"]
        sequence = torch.cat([embed[before], embeds, embed[after]])
        rows, cols = grid
        cells = (len(before) + torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None]).reshape(-1)
        tokens, maps = [], []
        for _ in range(steps):
            logits, probabilities = self.llama(sequence, sampler_at, len(before), grid, vision)
            newest = torch.stack([p[:, -1] for p in probabilities]).mean(dim=(0, 1))
            maps.append(newest[cells].view(rows, cols))
            tokens.append(int(logits.argmax()))
            sequence = torch.cat([sequence, embed[tokens[-1]][None]])
        return torch.tensor(tokens), torch.stack(maps)


# --------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------

def captured_generation(lmm, images, steps=STEPS):
    """The pipeline's way: processor batch (left-padded), layouts, greedy generate under capture. Returns
    (inputs, new tokens (B, steps), per item rows (steps, rows, cols))."""
    prompt = build_prompt(lmm.processor, QUESTION, None)
    inputs = lmm.processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    layouts = lmm.image_layouts(inputs)
    capture = AttentionCapture(lmm.model, layers="all", heads="all")
    with torch.no_grad(), capture.recording([layout.positions for layout in layouts]):
        sequences = lmm.model.generate(**inputs, do_sample=False, max_new_tokens=steps)
    rows = [r.reshape(r.shape[0], *layout.grid) for r, layout in zip(capture.item_rows(), layouts)]
    return inputs, sequences[:, inputs["input_ids"].shape[1]:], rows


def test_family_is_registered_and_prompt_is_llama_3(hub):
    lmm = hub["lmm"]
    assert LMM_FAMILIES["cambrian"].loader == "load_cambrian" and lmm.family == "cambrian"
    assert not lmm.pad_to_square and lmm.unpadded_grid_covers == "image"
    prompt = build_prompt(lmm.processor, QUESTION, None)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>You are Cambrian")
    assert prompt.endswith("<|start_header_id|>user<|end_header_id|><image>\n" + QUESTION +
                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>")
    assert lmm.model.config.get_text_config().num_hidden_layers == 4
    assert lmm.model.model.language_model.layers[0].self_attn is not None


@pytest.fixture(scope="module")
def batch2(hub):
    """The left-padded batch of two images: (images, captured_generation output)."""
    images = [noise_image(h, w, seed=k) for k, (h, w) in enumerate(BATCH2)]
    return images, captured_generation(hub["lmm"], images)


@pytest.mark.parametrize("sizes", [[(60, 120)], BATCH2], ids=["batch1-wide", "left-padded-batch2"])
def test_tokens_and_rows_equal_the_release_reference(hub, batch2, sizes):
    lmm, reference = hub["lmm"], hub["reference"]
    if sizes == BATCH2:
        images, (inputs, tokens, rows) = batch2
    else:
        images = [noise_image(h, w, seed=k) for k, (h, w) in enumerate(sizes)]
        inputs, tokens, rows = captured_generation(lmm, images)
    if len(images) > 1:
        assert int((inputs["attention_mask"] == 0).sum()) > 0             # the square image is left-padded
    prompt = build_prompt(lmm.processor, QUESTION, None)
    for b, image in enumerate(images):
        expected_tokens, expected_rows = reference.generate(lmm.processor.tokenizer, prompt, image, STEPS)
        assert tokens[b].tolist() == expected_tokens.tolist()
        assert rows[b].shape == expected_rows.shape
        torch.testing.assert_close(rows[b], expected_rows, rtol=1e-4, atol=1e-6)
        spread = rows[b].flatten(1).std(dim=1) / rows[b].flatten(1).mean(dim=1)
        assert (spread > 0.05).all()


@pytest.mark.parametrize(("size", "grid"), [((60, 120), (4, 6)), ((120, 60), (6, 4)), ((50, 50), (6, 6)),
                                            ((61, 200), (2, 6))])
def test_grid_is_the_unpadded_part_of_the_square(hub, size, grid):
    lmm = hub["lmm"]
    prompt = build_prompt(lmm.processor, QUESTION, None)
    inputs = lmm.processor(images=[noise_image(*size, seed=1)], text=[prompt], padding=True, return_tensors="pt")
    (layout,) = lmm.image_layouts(inputs)
    assert layout.grid == grid
    image_tokens = (inputs["input_ids"][0] == lmm.image_token_id).nonzero()[:, 0]
    assert len(image_tokens) == grid[0] * (grid[1] + 1)                  # a newline token after every row
    assert layout.positions.tolist() == image_tokens.view(grid[0], grid[1] + 1)[:, :-1].reshape(-1).tolist()


def test_a_bright_corner_feeds_its_corner_cell(hub):
    """A bright square of one cell's size in the top-left / bottom-right corner of a wide image changes the
    image tokens of that corner's grid cell most (through the padding, the four towers, the SVA and the
    unpadding: without the cut, the top row of the grid would be padding)."""
    lmm = hub["lmm"]
    height, width = 60, 120
    base = noise_image(height, width, seed=3)
    cell = width // GRID
    boxes = {(0, 0): (0, 0, cell, cell), "last": (width - cell, height - cell, width, height)}
    images = [base]
    for box in boxes.values():
        images.append(base.copy())
        images[-1].paste((255, 255, 255), box)
    prompt = build_prompt(lmm.processor, QUESTION, None)
    inputs = lmm.processor(images=images, text=[prompt] * 3, padding=True, return_tensors="pt")
    pixels = [inputs["pixel_values"], *(inputs[f"pixel_values_{i}"] for i in (1, 2, 3))]
    with torch.no_grad():
        tokens, *_ = lmm.model.model.image_features(pixels, inputs["image_sizes"])
    rows, cols = lmm.image_layouts(inputs)[0].grid
    features = [t.view(rows, cols + 1, -1)[:, :cols] for t in tokens]
    assert (rows, cols) == (4, 6)
    for bright, expected in zip(features[1:], [(0, 0), (rows - 1, cols - 1)]):
        change = (bright - features[0]).norm(dim=-1)
        assert divmod(int(change.argmax()), cols) == expected


def test_eos_inside_a_batch(hub, batch2):
    """One item reaching the end-of-sequence token stops; the other goes on with its own tokens and rows."""
    lmm = hub["lmm"]
    images, (_, free_tokens, free_rows) = batch2
    eos = int(free_tokens[0, 1])
    assert eos not in free_tokens[1].tolist() and eos not in free_tokens[0, :1].tolist()
    config = lmm.model.generation_config
    original = config.eos_token_id
    config.eos_token_id = eos
    try:
        _, tokens, rows = captured_generation(lmm, images)
    finally:
        config.eos_token_id = original
    assert tokens[0, :2].tolist() == free_tokens[0, :2].tolist()
    assert (tokens[0, 2:] == lmm.processor.tokenizer.pad_token_id).all()
    assert tokens[1].tolist() == free_tokens[1].tolist()
    torch.testing.assert_close(rows[1], free_rows[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows[0][:2], free_rows[0][:2], rtol=1e-4, atol=1e-6)


def test_generate_stage_end_to_end(hub, batch2, tmp_path):
    """stages.generate.run (its own load through the registry, left-padded batch of 2): the generations
    table holds each image's unpadded grid and tokens, the store its rows (those of the capture above, float16)
    and says the grids cover the image."""
    from stages import generate
    from stages.generate import GenerateConfig, LMMConfig
    from stages.io.attention import attention_attrs, open_attention, read_rows
    from stages.io.tables import read_table, write_table

    images, (_, tokens, rows) = batch2
    manifest = []
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k}.png")
        manifest.append({"image_id": str(k), "file": str(tmp_path / f"{k}.png"), "width": image.width,
                         "height": image.height, "shard": 0, "error": None})
    write_table(manifest, tmp_path / "manifest.parquet", "manifest")
    generate.run(GenerateConfig(question=QUESTION, max_new_tokens=STEPS, batch_size=2),
                 LMMConfig(family="cambrian", path=REPO_ID, dtype="float32"), tmp_path / "manifest.parquet", 0,
                 tmp_path / "generations.parquet", tmp_path / "attention.zarr", device="cpu")
    table = read_table(tmp_path / "generations.parquet", "generations")
    assert table["error"].isna().all()
    assert attention_attrs(tmp_path / "attention.zarr")["grid_covers"] == "image"
    store = open_attention(tmp_path / "attention.zarr")
    for b, row in enumerate(table.itertuples()):
        assert (row.grid_h, row.grid_w) == tuple(rows[b].shape[1:])
        assert list(row.token_ids) == tokens[b, :row.num_tokens].tolist()
        stored = read_rows(store, row.attention_offset, row.num_tokens, (row.grid_h, row.grid_w))
        np.testing.assert_allclose(stored, rows[b][:row.num_tokens].numpy(), rtol=1e-2, atol=1e-4)
