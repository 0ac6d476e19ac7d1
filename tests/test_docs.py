"""The documentation says only what the repository has: every relative link and #anchor resolves, every file a
document cites exists, docs/commands.md is what the commands generate, and every command line, flag and setting the
documents name is one the commands accept. The README stays short and keeps its two commands."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCUMENTS = sorted([README, REPO / "data" / "README.md", *(REPO / "docs").glob("*.md")])
GENERATED = REPO / "docs" / "commands.md"
README_LIMIT = 250
DEMO_COMMAND = "bash scripts/demo.sh"
TEST_COMMAND = "bash scripts/test.sh"
# flags of other programs that the documents show next to cusa's: torchrun, tensorboard, open_clip's training
OTHER_TOOLS_FLAGS = {"--nproc_per_node", "--logdir", "--train-data"}


def _clip_benchmark_flags() -> set[str]:
    """The options of CLIP_benchmark's `clip_benchmark eval` (docs/export.md shows that command), from its parser."""
    import argparse

    from clip_benchmark.cli import get_parser_args

    argv, sys.argv = sys.argv, ["clip_benchmark", "eval"]  # it parses the command line it is given too
    try:
        parser, _ = get_parser_args()
    finally:
        sys.argv = argv
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= {o for a in sub._actions for o in a.option_strings}
    return flags
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
_SEGMENT_ENDS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1"}
_PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*)$")


