"""The llava_original family: a tiny LLaVA-1.5 checkpoint in the original release's layout with the real
Vicuna-7B-v1.5 tokenizer (real 32000-token vocabulary, tiny random weights), fabricated into a fake
Hugging Face cache, loaded through the registry by its hub id, checked against the release's own
computation (its tokenizer_image_token prompt ids, LlamaForCausalLM + CLIP penultimate patch features +
mlp2x_gelu, image features spliced at the -200 sentinel), then run through the generate stage with
attention capture. The prompt ids are checked for both ``legacy`` settings and for a checkpoint that
ships only the sentencepiece ``tokenizer.model``, as the published one does."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fake_hub import snapshot, use_offline_cache
from real_tokenizers import LLAMA2_VOCAB_SIZE, llama2_sentencepiece_model, write_vicuna_tokenizer

from stages import generate
from stages.capture import eager_reference_rows, image_token_positions
from stages.config import ConfigError
from stages.generate import GenerateConfig, LMMConfig, build_prompt
from stages.io.attention import open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.llava_v1 import LLAVA_V1_SYSTEM, convert_state_dict, read_state_dict
from stages.models.registry import LMM_FAMILIES, load_lmm

REPO_ID = "liuhaotian/llava-v1.5-7b"
TOWER_ID = "openai/clip-vit-large-patch14-336"
IMAGE_SIZE, PATCH = 48, 8            # a 6 x 6 grid = 36 image tokens
GRID = IMAGE_SIZE // PATCH
IMAGE_TOKEN_INDEX = -200              # the release's sentinel (llava/constants.py)
QUESTION = "Describe the image in detail."
# Around the image, the release's ids are "▁US", "ER", ":", "▁" | image | "▁", "\n".
RELEASE_IDS_AROUND_THE_IMAGE = [3148, 1001, 29901, 29871, IMAGE_TOKEN_INDEX, 29871, 13]
# The release's ids of f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:" with Vicuna's vocabulary.
RELEASE_PROMPT_IDS = [
    1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076, 8444,
    29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 5199, 29915, 29879, 5155, 29889,
    *RELEASE_IDS_AROUND_THE_IMAGE, 4002, 29581, 278, 1967, 297, 9493, 29889, 319, 1799, 9047, 13566, 29901]
# Checkpoint variants: (weights, tokenizer_config.json's "legacy", tokenizer.model only). The first is
# the published liuhaotian/llava-v1.5-7b layout.
CHECKPOINTS = [("bin-shards", False, True), ("safetensors", True, False)]


def write_clip_tower(folder) -> None:
    """A tiny CLIP vision tower as CLIPVisionModel.save_pretrained + CLIPImageProcessor.save_pretrained."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=32, initializer_range=0.2)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)


def llama_fields(vocab_size: int) -> dict:
    return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "initializer_range": 0.2, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None, "tie_word_embeddings": False,
            "use_cache": True, "vocab_size": vocab_size}


