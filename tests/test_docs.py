"""The README and the pages under docs/ stay true to the repository, and the report's texts name real folders.

- Every relative Markdown link (``[x](path)``, ``[x](path#anchor)``, ``![x](image)``) points to an existing
  file, and an ``#anchor`` to a heading of that file (GitHub's slugs). http(s) links are not checked (the
  machine may be offline).
- Every ``snakemake`` command of a fenced ``bash`` block (continuation lines joined) names existing config
  files, and each distinct set of config files (with its ``--config`` overrides) is planned by a dry run in a
  scratch working directory, as tests/test_presets.py plans the presets: the data paths the configs name
  (``data/coco/...``, the SAM checkpoint, the training JSONs) get empty stand-ins there, which is all a dry
  run looks at. A config file written by the block itself (``cat > name <<'EOF'``) is written there too. A
  file that stands for the reader's own (``my_cluster.yaml``) skips its command, by the allow-list
  :data:`READER_FILES` only. Other options of a command (profiles, resources, targets) are not planned.
- Every ``python -m stages.X`` module, ``bench/`` script and ``make`` target named exists.
- The report's opening text and captions (workflow/report/*.rst), rendered as Snakemake renders them, name
  the run's real folders (``results/logs/``), never a literal ``{out}``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Config files that stand for the reader's own: a command naming one is not planned (it cannot be).
READER_FILES = {
    "my_cluster.yaml": "the reader's cluster section (README and docs/cluster.md, 'Running on a cluster')",
}

FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------
# Markdown: prose, fenced blocks, headings, links


@dataclass
class Page:
    path: Path
    prose: list[tuple[int, str]] = field(default_factory=list)          # (line number, line) outside fences
    blocks: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (first line, language, lines)


def read_page(path: Path) -> Page:
    page = Page(path)
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
            page.blocks.append((number + 1, match.group(3).lower(), []))
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is not None:
            page.blocks[-1][2].append(line)
        else:
            page.prose.append((number, line))
    return page


def without_code_spans(line: str) -> str:
    return re.sub(r"(`+)(.+?)\1", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, every character but letters, digits, '_', '-'
    and spaces removed, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)          # a link's text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor, repeated headings numbered as GitHub numbers them (x, x-1, x-2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in read_page(path).prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(page: Page) -> list[tuple[int, str]]:
    return [(number, match.group(1)) for number, line in page.prose
            for match in LINK.finditer(without_code_spans(line))]


def link_problem(page: Path, target: str) -> str | None:
    """Why a link of ``page`` is broken, or None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):        # http:, https:, mailto:: not checked
        return None
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    if not file.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if not file.exists():
        return f"{target}: no file {file.relative_to(ROOT)}"
    if anchor:
        if file.suffix != ".md":
            return f"{target}: an anchor into a file that is not Markdown"
        if anchor not in anchors(file):
            return f"{target}: no heading with anchor #{anchor} in {file.relative_to(ROOT)}"
    return None


def test_there_are_pages_and_links():
    assert ROOT / "README.md" in PAGES and len(PAGES) > 5
    assert sum(len(links(read_page(path))) for path in PAGES) > 30


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_every_relative_link_and_anchor_resolves(path):
    page = read_page(path)
    problems = [f"{rel(path)}:{number}: {problem}" for number, target in links(page)
                if (problem := link_problem(path, target))]
    assert not problems, "\n".join(problems)


def test_slugs_follow_githubs_rules():
    assert slug("Results of `make run`") == "results-of-make-run"
    assert slug("1. Generation with attention capture") == "1-generation-with-attention-capture"
    assert slug("CLIP-style tower against a diffusion-UNet") == "clip-style-tower-against-a-diffusion-unet"
    assert slug("A folder that cannot be written, a disk") == "a-folder-that-cannot-be-written-a-disk"
    assert slug("[Linked](x.md) *and* <b>marked</b> up") == "linked-and-marked-up"
    assert slug("Training DiffLMM and the CLIP baseline") == "training-difflmm-and-the-clip-baseline"