def _load_generator():
    spec = importlib.util.spec_from_file_location("command_docs", REPO / "scripts" / "command_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


command_docs = _load_generator()
COMMANDS = {doc.name: doc for doc in command_docs.all_commands()}
SCRIPTS = {name: COMMANDS[name] for name in command_docs.console_scripts()}
MODULE_SCRIPTS = {target.split(":")[0]: name for name, target in command_docs.console_scripts().items()}


# ---------------------------------------------------------------------------------------------- reading markdown
def _prose_and_blocks(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, list[str]]]]:
    """Lines outside fenced code blocks (numbered from 1), and each fenced block as (first line, info, lines)."""
    prose, blocks, block = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*(```|~~~)\s*(\S*)", line)
        if fence and block is None:
            block = (number, fence.group(2).lower(), [])
        elif fence and block is not None:
            blocks.append(block)
            block = None
        elif block is not None:
            block[2].append(line)
        else:
            prose.append((number, line))
    return prose, blocks


def _without_code_spans(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def _code_spans(text: str) -> list[str]:
    prose, _ = _prose_and_blocks(text)
    joined = "\n".join(line for _, line in prose)
    return [span for span in re.findall(r"`([^`\n]+)`", joined)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    prose, _ = _prose_and_blocks(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors = set()
    for _, line in prose:
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[tuple[int, str]]:
    prose, _ = _prose_and_blocks(path.read_text(encoding="utf-8"))
    found = []
    for number, line in prose:
        line = _without_code_spans(line)
        found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)]
        found += [(number, target) for target in re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", line)]
    return found


# ---------------------------------------------------------------------------------------------- command lines
def _shell_lines(lines: list[str]) -> list[str]:
    """A shell block's commands: continuation lines joined."""
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return joined + ([current] if current.strip() else [])


def _split(command: str) -> list[str]:
    command = re.sub(r"\$\(which\s+([\w.-]+)\)", r"\1", command)
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an unbalanced quote in prose: words are enough to find flags
        return command.split()


def _invocations(tokens: list[str], pipes: bool) -> list[tuple[str, list[str]]]:
    """(console script, its arguments) for each cusa command in a tokenised command line."""
    found = []
    segments = [[]]
    for token in tokens:
        if pipes and token in _SEGMENT_ENDS:
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        for i, token in enumerate(segment):
            name = os.path.basename(token)
            if name in SCRIPTS:
                found.append((name, segment[i + 1:]))
                break
            if token == "-m" and i + 1 < len(segment) and segment[i + 1] in MODULE_SCRIPTS:
                found.append((MODULE_SCRIPTS[segment[i + 1]], segment[i + 2:]))
                break
    return found


def _documented_invocations() -> list[tuple[str, str, list[str]]]:
    """(where, console script, arguments) of every cusa command line in the documents: shell blocks and inline code
    that starts with a console script. docs/commands.md is left out: it is written from the commands."""
    found = []
    for path in DOCUMENTS:
        if path == GENERATED:
            continue
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO)
        _, blocks = _prose_and_blocks(text)
        for first, info, lines in blocks:
            if info in SHELL_BLOCKS:
                for command in _shell_lines(lines):
                    found += [(f"{rel}:{first} `{command.strip()}`", *inv)
                              for inv in _invocations(_split(command), pipes=True)]
        for span in _code_spans(text):
            if span.split(" ")[0] in SCRIPTS:
                tokens = [t.strip("[]()") for t in _split(span)]
                found += [(f"{rel} `{span}`", *inv) for inv in _invocations(tokens, pipes=False)]
    return found


def _resolve(script: str, args: list[str]) -> tuple[command_docs.CommandDoc, list[str]]:
    """The command a line runs (a group's subcommand chosen by its first word) and the arguments left for it."""
    doc = SCRIPTS[script]
    while isinstance(doc.command, click.Group):
        words = [a for a in args if not a.startswith("-")]
        if not words:
            return doc, args
        choices = words[0].split("|")  # `cusa-cache info|verify|neighbors URL`: each must exist
        for choice in choices:
            assert f"{doc.name} {choice}" in COMMANDS, f"{doc.name} has no subcommand {choice!r}"
        args = args[args.index(words[0]) + 1:]
        doc = COMMANDS[f"{doc.name} {choices[0]}"]
    return doc, args


def _check_arguments(doc: command_docs.CommandDoc, args: list[str]) -> list[str]:
    """Problems with the options of one command line: unknown flags, and literal values a Choice refuses."""
    problems = []
    by_name = {n: p for p in command_docs.options(doc.command) for n in (*p.opts, *p.secondary_opts)}
    names = command_docs.option_names(doc.command, doc.context)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token == "-" or re.match(r"^-\d", token) or token == "...":
            continue
        name, _, inline = token.partition("=")
        if "/--" in name:  # `--text-teacher/--image-teacher`: two options named at once
            problems += [f"{doc.name} has no option {n}" for n in name.split("/") if n not in names]
            continue
        if name not in names:
            problems.append(f"{doc.name} has no option {name}")
            continue
        param = by_name.get(name)
        if param is None or param.is_flag:
            continue
        value = inline or (args[i] if i < len(args) else "...")
        i += 0 if inline else 1
        if isinstance(param.type, click.Choice):
            for v in value.split("|"):
                if not _PLACEHOLDER.match(v) and v not in param.type.choices:
                    problems.append(f"{doc.name} {name} does not accept {v!r} (choices: {param.type.choices})")
    return problems


def _setting_problem(assignment: str, student: str | None = None) -> str | None:
    """Why ``KEY=VALUE`` (one `--set`, or one value of a `--grid` axis) is not a cusa-train setting, or None; with the
    ``--student`` its command line names, where it does (some settings are for some students only)."""
    from train.config import build_config

    key, _, value = assignment.partition("=")
    if not value or _PLACEHOLDER.match(key):
        return None
    # without a --student on its line, a setting of some students only (cross_head) is fine for one of them
    students = [student] if student and not _PLACEHOLDER.search(student) else [None, "open_clip:ViT-B-32"]
    for v in value.split("|"):
        errors = []
        for s in students:
            try:
                build_config("paper", flags={"student": s} if s else {}, overrides=[f"{key}={v}"])
                break
            except ValueError as exc:
                errors.append(exc)
        else:
            exc = errors[0]
            if re.search(r"unknown (\w+ )?setting", str(exc)) or not _PLACEHOLDER.match(v):
                return f"--set {key}={v}: {exc}"
    return None


# ---------------------------------------------------------------------------------------------- the README
def test_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_LIMIT, f"README.md has {lines} lines; move detail to docs/"


def test_readme_gives_the_demo_and_the_test_command_in_a_shell_block_and_ci_runs_the_test_command():
    _, blocks = _prose_and_blocks(README.read_text(encoding="utf-8"))
    commands = {line.split("#")[0].strip() for _, info, lines in blocks if info in SHELL_BLOCKS for line in lines}
    assert {DEMO_COMMAND, TEST_COMMAND} <= commands
    assert (REPO / "scripts" / "demo.sh").is_file() and (REPO / "scripts" / "test.sh").is_file()
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_links_every_page_of_docs():
    linked = {target.split("#")[0] for _, target in _links(README)}
    missing = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md")
                     if p.relative_to(REPO).as_posix() not in linked)
    assert not missing, f"pages of docs/ the README does not link: {missing}"