def write_llava_checkpoint(folder, weights: str, legacy: bool | None, sentencepiece_only: bool) -> None:
    """A tiny LLaVA-Llama checkpoint in the release's layout: config.json with the mm_* fields,
    weights with the release's key names (``weights``: "bin-shards" = pytorch_model-0000k-of-00002.bin
    + index, "safetensors" = model.safetensors), the real Vicuna tokenizer files
    (:func:`real_tokenizers.write_vicuna_tokenizer`), generation_config.json."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    write_vicuna_tokenizer(folder, legacy=legacy, sentencepiece_only=sentencepiece_only)
    fields = llama_fields(LLAMA2_VOCAB_SIZE)
    config = {"_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
              "model_type": "llava_llama", **fields, "freeze_mm_mlp_adapter": False,
              "image_aspect_ratio": "pad", "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
              "mm_vision_select_feature": "patch",
              "mm_vision_select_layer": -2, "mm_vision_tower": TOWER_ID, "torch_dtype": "float16",
              "tune_mm_mlp_adapter": False, "use_mm_proj": True, "transformers_version": "4.31.0"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}))
    torch.manual_seed(2)
    state = LlamaForCausalLM(LlamaConfig(**fields)).state_dict()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    torch.nn.init.normal_(projector[0].weight, std=0.5)
    torch.nn.init.normal_(projector[2].weight, std=0.5)
    state.update({f"model.mm_projector.{key}": value for key, value in projector.state_dict().items()})
    state = {key: value.contiguous() for key, value in state.items()}
    if weights == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, shard_keys in shards.items():
        torch.save({key: state[key] for key in shard_keys}, folder / name)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {key: name for name, shard_keys in shards.items() for key in shard_keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=["-".join(map(str, c)) for c in CHECKPOINTS])
def hub_cache(request, tmp_path_factory):
    """A fake hub cache holding the checkpoint and its CLIP tower; returns (cache, llava snapshot,
    tower snapshot)."""
    cache = tmp_path_factory.mktemp("hub")
    tower = snapshot(cache, TOWER_ID)
    write_clip_tower(tower)
    checkpoint = snapshot(cache, REPO_ID)
    write_llava_checkpoint(checkpoint, *request.param)
    return cache, checkpoint, tower


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """The fake cache, read offline."""
    use_offline_cache(monkeypatch, hub_cache[0])
    return hub_cache


@pytest.fixture(scope="module")
def weights_hub(tmp_path_factory):
    """One more cache (safetensors weights) for tests that replace the tokenizer files themselves;
    returns (cache, llava snapshot)."""
    cache = tmp_path_factory.mktemp("hub")
    write_clip_tower(snapshot(cache, TOWER_ID))
    checkpoint = snapshot(cache, REPO_ID)
    write_llava_checkpoint(checkpoint, "safetensors", legacy=False, sentencepiece_only=True)
    return cache, checkpoint


@pytest.fixture
def offline_weights(weights_hub, monkeypatch):
    """The llava snapshot of :func:`weights_hub`, its cache read offline."""
    use_offline_cache(monkeypatch, weights_hub[0])
    return weights_hub[1]


@pytest.fixture
def loaded(offline_hub):
    return load_lmm("llava_original", REPO_ID, dtype=torch.float32, attn_implementation="sdpa",
                    device=torch.device("cpu"))


class ReleaseLLaVA:
    """The release's forward pass, written from its layout: LlamaForCausalLM over the checkpoint's own
    keys, CLIP hidden_states[-2] without CLS, mm_projector.0 -> GELU -> mm_projector.2, image features
    spliced over the -200 sentinel of ``tokenizer_image_token``."""

    def __init__(self, checkpoint, tower):
        from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        raw = json.loads((checkpoint / "config.json").read_text())
        self.llm = LlamaForCausalLM.from_pretrained(
            checkpoint, config=LlamaConfig(**llama_fields(raw["vocab_size"])),
            attn_implementation="eager").eval()
        self.tower = CLIPVisionModel.from_pretrained(tower).eval()
        state = read_state_dict(checkpoint)
        self.projector = [state[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]
        self.vocab_size = raw["vocab_size"]

    @torch.no_grad()
    def logits(self, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
        """``ids`` with one -200 sentinel; ``pixel_values`` (1, 3, H, W). Returns (L, vocab) float32,
        L = len(ids) - 1 + number of patches."""
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[-2][0, 1:]
        w0, b0, w2, b2 = self.projector
        features = torch.nn.functional.gelu(hidden @ w0.T + b0) @ w2.T + b2
        cut = ids.index(IMAGE_TOKEN_INDEX)
        embed = self.llm.get_input_embeddings()
        embeds = torch.cat([embed(torch.tensor(ids[:cut])), features, embed(torch.tensor(ids[cut + 1:]))])
        return self.llm(inputs_embeds=embeds[None]).logits[0]


def tokenizer_image_token(tokenizer, prompt: str) -> list[int]:
    """The release's llava.mm_utils.tokenizer_image_token: the prompt split at "<image>", each chunk
    tokenised alone with the tokenizer's default special tokens, a chunk's first token dropped when
    it is <s> (every chunk but the first), the chunks joined by the sentinel -200."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + (chunk[1:] if chunk[:1] == [tokenizer.bos_token_id] else chunk)
    return ids


