"""The chat: its core on the default run's toy models (a greedy first answer is the generate stage's, its
grounding the phrases and segment stages'), and `python -m stages.chat` driven through a pseudo-terminal
(two turns, /save read back, a bad path, /image, Ctrl-C during an answer, Ctrl-C at the prompt)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import generate, phrases, segment
from stages.config import ConfigError
from stages.conversation import ChatConfig, ChatError, ChatModels, Conversation, Sampling
from stages.generate import GenerateConfig, LMMConfig
from stages.inspect import describe
from stages.io.attention import attention_attrs, open_attention, read_rows
from stages.io.tables import read_table, write_table
from stages.models.llava_v1 import LLAVA_V1_CHAT_TEMPLATE, LLAVA_V1_SYSTEM
from stages.segment import SamConfig, SegmentConfig

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Describe the image in detail."


@pytest.fixture(scope="module")
def toy(default_run):
    """(the toy LLaVA folder, the toy SAM file, two test images) of the default run."""
    results = default_run / "results"
    images = sorted((results / "synthetic" / "images").glob("*.jpg"))[:2]
    return results / "models" / "toy-llava", results / "models" / "toy-sam.safetensors", images


# --- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": -0.1}, r"temperature must be a finite number >= 0"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ({"seed": -3}, "seed must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
])
def test_bad_sampling_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**options)


def test_chat_config_checks_the_conversation_and_the_mask_source():
    assert ChatConfig().resolved_conv_mode == "template"
    assert ChatConfig(lmm=LMMConfig(family="difflmm")).resolved_conv_mode == "llava_v1"
    with pytest.raises(ConfigError, match="family 'qwen2_5_vl' takes its own chat template"):
        ChatConfig(lmm=LMMConfig(family="qwen2_5_vl"), conv_mode="llava_v1")
    with pytest.raises(ConfigError, match="conv_mode must be one of"):
        ChatConfig(conv_mode="vicuna")
    with pytest.raises(ConfigError, match="segment.mask_source 'proposals'"):
        ChatConfig(segment=SegmentConfig(mask_source="proposals"))
    assert Sampling(temperature=0).generate_config(GenerateConfig()).do_sample is False
    sampled = Sampling(temperature=0.7, top_p=0.9, seed=3, max_new_tokens=9).generate_config(GenerateConfig())
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.seed, sampled.max_new_tokens) == \
        (True, 0.7, 0.9, 3, 9)


def records(frame: pd.DataFrame, columns: list[str]) -> list[tuple]:
    """The rows of ``frame``'s ``columns`` as plain values: lists for arrays, None for missing values,
    floats rounded to float32 (as the tables store them)."""
    def plain(value):
        if isinstance(value, (list, np.ndarray)):
            return [int(v) for v in value]
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return None
        return float(np.float32(value)) if isinstance(value, float) else value
    return [tuple(plain(value) for value in row) for row in frame[columns].itertuples(index=False)]


# --- the core ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_greedy_first_answer_is_the_pipelines(toy, tmp_path):
    """Temperature 0: the generate stage's answer and rows for the same image and question, and the
    phrases and segment stages' phrases and masks; a follow-up continues the conversation."""
    lmm_path, sam_path, images = toy
    sam = SamConfig(type="tiny", checkpoint=str(sam_path))
    conversation = Conversation(ChatModels(ChatConfig(lmm=LMMConfig(path=str(lmm_path)), sam=sam, device="cpu")),
                                tmp_path / "chat")
    with pytest.raises(ChatError, match="no image yet"):
        conversation.ask(QUESTION)
    conversation.set_image(images[0])
    tokens = []
    turn = conversation.ask(QUESTION, Sampling(temperature=0, max_new_tokens=24),
                            on_token=lambda token_id, text: tokens.append((token_id, text)))
    assert [token_id for token_id, _ in tokens] == turn.token_ids
    assert "".join(text for _, text in tokens) == turn.answer

    manifest = tmp_path / "manifest.parquet"
    write_table([{"sample_id": turn.sample_id, "image_id": images[0].stem, "file": str(images[0]), "width": None,
                  "height": None, "shard": 0}], manifest, "manifest")
    paths = {name: tmp_path / name for name in ("g.parquet", "a.zarr", "p.parquet", "m.parquet")}
    generate.run(GenerateConfig(question=QUESTION, max_new_tokens=24), LMMConfig(path=str(lmm_path)), manifest, 0,
                 paths["g.parquet"], paths["a.zarr"], device="cpu")
    phrases.run(phrases.PhrasesConfig(), paths["g.parquet"], paths["p.parquet"])
    segment.run(SegmentConfig(), sam, manifest, paths["g.parquet"], paths["a.zarr"], paths["p.parquet"],
                paths["m.parquet"], device="cpu")
    stage = read_table(paths["g.parquet"], "generations").iloc[0]
    assert (stage.prompt, stage.answer, stage.token_ids.tolist(), stage.finish_reason) == \
        (turn.prompt, turn.answer, turn.token_ids, turn.finish_reason)
    stored = read_rows(open_attention(paths["a.zarr"]), 0, stage.num_tokens, (stage.grid_h, stage.grid_w))
    np.testing.assert_array_equal(turn.rows.astype(np.float16).astype(np.float32), stored)
    assert records(read_table(paths["p.parquet"], "phrases"), ["phrase_index", "text", "token_indices", "error"]) \
        == records(pd.DataFrame(turn.phrases), ["phrase_index", "text", "token_indices", "error"])
    columns = ["phrase_index", "text", "score", "point_x", "point_y", "rle_counts", "error"]
    assert records(read_table(paths["m.parquet"], "masks"), columns) == records(pd.DataFrame(turn.masks), columns)
    assert turn.overlay.is_file() and turn.overlay.parent.name == "chat-001"

    follow_up = conversation.ask("What else?", Sampling(temperature=0, max_new_tokens=4))
    assert follow_up.prompt.startswith(f"{turn.prompt} {turn.answer}") and follow_up.prompt.count("<image>") == 1
    assert follow_up.sample_id == f"{images[0].stem}-1" and follow_up.rows.shape == (4, stage.grid_h, stage.grid_w)
    # The release's conversation, for any LLaVA-1.5 family: system line, "</s>" after each answer.
    release = conversation.models.lmm.processor.apply_chat_template(
        conversation.messages("Why?"), chat_template=LLAVA_V1_CHAT_TEMPLATE, add_generation_prompt=True,
        tokenize=False)
    assert release == (f"{LLAVA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: {turn.answer}</s> USER: What else? "
                       f"ASSISTANT: {follow_up.answer}</s> USER: Why? ASSISTANT:")