# ---------------------------------------------------------------------------------------------- links and citations
def test_every_relative_link_and_anchor_in_the_documents_resolves():
    broken = []
    for path in DOCUMENTS:
        for number, target in _links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(REPO)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} (no heading with this anchor)")
    assert not broken, "\n".join(broken)


def test_link_checking_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading: with punctuation\n\n[ok](#a-code-heading-with-punctuation) "
                    "[gone](other.md) [bad](#nowhere)\n```bash\n[in code](ignored.md)\n```\n", encoding="utf-8")
    assert _anchors(page) == {"title", "a-code-heading-with-punctuation"}
    assert [t for _, t in _links(page)] == ["#a-code-heading-with-punctuation", "other.md", "#nowhere"]


def test_every_document_the_repository_cites_is_in_the_repository():
    """A path to a .md document named in code or docs (a top-level folder's, or an upper-case name such as
    README.md) exists; names of files that commands write (report.md, results.md, examples.md) are not citations."""
    top = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    cited: dict[str, str] = {}
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".egg-info") and d not in ("runs",
                                                                                                       "build")]
        for file in files:
            path = Path(folder) / file
            if path.suffix not in (".py", ".md", ".toml"):
                continue
            for name in re.findall(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b", path.read_text(errors="replace")):
                name = name.lstrip("./")
                if name.split("/")[0] in top or ("/" not in name and name[:-3].isupper()):
                    cited.setdefault(name, str(path.relative_to(REPO)))
    missing = {name: where for name, where in cited.items() if not (REPO / name).is_file()}
    assert "docs/method.md" in cited and not missing, missing


def test_every_source_file_the_documents_name_exists():
    """`train/chunk_order.py`, `benchmarks/bench_stream.py`, `tests/servers.py`: a code path a document names is a
    file of the repository (paths under data/ are examples of a user's data, not citations)."""
    packages = ("pipeline", "train", "teacher_cache", "tests", "benchmarks", "scripts", "docs")
    pattern = re.compile(r"\b((?:%s)/[\w/.-]*\w\.(?:py|md|sh))\b" % "|".join(packages))
    missing = [f"{path.relative_to(REPO)}: {name}" for path in DOCUMENTS
               for name in pattern.findall(path.read_text(encoding="utf-8")) if not (REPO / name).is_file()]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------- commands
def test_commands_page_is_what_the_commands_generate():
    assert GENERATED.read_text(encoding="utf-8") == command_docs.page(), (
        "docs/commands.md differs from the commands; run: .venv/bin/python scripts/command_docs.py > docs/commands.md")


def test_every_option_of_every_console_script_is_in_its_section_of_the_commands_page():
    text = GENERATED.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^#{2,3} (cusa-[\w -]+)\n(.*?)(?=^#{2,3} cusa-|\Z)", text, re.M | re.S))
    assert set(sections) == set(COMMANDS), "every command and subcommand has a section"
    missing = [f"{name} {opt}" for name, doc in COMMANDS.items() for p in command_docs.options(doc.command)
               for opt in (*p.opts, *p.secondary_opts) if f"`{opt}`" not in sections[name]]
    assert not missing, missing
    assert set(command_docs.console_scripts()) >= {"cusa-cache", "cusa-train", "cusa-eval", "cusa-ablate",
                                                   "cusa-search"}


def test_every_command_takes_h_help_and_json_as_the_commands_page_says():
    assert "Every command takes `-h` / `--help` and prints its result as JSON with `--json`" in GENERATED.read_text(
        encoding="utf-8")
    lacking = [name for name, doc in COMMANDS.items() if not isinstance(doc.command, click.Group)
               and not {"-h", "--help", "--json"} <= command_docs.option_names(doc.command, doc.context)]
    assert not lacking, lacking


def test_every_cusa_command_line_in_the_documents_names_a_real_subcommand_and_real_options():
    invocations = _documented_invocations()
    assert len(invocations) > 40  # the README's examples alone hold 18
    problems = []
    for where, script, args in invocations:
        try:
            doc, rest = _resolve(script, args)
        except AssertionError as exc:
            problems.append(f"{where}: {exc}")
            continue
        problems += [f"{where}: {p}" for p in _check_arguments(doc, rest)]
    assert not problems, "\n".join(problems)


def test_every_setting_the_documents_set_or_grid_is_a_training_setting():
    assignments = []
    for path in DOCUMENTS:
        for line in path.read_text(encoding="utf-8").splitlines():
            student = re.search(r"--student[ =]([^\s`]+)", line)
            for flag, value in re.findall(r"(--set|--grid)[ =]([\w.]+=[^\s`'\"),]*(?:,[^\s`'\"),]+)*)", line):
                key, _, values = value.partition("=")
                for v in (values.split(",") if flag == "--grid" else [values]):
                    if v not in ("", "..."):
                        assignments.append((path.relative_to(REPO), f"{key}={v}", student and student.group(1)))
    assert len(assignments) > 30
    problems = [f"{where}: {p}" for where, a, student in assignments if (p := _setting_problem(a, student))]
    assert not problems, "\n".join(problems)


def test_every_flag_the_documents_name_is_an_option_of_a_cusa_command_or_of_the_script_shown():
    """A `--flag` anywhere in a document is one a cusa command takes, one the benchmark or script named on its line
    takes (its source declares it; on the benchmarks page, any benchmark's), or one of another program shown beside
    them (torchrun, tensorboard, open_clip, CLIP_benchmark's eval)."""
    cusa_flags = set().union(*(command_docs.option_names(d.command, d.context) for d in COMMANDS.values()))
    clip_benchmark_flags = _clip_benchmark_flags()
    script_sources = {p.name: p.read_text(encoding="utf-8")
                      for p in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]}
    unknown = []
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            scripts = [s for s in script_sources if s in line]
            if not scripts and path.name == "benchmarks.md":
                scripts = [s for s in script_sources if s.startswith("bench_")]
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", line):
                if flag in cusa_flags or flag in OTHER_TOOLS_FLAGS or flag in clip_benchmark_flags:
                    continue
                if scripts and any(f'"{flag}"' in script_sources[s] for s in scripts):
                    continue
                unknown.append(f"{path.relative_to(REPO)}:{number}: {flag}")
    assert not unknown, "\n".join(unknown)