def test_a_broken_link_or_anchor_is_found(tmp_path, monkeypatch):
    """The checker can fail: a missing file and a missing heading are both reported."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some heading\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#some-heading) [gone](docs/b.md) [bad](docs/a.md#no-such) "
                    "[web](https://x.org)\n"
                    "```bash\n[not a link](nowhere.md)\n```\n`[in code](nowhere.md)`\n")
    problems = [link_problem(page, target) for _, target in links(read_page(page))]
    assert problems == [None, "docs/b.md: no file docs/b.md",
                        "docs/a.md#no-such: no heading with anchor #no-such in docs/a.md", None]


# ------------------------------------------------------------------------------------------------
# Commands of the bash blocks


@dataclass
class Command:
    where: str                 # page:line
    words: list[str]
    files: dict[str, str]      # config files the block writes itself (cat > name <<'EOF')


def bash_commands(path: Path) -> list[Command]:
    """Every command line of the page's ``bash`` blocks, continuation lines joined, comments dropped; the
    lines of a here-document are the file it writes, not commands."""
    commands = []
    for first, language, lines in read_page(path).blocks:
        if language not in ("bash", "sh", "shell", "console"):
            continue
        files: dict[str, str] = {}
        heredoc: tuple[str, str, list[str]] | None = None
        pending, start = "", first
        for offset, line in enumerate(lines):
            if heredoc is not None:
                name, end, body = heredoc
                if line.strip() == end:
                    files[name] = "\n".join(body) + "\n"
                    heredoc = None
                else:
                    body.append(line)
                continue
            match = re.match(r"^\s*cat\s+>\s*(\S+)\s+<<-?\s*['\"]?(\w+)['\"]?\s*$", line)
            if match:
                heredoc = (match.group(1), match.group(2), [])
                continue
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            text, pending = pending + line, ""
            words = shlex.split(text, comments=True)
            if words:
                commands.append(Command(f"{rel(path)}:{start}", words, files))
        assert heredoc is None and not pending, \
            f"{rel(path)}:{first}: unfinished here-document or continuation"
    return commands


def program(words: list[str]) -> tuple[str, list[str]]:
    """The program a command runs (after VAR=value assignments) and its arguments."""
    index = 0
    while index < len(words) and re.match(r"^[A-Za-z_]\w*=", words[index]):
        index += 1
    return (words[index], words[index + 1:]) if index < len(words) else ("", [])


def option_values(args: list[str], option: str) -> list[str]:
    """The values that follow ``option`` (up to the next option or a '...' that elides the rest)."""
    values, taking = [], False
    for arg in args:
        if arg == option:
            taking = True
        elif arg.startswith("-") or arg == "...":
            taking = False
        elif taking:
            values.append(arg)
    return values


@dataclass(frozen=True)
class Plan:
    """One distinct dry run: config files (repository paths, or names the block writes) and overrides."""
    configfiles: tuple[str, ...]
    overrides: tuple[str, ...]
    written: tuple[tuple[str, str], ...]     # (name, content) of the files the block writes


def snakemake_plans() -> tuple[dict[Plan, list[str]], list[str], list[str]]:
    """Every distinct plan of the pages' snakemake commands with the places naming it, the problems found
    (config files that do not exist) and the commands skipped for naming a reader's file."""
    plans: dict[Plan, list[str]] = {}
    problems, skipped = [], []
    for path in PAGES:
        for command in bash_commands(path):
            name, args = program(command.words)
            if Path(name).name != "snakemake":
                continue
            configfiles = option_values(args, "--configfile") or ["config.yaml"]   # the Snakefile's default
            reader = [file for file in configfiles if file in READER_FILES]
            if reader:
                skipped.append(f"{command.where}: {', '.join(reader)}")
                continue
            missing = [file for file in configfiles
                       if file not in command.files and not (ROOT / file).is_file()]
            if missing:
                problems.append(f"{command.where}: config file(s) {', '.join(missing)} not in the repository "
                                "(nor written by the block, nor listed in READER_FILES)")
                continue
            written = tuple(sorted((file, command.files[file])
                                   for file in configfiles if file in command.files))
            plan = Plan(tuple(configfiles), tuple(option_values(args, "--config")), written)
            plans.setdefault(plan, []).append(command.where)
    return plans, problems, skipped


PLANS, PLAN_PROBLEMS, SKIPPED = snakemake_plans()


