"""Chat with a model about an image in the terminal, every answer grounded: ``python -m stages.chat``.

The release's ``python -m llava.serve.cli`` with attend-and-segment after each answer: the answer
streams token by token; then each noun phrase is listed with its attention peak (the point, pixel
(x, y) of the image) and its SAM mask's score, and an overlay PNG of the masks is written and named.
The conversation is kept across turns (the family's chat template, or ``--conv-mode llava_v1``, the
release's conversation; the image in the first user turn). Commands: ``/image PATH`` (a new image, a
new conversation), ``/save DIR`` (the conversation in the pipeline's artifact formats:
:meth:`stages.conversation.Conversation.save`), ``/reset`` (a new conversation about the same image),
``/quit``. Ctrl-C during an answer stops that answer (the part so far is kept and grounded); Ctrl-C or
Ctrl-D at the prompt quits. A missing or unreadable image is a one-line error and the prompt comes back.

Models and their settings come from a workflow config (``--config``, default ``config.yaml`` when it
exists: its ``lmm``, ``generate``, ``phrases``, ``segment`` and ``sam`` sections), the options below
overriding its model keys; with the default config that is the toy LLaVA and toy SAM that ``make run``
trains. The core, which a browser front end can drive too, is :mod:`stages.conversation`.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import select
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from stages.config import ConfigError, from_mapping, read_sections
from stages.conversation import CONV_MODES, ChatConfig, ChatModels, Conversation, Sampling, Turn
from stages.generate import GenerateConfig, LMMConfig
from stages.io.images import ImageError
from stages.phrases import PhrasesConfig
from stages.segment import SamConfig, SegmentConfig

DEFAULT_CONFIG = "config.yaml"
COMMANDS = "/image PATH, /save DIR, /reset, /quit"


def add_model_options(parser: argparse.ArgumentParser, *, config_help: str, temperature_help: str,
                      seed_help: str) -> None:
    """The options a chat front end shares (:mod:`stages.chat`, :mod:`stages.web`): the workflow config
    and its model keys, the conversation template, the decoding settings and the device; what
    :func:`chat_config` reads."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--family", help="lmm.family (llava, llava_original, difflmm, llava_next, qwen2_5_vl, ...)")
    parser.add_argument("--path", "--model-path", help="lmm.path: hub id or model folder")
    parser.add_argument("--base", "--model-base", help="lmm.base: the base model of a LoRA checkpoint (difflmm)")
    parser.add_argument("--grid", help="lmm.grid, for families with several feature grids")
    parser.add_argument("--conv-mode", choices=CONV_MODES, default=None,
                        help="template: the family's own chat template; llava_v1: the release's conversation "
                             "(LLaVA-1.5 families). Default: llava_v1 for llava_original and difflmm, template "
                             "otherwise")
    parser.add_argument("--temperature", type=float, default=0.2, help=temperature_help)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's top_p, in (0, 1]")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest answer in tokens")
    parser.add_argument("--seed", type=int, default=None, help=seed_help)
    parser.add_argument("--sam-type", help="sam.type: vit_h, vit_l, vit_b or tiny (the toy SAM)")
    parser.add_argument("--sam-checkpoint", help="sam.checkpoint: a .pth or .safetensors file")
    parser.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda when available)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.chat", description=__doc__.split("\n\n")[0])
    add_model_options(parser, config_help=f"workflow config giving the model sections (default: {DEFAULT_CONFIG} "
                                          "when it exists, else the schema's defaults)",
                      temperature_help="0: greedy; default 0.2 (the release's CLI)",
                      seed_help="seed of the sampled answers (default: a random one, printed at the start)")
    parser.add_argument("--image", "--image-file", help="the image to talk about (or later: /image PATH)")
    parser.add_argument("--out", default="chat", help="folder of the overlays (default: chat/)")
    return parser.parse_args(argv)


def chat_config(args: argparse.Namespace) -> ChatConfig:
    """The :class:`ChatConfig` of the command line: the config file's sections, the options over them."""
    config_path = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"config file not found: {config_path}")
    config = read_sections(config_path) if config_path is not None else {}
    lmm = dict(config.get("lmm") or {})
    lmm.update({key: value for key, value in (("family", args.family), ("path", args.path), ("base", args.base),
                                              ("grid", args.grid)) if value is not None})
    sam = dict(config.get("sam") or {})
    sam.update({key: value for key, value in (("type", args.sam_type), ("checkpoint", args.sam_checkpoint))
                if value is not None})
    return ChatConfig(lmm=from_mapping(LMMConfig, lmm, where="lmm"),
                      generate=from_mapping(GenerateConfig, config.get("generate"), where="generate"),
                      phrases=from_mapping(PhrasesConfig, config.get("phrases"), where="phrases"),
                      segment=from_mapping(SegmentConfig, config.get("segment"), where="segment"),
                      sam=from_mapping(SamConfig, sam, where="sam"), conv_mode=args.conv_mode, device=args.device)


