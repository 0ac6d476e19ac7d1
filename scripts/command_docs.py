"""docs/commands.md, written from the commands themselves: every console script of pyproject.toml, every subcommand,
every option with what it takes, its default and its help. Nothing in that page is typed by hand, so it cannot drift
from the code; tests/test_docs.py checks that the page is what this script writes now.

    .venv/bin/python scripts/command_docs.py > docs/commands.md
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import click

REPO = Path(__file__).resolve().parent.parent
PAGE = "docs/commands.md"

# Where each command's behaviour is described; the generated page links there.
TOPICS = {
    "cusa-cache": ("cache.md", "Building and checking a teacher cache"),
    "cusa-cache push": ("remote.md", "Teacher caches at a URL"),
    "cusa-cache pull": ("remote.md", "Teacher caches at a URL"),
    "cusa-cache demo-data": ("data.md", "Data formats"),
    "cusa-cache import-features": ("data.md", "Data formats"),
    "cusa-cache import-clip-retrieval": ("data.md", "Data formats"),
    "cusa-cache upgrade": ("data.md", "Data formats"),
    "cusa-train": ("training.md", "Training"),
    "cusa-ablate": ("training.md", "Training"),
    "cusa-eval": ("evaluation.md", "Evaluation and search"),
    "cusa-search": ("evaluation.md", "Evaluation and search"),
    "cusa-export": ("export.md", "Export"),
}


@dataclass(frozen=True)
class CommandDoc:
    """One command as a user types it: ``cusa-cache build``, ``cusa-train``."""

    name: str
    command: click.Command
    context: click.Context


def console_scripts(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """``{script name: "module:attribute"}`` of the [project.scripts] table, in the file's order."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the table is plain `name = "module:attr"` lines
        section = re.search(r"^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        pairs = re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', section.group(1) if section else "", re.M)
        return dict(pairs)
    return dict(tomllib.loads(text).get("project", {}).get("scripts", {}))


def load_script(target: str) -> click.Command:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def walk(name: str, command: click.Command, parent: click.Context | None = None) -> Iterator[CommandDoc]:
    """The command and, for a group, each subcommand in the order the code defines them."""
    # as click makes it when the command runs: context_settings (e.g. -h for help) apply, and a subcommand inherits
    context = click.Context(command, info_name=name.split(" ")[-1], parent=parent, **command.context_settings)
    yield CommandDoc(name, command, context)
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            if not sub.hidden:
                yield from walk(f"{name} {sub_name}", sub, context)


def all_commands() -> list[CommandDoc]:
    """Every command of every console script, groups included."""
    return [doc for name, target in console_scripts().items() for doc in walk(name, load_script(target))]


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def option_names(command: click.Command, context: click.Context | None = None) -> set[str]:
    """Every spelling of every option, ``--help`` included."""
    names = {n for p in options(command) for n in (*p.opts, *p.secondary_opts)}
    help_option = command.get_help_option(context or click.Context(command))
    return names | (set(help_option.opts) if help_option else set())


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _takes(param: click.Option, context: click.Context) -> str:
    if param.is_flag and not param.secondary_opts:
        return "flag"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in param.type.choices)
    if param.metavar:
        return f"`{_cell(param.metavar)}`"
    if isinstance(param.type, click.Path):
        word = "DIR" if not param.type.file_okay else "FILE" if not param.type.dir_okay else "PATH"
    elif isinstance(param.type, (click.IntRange, click.FloatRange)):
        word = param.type.name.split(" ")[0].upper()
        low, high = param.type.min, param.type.max
        bound = " ".join(b for b in ((f"≥ {low}" if low is not None and not param.type.min_open else
                                      f"> {low}" if low is not None else ""),
                                     f"≤ {high}" if high is not None else "") if b)
        return f"`{word}` ({bound})" if bound else f"`{word}`"
    else:
        word = param.type.name.upper()
    return f"`{word}`"


def _default(param: click.Option, context: click.Context) -> str:
    if param.required:
        return "required"
    value = param.get_default(context, call=False)
    unset = getattr(click.core, "UNSET", None)  # click 8.3+: an option given no default holds this sentinel
    if param.is_flag or value is None or value is unset or callable(value) or value in ((), []):
        return ""
    return f"`{value}`"


def _usage(doc: CommandDoc) -> str:
    pieces = doc.command.collect_usage_pieces(doc.context)
    return " ".join([doc.name, *pieces])


def _help(command: click.Command) -> str:
    text = (command.help or "").replace("\b\n", "")
    return " ".join(text.split())


def _topic(name: str) -> str:
    head = name if name in TOPICS else name.split(" ")[0]
    if head not in TOPICS or not (REPO / "docs" / TOPICS[head][0]).is_file():
        return ""
    file, title = TOPICS[head]
    return f"More: [{title}]({file})."


def _anchor(name: str) -> str:
    return "#" + re.sub(r"[^\w -]", "", name.lower()).replace(" ", "-")


def command_section(doc: CommandDoc) -> list[str]:
    level = "##" if " " not in doc.name else "###"
    lines = [f"{level} {doc.name}", "", f"`{_usage(doc)}`", "", _help(doc.command)]
    if isinstance(doc.command, click.Group):
        lines += ["", *(f"- [`{doc.name} {n}`]({_anchor(f'{doc.name} {n}')}): {_cell(c.get_short_help_str(90))}"
                        for n, c in doc.command.commands.items() if not c.hidden)]
    topic = _topic(doc.name)
    if topic and (" " in doc.name or not isinstance(doc.command, click.Group)):
        lines += ["", topic]
    params = options(doc.command)
    if params and not isinstance(doc.command, click.Group):
        lines += ["", "| option | takes | default | what |", "| --- | --- | --- | --- |"]
        for p in params:
            names = ", ".join(f"`{n}`" for n in (*p.opts, *p.secondary_opts))
            env = f" (also `${p.envvar}`)" if isinstance(p.envvar, str) else ""
            lines.append(f"| {names} | {_takes(p, doc.context)} | {_default(p, doc.context)} | {_cell(p.help or '')}{env} |")
    return lines + [""]


def page() -> str:
    docs = all_commands()
    lines = [
        "# Commands",
        "",
        f"<!-- Generated from the click commands: edit them, then run",
        f"     .venv/bin/python scripts/command_docs.py > {PAGE} -->",
        "",
        "Every command takes `-h` / `--help` and prints its result as JSON with `--json`. A mistake in a command line or",
        "its input ends in one line naming the file, row or option and what is wrong, never a traceback. Options",
        "that say how a dataset is read (`--format`, `--image-key`, `--caption-key`, `--id-field`, `--manifest-cache`)",
        "mean the same in every command: [data formats](data.md).",
        "",
        *(f"- [`{d.name}`]({_anchor(d.name)}): {_cell(d.command.get_short_help_str(100))}" for d in docs
          if " " not in d.name),
        "",
    ]
    for doc in docs:
        lines += command_section(doc)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