def test_every_snakemake_command_names_existing_config_files():
    assert PLANS, "no snakemake command found in the pages' bash blocks"
    assert not PLAN_PROBLEMS, "\n".join(PLAN_PROBLEMS)


def test_every_reader_file_of_the_allow_list_is_used():
    """An entry of READER_FILES that no command names any more is stale: remove it."""
    used = {entry.split(": ", 1)[1] for entry in SKIPPED}
    assert set(READER_FILES) <= {name for names in used for name in names.split(", ")}, \
        (READER_FILES, SKIPPED)


def merged_config(plan: Plan, workdir: Path) -> dict:
    """The config Snakemake builds for the plan: the files merged in order, then the overrides (parsed as
    YAML, as Snakemake parses them), the schema's defaults filled in where the result is valid."""
    from snakemake.utils import update_config
    from snakemake.utils import validate

    config: dict = {}
    for file in plan.configfiles:
        source = workdir / file if file in dict(plan.written) else ROOT / file
        update_config(config, yaml.safe_load(source.read_text()) or {})
    for override in plan.overrides:
        key, _, value = override.partition("=")
        update_config(config, {key: yaml.safe_load(value)})
    try:
        validate(config, str(ROOT / "schemas" / "config.schema.yaml"))
    except Exception:             # the dry run reports it
        pass
    return config


def stand_in_data(config: dict, workdir: Path) -> None:
    """Empty stand-ins at the data paths the config names outside its `out` folder (what the rules build
    there needs none): each data set's image and mask folders, annotation files and proposals, the SAM
    checkpoints, the training JSONs. A dry run only asks that they exist."""
    from stages.config import schema_default

    out = str(config.get("out", "results")).rstrip("/") + "/"
    folders, files = [], []
    for entry in (config.get("datasets") or {}).values():
        folders += [entry[key] for key in ("images", "panoptic_masks", "proposals_folder") if entry.get(key)]
        files += [entry[key] for key in ("instances", "mask_gt", "caption_gt", "refs", "narratives", "panoptic",
                                         "proposals") if entry.get(key)]
    for section in [config, *(config.get("variants") or {}).values()]:
        checkpoint = (section.get("sam") or {}).get("checkpoint")
        files += [checkpoint] if checkpoint else []
    for recipe in (config.get("training") or {}).values():
        for stage in (1, 2):
            files.append((recipe.get(f"stage{stage}") or {}).get(
                "data", schema_default("training", "*", f"stage{stage}", "data")))
    for path in folders + files:
        if Path(path).is_absolute() or str(path).startswith(out):
            continue
        target = workdir / path
        if path in folders:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def plan_id(plan: Plan) -> str:
    return "+".join(Path(file).stem for file in plan.configfiles) + "".join(f"[{o}]" for o in plan.overrides)


@pytest.mark.parametrize("plan", list(PLANS), ids=plan_id)
def test_documented_snakemake_command_plans(plan, tmp_path):
    """``snakemake -n --configfile <the command's files> [--config <its overrides>]`` plans a DAG."""
    for name, content in plan.written:
        (tmp_path / name).write_text(content)
    stand_in_data(merged_config(plan, tmp_path), tmp_path)
    configfiles = [str(tmp_path / file if file in dict(plan.written) else ROOT / file)
                   for file in plan.configfiles]
    args = ["--configfile", *configfiles, *(["--config", *plan.overrides] if plan.overrides else [])]
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                             "--directory", str(tmp_path), "--dry-run", "--cores", "1", *args],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    where = ", ".join(PLANS[plan])
    assert result.returncode == 0 and "Job stats:" in result.stdout, \
        f"{where}: snakemake -n {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_a_missing_config_file_is_found(monkeypatch, tmp_path):
    """The checker can fail: a command naming a config file that is not there is reported."""
    page = tmp_path / "page.md"
    page.write_text("```bash\n.venv/bin/snakemake --cores 2 \\\n"
                    "    --configfile config.yaml config/no-such.yaml\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "PAGES", [page])
    monkeypatch.setattr(sys.modules[__name__], "rel", lambda path: path.name)
    plans, problems, _ = snakemake_plans()
    assert not plans and problems == ["page.md:2: config file(s) config/no-such.yaml not in the repository "
                                      "(nor written by the block, nor listed in READER_FILES)"]


# ------------------------------------------------------------------------------------------------
# Modules, scripts and make targets named anywhere in the pages


def page_texts() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in PAGES]