def sentencepiece_image_token(prompt: str) -> list[int]:
    """The same, with the release's own tokenizer: transformers 4.31's slow LlamaTokenizer, i.e. <s>
    and sentencepiece's ids of each chunk (``Vicuna``'s tokenizer.model, run by sentencepiece)."""
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_proto=llama2_sentencepiece_model())
    chunks = [model.encode(chunk) for chunk in prompt.split("<image>")]
    return [model.bos_id()] + [i for chunk in chunks for i in [IMAGE_TOKEN_INDEX, *chunk]][1:]


def sentinel_ids(ids: list[int], image_token_id: int) -> list[int]:
    """``ids`` with its one run of image tokens replaced by the sentinel -200."""
    first, count = ids.index(image_token_id), ids.count(image_token_id)
    assert ids[first:first + count] == [image_token_id] * count
    return ids[:first] + [IMAGE_TOKEN_INDEX] + ids[first + count:]


def test_family_is_registered():
    assert "llava_original" in LMM_FAMILIES


def test_loaded_model_is_llava_hf_with_an_added_image_token(loaded, offline_hub):
    vocab_size = json.loads((offline_hub[1] / "config.json").read_text())["vocab_size"]
    tokenizer = loaded.processor.tokenizer
    assert loaded.family == "llava_original" and loaded.pad_to_square      # image_aspect_ratio "pad"
    ids = torch.tensor([[0, 0, 1, *[loaded.image_token_id] * (GRID * GRID), 7],
                        [1, 9, 8, *[loaded.image_token_id] * (GRID * GRID), 7]])
    layouts = loaded.image_layouts({"input_ids": ids})
    assert [layout.grid for layout in layouts] == [(GRID, GRID)] * 2
    assert all(layout.positions.tolist() == list(range(3, 3 + GRID * GRID)) for layout in layouts)
    with pytest.raises(ValueError, match=f"needs {GRID * GRID} image tokens"):
        loaded.image_layouts({"input_ids": ids[:, :-2]})
    assert loaded.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == vocab_size
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert loaded.model.config.vision_feature_layer == -2
    assert loaded.model.get_input_embeddings().weight.shape[0] == loaded.image_token_id + 1
    assert loaded.model.generation_config.suppress_tokens == [loaded.image_token_id]
    assert tokenizer.pad_token == "<unk>"
    assert loaded.model.config.get_text_config()._attn_implementation == "sdpa"


def test_prompt_is_the_llava_v1_conversation(loaded):
    assert build_prompt(loaded.processor, QUESTION, None) == \
        f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    assert build_prompt(loaded.processor, QUESTION, "Be brief.") == \
        f"Be brief. USER: <image>\n{QUESTION} ASSISTANT:"


TOKENIZER_FILES = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def with_tokenizer(checkpoint, folder, *, legacy: bool | None, sentencepiece_only: bool):
    """``folder``: the files of ``checkpoint`` (linked) with freshly written Vicuna tokenizer files."""
    folder.mkdir()
    for item in checkpoint.iterdir():
        if item.name not in TOKENIZER_FILES:
            (folder / item.name).symlink_to(item.resolve())
    write_vicuna_tokenizer(folder, legacy=legacy, sentencepiece_only=sentencepiece_only)
    return folder


PROMPTS = [(QUESTION, None), (QUESTION, "Be brief."),
           ("How many 🦙 are in Zürich's 2 parks? Answer in 3 words, naïvely.", LLAVA_V1_SYSTEM)]