def print_grounding(turn: Turn) -> None:
    """The turn's phrases, each with its attention peak and mask (or why it has none), and the overlay."""
    if turn.finish_reason == "stopped":
        print("[stopped]")
    print("phrases (attention peak at pixel (x, y); mask score):")
    for row in turn.masks:
        text = '"' + " ".join(row["text"].split()) + '"' if row["text"] is not None else "(answer)"
        if row["error"] is not None:
            print(f"  {text}: {row['error']}")
            continue
        peak = (f"peak ({row['point_x']:.0f}, {row['point_y']:.0f})" if row["point_x"] is not None
                else "no point (mask prompt)")
        print(f"  {text}: {peak}, score {row['score']:.2f}, {row['area']} px")
    print(f"overlay: {turn.overlay}")


def answer(conversation: Conversation, question: str, sampling: Sampling) -> None:
    """Ask ``question``, streaming the answer; Ctrl-C meanwhile sets the stop flag instead of raising."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        print("ASSISTANT: ", end="", flush=True)
        turn = conversation.ask(question, sampling, on_token=lambda token_id, text: print(text, end="", flush=True),
                                stop=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        print(flush=True)
    print_grounding(turn)


def command(conversation: Conversation, line: str) -> bool:
    """Run one ``/command`` line; False for /quit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip().strip("'\"")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        conversation.reset()
        print("new conversation about the same image")
    elif name in ("/image", "/save") and not argument:
        print(f"usage: {name} {'PATH' if name == '/image' else 'DIR'}")
    elif name == "/image":
        conversation.set_image(argument)
        print(f"image {conversation.image_path}: new conversation")
    elif name == "/save":
        paths = conversation.save(argument)
        print(f"saved {len(conversation.turns)} turn(s) to {Path(argument)}: {', '.join(p.name for p in paths)}")
    else:
        print(f"unknown command {line!r}; commands: {COMMANDS}")
    return True


class PromptReader:
    """``input(prompt)`` that Ctrl-C always interrupts.

    The kernel may hand a SIGINT to any thread of the process that does not block it (zarr's I/O thread
    once a conversation is saved, torch's pool): Python then only sets a flag, and a main thread blocked
    in ``input()`` would read on, deaf to Ctrl-C. Here the main thread waits in ``select`` on the input and
    on the signal wake-up file (every signal with a Python handler writes a byte to it, whichever thread
    takes it), so it wakes, and the handler (KeyboardInterrupt at the prompt) runs in it. Lines are read
    from the input's file descriptor (UTF-8; several lines arriving at once are returned one by one);
    :meth:`read` raises EOFError at the end of the input. Call from the main thread."""

    def __init__(self) -> None:
        self.input = sys.stdin.fileno()
        self.pending = b""
        self.wakeup, writer = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)

    def read(self, prompt: str) -> str:
        print(prompt, end="", flush=True)
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.input, self.wakeup], [], [])
            if self.wakeup in ready:
                os.read(self.wakeup, 512)          # the handler runs as this thread goes on (KeyboardInterrupt)
            if self.input in ready:
                data = os.read(self.input, 4096)
                if not data:
                    if not self.pending:
                        raise EOFError
                    self.pending += b"\n"
                self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode(errors="replace")


def loop(conversation: Conversation, sampling: Sampling) -> None:
    """Read lines until /quit, Ctrl-D or Ctrl-C at the prompt; a failing request (an image that cannot be
    read, no image yet, a folder that cannot be written, a turn that fails) prints one line and the prompt
    comes back."""
    prompt = PromptReader()
    while True:
        try:
            line = prompt.read("USER: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(conversation, line):
                    return
            else:
                answer(conversation, line, sampling)
        except (ValueError, OSError, RuntimeError) as exc:   # a bad image or request, a failed turn or save
            print(f"error: {exc}")
        except KeyboardInterrupt:   # between the prompt and the answer: as at the prompt
            print()
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=seed,
                            max_new_tokens=args.max_new_tokens)
        cfg = chat_config(args)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        models = ChatModels(cfg)
    except ValueError as exc:                         # ConfigError, a bad sampling value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    conversation = Conversation(models, args.out)
    decoding = "greedy" if sampling.temperature == 0 else \
        f"temperature {sampling.temperature}, top_p {sampling.top_p}, seed {seed}"
    print(f"{cfg.lmm.family} {cfg.lmm.path} ({models.conv_mode} conversation, {decoding}); "
          f"SAM {cfg.sam.type if models.predictor is not None else 'not used'}; overlays in {args.out}/")
    print(f"commands: {COMMANDS}; Ctrl-C stops an answer, at the prompt it quits")
    if args.image:
        try:
            conversation.set_image(args.image)
            print(f"image {conversation.image_path}")
        except ImageError as exc:
            print(f"error: {exc}")
    loop(conversation, sampling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
