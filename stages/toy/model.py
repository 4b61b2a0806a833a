"""The embedded toy LMM: a tiny random-initialised LLaVA-1.5-architecture model, built offline.

:func:`build_toy_llava` writes a stock ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer
MLP projector, Llama language model) and its ``LlavaProcessor`` (CLIP image processor, word-level
tokenizer, llava-1.5-hf chat template) into a folder in the exact llava-hf on-disk layout, so the
pipeline loads it exactly like ``llava-hf/llava-1.5-7b-hf``. Everything follows from ``seed`` and the
corpus: the same arguments give byte-identical files.

Default sizes: 96 px images with 8 px patches, i.e. a 12 x 12 grid = 144 image tokens; hidden size
64 and 2 layers in both towers. Weights are drawn with a large standard deviation (0.2, LLaVA's own
is 0.02) so that attention is peaked rather than uniform, which keeps tests of attention meaningful.

The tokenizer is a word-level model trained on the corpus with the ``tokenizers`` library: text is
split at newlines, at spaces (Metaspace: a word keeps its leading space as ``▁``) and around
punctuation, so decoding a sequence of in-vocabulary tokens reproduces the text exactly; unseen
words become ``<unk>``. Special tokens: ``<unk>``, ``<s>`` (added in front of every encoded text, as
Llama does), ``</s>`` (end of sequence), ``<pad>``, ``<image>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from stages.io.atomic import atomic_path
from stages.models.llava_v1 import CLIP_MEAN, CLIP_STD, LLAVA_V1_SYSTEM

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
IMAGE_TOKEN = "<image>"

# The llava-hf/llava-1.5-7b-hf chat template: an optional system message (its text, then a space),
# "USER: <image>\n{question} ASSISTANT:".
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The Vicuna v1 system line of LLaVA-1.5 and the template's own words, always in the vocabulary
# (the prompt without its "<image>", a special token that is split off before pre-tokenisation).
PROMPT_TEXTS = (LLAVA_V1_SYSTEM, "USER: \nDescribe the image in detail. ASSISTANT:")


def build_toy_tokenizer(texts: Sequence[str]):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``texts`` + :data:`PROMPT_TEXTS`.

    Vocabulary: the five special tokens (ids 0..4 in :data:`SPECIAL_TOKENS` order), then every
    pre-token of the texts, each text also as it reads at the start of a line. Encoding prepends
    ``<s>``; padding is on the left (batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad, image = SPECIAL_TOKENS
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(prepend_scheme="first"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=0,
                                        show_progress=False)
    # Each text also after a newline, where a question stands in the prompt ("<image>\n{question}"):
    # a word that starts a line has no leading-space marker.
    tokenizer.train_from_iterator([*PROMPT_TEXTS, *texts, *(f"\n{text}" for text in texts)], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad,
        extra_special_tokens={"image_token": image}, padding_side="left", model_max_length=4096,
        clean_up_tokenization_spaces=False)


def build_toy_processor(texts: Sequence[str], *, image_size: int = 96, patch_size: int = 8):
    """The toy ``LlavaProcessor``: CLIP preprocessing at ``image_size`` px and the toy tokenizer.

    The processor expands each ``<image>`` to (image_size / patch_size)**2 image tokens, as the
    model's ``vision_feature_select_strategy="default"`` (CLS dropped) expects.
    """
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_toy_tokenizer(texts), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_15_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def toy_llava_config(vocab_size: int, *, image_size: int = 96, patch_size: int = 8,
                     vision_hidden_size: int = 64, vision_layers: int = 2, text_hidden_size: int = 64,
                     text_layers: int = 2, num_attention_heads: int = 4,
                     num_key_value_heads: int | None = None, initializer_range: float = 0.2):
    """``LlavaConfig`` of the toy model; token ids follow :func:`build_toy_tokenizer`'s vocabulary.

    ``num_key_value_heads`` < ``num_attention_heads`` gives a grouped-query-attention text model.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    _unk_id, bos_id, eos_id, pad_id, image_id = range(len(SPECIAL_TOKENS))
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size, patch_size=patch_size,
        projection_dim=vision_hidden_size, initializer_range=initializer_range)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads, max_position_embeddings=4096,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, initializer_range=initializer_range)
    grid = image_size // patch_size
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, image_seq_length=grid * grid,
        vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=pad_id)


def build_toy_llava(out_dir: str | os.PathLike, corpus: Sequence[str], *, seed: int = 0, image_size: int = 96,
                    patch_size: int = 8, vision_hidden_size: int = 64, vision_layers: int = 2,
                    text_hidden_size: int = 64, text_layers: int = 2, num_attention_heads: int = 4,
                    num_key_value_heads: int | None = None, initializer_range: float = 0.2) -> Path:
    """Write the toy LLaVA model + processor to ``out_dir`` (llava-hf layout) and return the path.

    ``corpus``: texts the tokenizer's vocabulary is trained on (e.g. the captions of a data set and
    the questions that will be asked); the LLaVA-1.5 system line and default question are always
    included. Weights are float32, drawn from ``seed`` without touching the caller's RNG state.
    The folder appears atomically: it is complete or absent.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    processor = build_toy_processor(corpus, image_size=image_size, patch_size=patch_size)
    config = toy_llava_config(
        len(processor.tokenizer), image_size=image_size, patch_size=patch_size,
        vision_hidden_size=vision_hidden_size, vision_layers=vision_layers, text_hidden_size=text_hidden_size,
        text_layers=text_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, initializer_range=initializer_range)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    text = config.text_config
    model.generation_config.bos_token_id = text.bos_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    log.info("toy LLaVA written to %s (vocabulary %d, %d image tokens)", out_dir, len(processor.tokenizer),
             config.image_seq_length)
    return out_dir


def captions_of(caption_json: str | os.PathLike) -> list[str]:
    """The ``caption`` fields of a GCG caption file (COCO style: ``{"annotations": [{"caption": ...}]}``)."""
    data = json.loads(Path(caption_json).read_text())
    return [annotation["caption"] for annotation in data["annotations"]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the model into (llava-hf layout)")
    parser.add_argument("--corpus-json", required=True,
                        help="GCG caption json whose `caption` fields train the tokenizer")
    parser.add_argument("--question", action="append", default=[],
                        help="a question the model will be asked (its words join the vocabulary); repeatable")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    build_toy_llava(args.out, captions_of(args.corpus_json) + args.question, seed=args.seed)


if __name__ == "__main__":
    main()