@pytest.mark.parametrize("sentencepiece_only", [True, False], ids=["tokenizer.model", "tokenizer.json"])
@pytest.mark.parametrize("legacy", [None, True, False], ids=["legacy-unset", "legacy", "non-legacy"])
def test_prompt_ids_are_the_releases_whatever_the_legacy_flag(offline_weights, tmp_path, legacy,
                                                              sentencepiece_only):
    from transformers import AutoTokenizer, LlavaProcessor

    folder = with_tokenizer(offline_weights, tmp_path / "llava", legacy=legacy,
                            sentencepiece_only=sentencepiece_only)
    lmm = load_lmm("llava_original", str(folder), dtype=torch.float32, attn_implementation="sdpa",
                   device=torch.device("cpu"))
    processor, image = lmm.processor, Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (90, 30, 200))
    # transformers' own LlavaProcessor: the whole prompt tokenised with the image tokens inside it.
    whole_prompt = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                                  patch_size=PATCH, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for question, system in PROMPTS:
        prompt = build_prompt(processor, question, system)
        ids = processor(images=[image], text=[prompt])["input_ids"][0]
        assert ids.count(lmm.image_token_id) == GRID * GRID
        release = sentencepiece_image_token(prompt)
        assert sentinel_ids(ids, lmm.image_token_id) == release == tokenizer_image_token(tokenizer, prompt)
        around = release.index(IMAGE_TOKEN_INDEX)
        assert release[around - 4:around + 3] == RELEASE_IDS_AROUND_THE_IMAGE
        if (question, system) == (QUESTION, None):
            assert release == RELEASE_PROMPT_IDS
        whole = sentinel_ids(whole_prompt(images=[image], text=[prompt])["input_ids"][0], lmm.image_token_id)
        if legacy:
            assert whole == release
        else:   # transformers 5 adds "▁" at the start of the text only: the "▁" after the image is lost
            assert whole == release[:around + 1] + release[around + 2:]


@pytest.mark.parametrize("module", ["sentencepiece", "google.protobuf"])
def test_a_tokenizer_model_without_sentencepiece_is_a_config_error_naming_path_and_package(
        offline_weights, tmp_path, monkeypatch, module):
    folder = with_tokenizer(offline_weights, tmp_path / "llava", legacy=False, sentencepiece_only=True)
    monkeypatch.setitem(sys.modules, module, None)          # import fails as if not installed
    package = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}[module]
    with pytest.raises(ConfigError, match=rf"{re.escape(repr(str(folder)))}.*tokenizer.model.*{package}"):
        load_lmm("llava_original", str(folder), dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))


def test_logits_equal_the_release_computation(loaded, offline_hub):
    _, checkpoint, tower = offline_hub
    processor, model = loaded.processor, loaded.model
    prompt = build_prompt(processor, QUESTION, None)
    pixels = np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(loaded.image_token_id) == GRID * GRID
    # The processor's text tokens are the release's (chunk-wise tokenisation around "<image>").
    release_ids = sentinel_ids(ids, loaded.image_token_id)
    assert release_ids == tokenizer_image_token(processor.tokenizer, prompt)
    assert release_ids == sentencepiece_image_token(prompt)

    release = ReleaseLLaVA(checkpoint, tower)
    expected = release.logits(release_ids, inputs["pixel_values"])
    with torch.no_grad():
        actual = model(**inputs).logits[0]
    assert actual.shape == (len(ids), release.vocab_size + 1)
    torch.testing.assert_close(actual[:, :release.vocab_size], expected, rtol=1e-4, atol=1e-4)
    assert (actual[:, release.vocab_size] == 0).all()            # the added "<image>" row of lm_head
    assert expected[-1].std() > 0.5                               # informative, not near-constant logits


def write_manifest(folder) -> str:
    rows = []
    for k in range(2):
        pixels = np.random.default_rng(10 + k).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{k}.png")
        rows.append({"image_id": f"img{k}", "file": str(folder / f"img{k}.png"), "width": IMAGE_SIZE,
                     "height": IMAGE_SIZE, "shard": 0, "error": None})
    write_table(rows, folder / "manifest.parquet", "manifest")
    return str(folder / "manifest.parquet")