def code_texts(path: Path) -> list[str]:
    """The page's inline code spans and the lines of its fenced blocks."""
    page = read_page(path)
    spans = [match.group(2) for _, line in page.prose for match in re.finditer(r"(`+)(.+?)\1", line)]
    return spans + [line for _, _, lines in page.blocks for line in lines]


def test_named_stage_modules_exist():
    named = set()
    for _, text in page_texts():
        for match in re.finditer(r"-m (stages(?:\.\w+)+)((?:\|\w+)*)", text):
            parent = match.group(1).rsplit(".", 1)[0]
            named |= {match.group(1), *(f"{parent}.{alt}" for alt in match.group(2).split("|")[1:])}
    assert {"stages.demo", "stages.inspect", "stages.toy.diagnostics", "stages.training"} <= named

    def exists(module: str) -> bool:
        base = ROOT.joinpath(*module.split("."))
        return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()

    assert not sorted(module for module in named if not exists(module))


def test_named_bench_scripts_exist():
    named = {match for _, text in page_texts() for match in re.findall(r"\bbench/[\w.-]+\.(?:py|sh)\b", text)}
    assert "bench/bench_capture.py" in named
    assert not sorted(script for script in named if not (ROOT / script).is_file())


def test_named_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    named = {target for path in PAGES for code in code_texts(path)
             for target in re.findall(r"(?:^|[\s;&|(])make\s+([A-Za-z][\w-]*)", code)}
    assert {"run", "test", "test-fast"} <= named
    assert not sorted(named - targets), targets


# ------------------------------------------------------------------------------------------------
# The report's texts: rendered as Snakemake 9 renders them (snakemake/report/__init__.py: Jinja2 with
# trim_blocks and lstrip_blocks, a `snakemake` object with `config` (and, for a caption, its job's
# wildcards and params), then docutils to HTML)


def render_report_text(path: Path, config: dict, **job) -> str:
    from docutils.core import publish_parts
    from jinja2 import Environment, StrictUndefined

    env = Environment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    snakemake = SimpleNamespace(config=config, wildcards=SimpleNamespace(**job.get("wildcards", {})),
                                params=SimpleNamespace(**job.get("params", {})))
    text = env.from_string(path.read_text()).render(snakemake=snakemake, categories={}, files=[])
    return publish_parts(text, writer="html")["html_body"]


JOBS = {   # caption -> the job that would show it
    "workflow.rst": {},
    "summary.rst": {},
    "toy_diagnostics.rst": {},
    "training_loss.rst": {"wildcards": {"trained": "difflmm-7b"}, "params": {"stage": 2}},
    "metrics.rst": {"wildcards": {"run": "main", "dataset": "toy_gcg"}},
    "visualize.rst": {"wildcards": {"run": "main", "dataset": "toy_gcg", "figure": "overlay", "image": "x"}},
}


def test_every_report_text_is_checked():
    assert {path.name for path in (ROOT / "workflow" / "report").glob("*.rst")} == set(JOBS)


@pytest.mark.parametrize("out", ["results", "runs/paper/"])
@pytest.mark.parametrize("name", sorted(JOBS))
def test_report_texts_name_the_runs_folders(name, out):
    config = {**yaml.safe_load((ROOT / "config.yaml").read_text()), "out": out}
    html = render_report_text(ROOT / "workflow" / "report" / name, config, **JOBS[name])
    folder = out.rstrip("/")
    assert "{out}" not in html and "{{" not in html and "{%" not in html, html
    assert f"{folder}//" not in html
    expected = {"workflow.rst": [f"{folder}/logs/", f"{folder}/benchmarks/"],
                "summary.rst": [f"{folder}/summary.md"],
                "toy_diagnostics.rst": [f"{folder}/toy_diagnostics.md"],
                "training_loss.rst": [f"{folder}/training/difflmm-7b/stage2/losses.json",
                                      f"{folder}/logs/train_stage2/difflmm-7b.log"]}
    for text in expected.get(name, []):
        assert text in html, (text, html)