# --- the terminal ----------------------------------------------------------------------------------

class Terminal:
    """A program on a pseudo-terminal of its own (its controlling terminal: "\\x03" sent to it is a SIGINT):
    what it prints is read into a buffer; :meth:`expect` waits for a pattern (``.`` matches newlines) in what
    was not consumed yet and consumes it."""

    def __init__(self, argv: list[str], cwd: Path):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                  # the child: the program
            os.chdir(cwd)
            # As from an interactive shell: Ctrl-C interrupts (a test run in the background ignores SIGINT).
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(argv[0], argv, {**os.environ, "HF_HUB_OFFLINE": "1"})
        self.buffer = self.log = ""
        self.status: int | None = None

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.buffer, re.DOTALL)):
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(1.0, left)) and self.exited()):
                raise AssertionError(f"{pattern!r} not printed; the terminal shows:\n{self.log[-3000:]}")
        self.buffer = self.buffer[match.end():]
        return match

    def _read(self, timeout: float) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536).decode(errors="replace")
        except OSError:                                    # the program ended: its terminal is gone
            return False
        self.buffer += data
        self.log += data
        return bool(data)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exited(self, timeout: float = 0) -> bool:
        """Whether the program has ended within ``timeout`` seconds (its exit code in ``status``)."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            self._read(0)                                  # keep its terminal drained
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline:
                return False
            else:
                time.sleep(0.05)
        return True

    def close(self) -> None:
        if not self.exited():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


PROMPT = r"USER: "
# Each answer's length (the chat's model has no end-of-sequence token): about 1 s of streaming on 2 cores (the Ctrl-C step stops it).
MAX_NEW_TOKENS = 320


def endless_copy(lmm_path: Path, folder: Path) -> Path:
    """A copy of the toy LLaVA without an end-of-sequence token: every answer runs to --max-new-tokens, so
    that an answer is still streaming when the test presses Ctrl-C."""
    shutil.copytree(lmm_path, folder)
    generation_config = json.loads((folder / "generation_config.json").read_text())
    generation_config["eos_token_id"] = None
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


@pytest.mark.slow
def test_terminal_chat(toy, tmp_path):
    """One chat process: two turns about one image (each streamed, its phrases and overlay listed), /save
    (read back with pandas, zarr and stages.inspect), a missing image, /image, an answer stopped by Ctrl-C
    (the prompt comes back), /reset, and Ctrl-C at the prompt, which quits cleanly."""
    lmm_path, sam_path, images = toy
    terminal = Terminal([sys.executable, "-m", "stages.chat", "--config", str(ROOT / "config.yaml"),
                         "--path", str(endless_copy(lmm_path, tmp_path / "toy-llava")), "--sam-checkpoint",
                         str(sam_path), "--image", str(images[0]), "--temperature", "0.7", "--seed", "3",
                         "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", "--out", str(tmp_path / "chat")],
                        cwd=ROOT)
    try:
        terminal.expect(r"temperature 0\.7, top_p 1\.0, seed 3")
        terminal.expect(re.escape(f"image {images[0]}") + ".*?" + PROMPT)
        overlays = []
        for question in (QUESTION, "Where is it?"):
            terminal.send(question + "\n")
            terminal.expect(r"ASSISTANT: \S")
            terminal.expect(r"phrases \(attention peak at pixel \(x, y\); mask score\):")
            overlays.append(Path(terminal.expect(r"overlay: (\S+\.png)").group(1)))
            terminal.expect(PROMPT)
        assert [path.name for path in overlays] == ["turn-0.png", "turn-1.png"] and all(p.is_file() for p in overlays)

        saved = tmp_path / "saved"
        terminal.send(f"/save {saved}\n")
        terminal.expect(r"saved 2 turn\(s\) to .*?" + PROMPT)
        terminal.send("/image /no/such/picture.png\n")
        terminal.expect(r"error: image file not found: /no/such/picture.png\s+" + PROMPT)
        terminal.send(f"/image {images[1]}\n")
        terminal.expect(r"new conversation\s+" + PROMPT)

        terminal.send(QUESTION + "\n")
        terminal.expect(r"ASSISTANT: \S")                 # streaming: stop it
        terminal.send("\x03")
        terminal.expect(r"\[stopped\]")
        stopped = Path(terminal.expect(r"overlay: (\S+\.png)").group(1))
        assert stopped.parent != overlays[0].parent and stopped.is_file()
        terminal.expect(PROMPT)
        terminal.send("/reset\n")
        terminal.expect(r"new conversation about the same image\s+" + PROMPT)
        terminal.send("\x03")                             # at the prompt: quits
        assert terminal.exited(timeout=30) and terminal.status == 0, terminal.log[-2000:]
    finally:
        terminal.close()

    generations = pd.read_parquet(saved / "generations.parquet")
    assert generations["sample_id"].tolist() == [f"{images[0].stem}-0", f"{images[0].stem}-1"]
    first, second = generations.itertuples()
    assert (first.finish_reason, first.num_tokens) == ("length", MAX_NEW_TOKENS)
    assert first.prompt.endswith(f"{QUESTION} ASSISTANT:")
    assert second.prompt.startswith(f"{first.prompt} {first.answer}") and second.prompt.count("<image>") == 1
    values = open_attention(saved / "attention.zarr")
    for row in (first, second):
        rows = read_rows(values, row.attention_offset, row.num_tokens, (row.grid_h, row.grid_w))
        assert rows.shape[0] == len(row.token_ids) and (rows >= 0).all()
    assert attention_attrs(saved / "attention.zarr")["grid_covers"] == "padded_square"
    manifest = pd.read_parquet(saved / "manifest.parquet")
    assert (manifest["file"] == str(images[0].resolve())).all()
    masks = read_table(saved / "masks.parquet", "masks")
    assert set(masks["sample_id"]) <= set(generations["sample_id"]) and len(read_table(saved / "phrases.parquet",
                                                                                        "phrases"))
    record = describe(saved / "masks.parquet")
    assert record["artifact"] == "masks" and record["provenance"]["stage"] == "conversation"
    assert [turn["temperature"] for turn in record["provenance"]["config"]["chat"]["turns"]] == [0.7, 0.7]
    assert (saved / f"{images[0].stem}-1_overlay.png").is_file()