def test_the_command_line_checks_catch_a_wrong_subcommand_option_choice_and_setting():
    doc, rest = _resolve("cusa-cache", ["build", "data.json", "--out", "s", "--device", "tpu", "--nope"])
    assert doc.name == "cusa-cache build"
    assert _check_arguments(doc, rest) == [
        "cusa-cache build --device does not accept 'tpu' (choices: ('auto', 'cpu', 'cuda'))",
        "cusa-cache build has no option --nope"]
    with pytest.raises(AssertionError, match="no subcommand 'bild'"):
        _resolve("cusa-cache", ["bild", "data.json"])
    assert _invocations(_split("torchrun --nproc_per_node 4 $(which cusa-train) --data x"), pipes=True) == [
        ("cusa-train", ["--data", "x"])]
    assert _invocations(_split("torchrun -m pipeline.cli build a --out b  # comment --nope"), pipes=True) == [
        ("cusa-cache", ["build", "a", "--out", "b"])]
    assert _setting_problem("csa.rate=0.2") is None and _setting_problem("soft_labels.window=W") is None
    assert "unknown loss setting" in _setting_problem("csa.rat=0.2")
    assert "unknown setting" in _setting_problem("nosuch=1")
    assert "must be a number" in _setting_problem("csa.rate=high")