def test_generate_stage_answers_with_the_release_greedy_tokens(offline_hub, tmp_path):
    _, checkpoint, tower = offline_hub
    max_new = 5
    generations, attention = tmp_path / "gen.parquet", tmp_path / "attn.zarr"
    manifest = write_manifest(tmp_path)
    generate.run(GenerateConfig(max_new_tokens=max_new, batch_size=2),
                 LMMConfig(family="llava_original", path=REPO_ID), manifest, 0, generations, attention,
                 device="cpu")
    table = read_table(generations, "generations")
    store = open_attention(attention)
    assert table["image_id"].tolist() == ["img0", "img1"] and table["error"].isna().all()
    assert (table["grid_h"] == GRID).all() and (table["grid_w"] == GRID).all()
    assert store.shape == (int(table["num_tokens"].sum()) * GRID * GRID,)
    rows = read_rows(store, 0, int(table["num_tokens"].sum()), (GRID, GRID))
    assert (rows >= 0).all() and (rows.reshape(len(rows), -1).sum(axis=1) <= 1 + 1e-2).all()

    # Greedy decoding of the release's computation, step by step, gives the same tokens.
    release = ReleaseLLaVA(checkpoint, tower)
    from transformers import CLIPImageProcessor

    image_processor = CLIPImageProcessor.from_pretrained(tower)
    prompt = f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"
    for row in table.itertuples():
        image = Image.open(tmp_path / f"{row.image_id}.png")
        pixel_values = image_processor(image, return_tensors="pt").pixel_values
        ids = sentencepiece_image_token(prompt)
        generated = []
        for _ in range(row.num_tokens):
            token = int(release.logits(ids + generated, pixel_values)[-1].argmax())
            generated.append(token)
            if token == 2:
                break
        assert list(row.token_ids) == generated
        assert row.finish_reason == ("eos" if generated[-1] == 2 else "length")

    # The stored rows are the eager output_attentions rows of the converted model (release's way).
    eager = load_lmm("llava_original", REPO_ID, dtype=torch.float32, attn_implementation="eager",
                     device=torch.device("cpu"))
    images = [Image.open(tmp_path / f"{image_id}.png").convert("RGB") for image_id in table["image_id"]]
    inputs = eager.processor(images=images, text=[prompt] * 2, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager.model.generate(**inputs, do_sample=False, max_new_tokens=max_new, output_attentions=True,
                                   return_dict_in_generate=True)
    positions = image_token_positions(inputs["input_ids"], eager.image_token_id)
    expected = eager_reference_rows(out.attentions, positions)
    for b, row in enumerate(table.itertuples()):
        stored = read_rows(store, row.attention_offset, row.num_tokens, (GRID, GRID))
        np.testing.assert_allclose(stored, expected[b, :row.num_tokens].reshape(-1, GRID, GRID).numpy(),
                                   rtol=1e-2, atol=1e-4)
    assert float(rows.max()) > 3.0 / inputs["input_ids"].shape[1]      # peaked, not uniform


def test_unsupported_projector_and_missing_checkpoint_are_config_errors(offline_hub, tmp_path):
    _, checkpoint, _ = offline_hub
    with pytest.raises(ConfigError, match="not-a-model"):
        load_lmm("llava_original", "someone/not-a-model", dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))
    local = tmp_path / "llava-linear"
    local.mkdir()
    for item in checkpoint.iterdir():
        (local / item.name).write_bytes(item.read_bytes())
    config = json.loads((local / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="mm_projector_type"):
        load_lmm("llava_original", str(local), dtype=torch.float32, attn_implementation="sdpa",
                 device=torch.device("cpu"))


def test_unknown_checkpoint_keys_are_rejected_and_tower_keys_ignored():
    weight = torch.zeros(1)
    assert convert_state_dict({"model.vision_tower.vision_tower.vision_model.x": weight,
                               "model.mm_projector.0.weight": weight}) == \
        {"model.multi_modal_projector.linear_1.weight": weight}
    with pytest.raises(ConfigError, match="model.mm_projector.1.weight"):
        convert_state_dict({"model.mm_projector.1.weight": weight})
