"""The words of the report, kept in report_template.md apart from the code that picks them."""

from __future__ import annotations

import re
from pathlib import Path

from .recipes import ARMS, EVALS

TEMPLATE = Path(__file__).resolve().with_name("report_template.md")


def load_template(path: Path) -> dict[str, str]:
    """The template's blocks by name: each starts at a line `<!-- name -->` and runs to the next, blank lines at
    its ends left out."""
    blocks, name = {}, None
    for line in path.read_text().split("\n"):
        marker = re.fullmatch(r"<!-- ([\w.]+) -->", line)
        if marker:
            name = marker[1]
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in blocks.items()}


TEXT = load_template(TEMPLATE)
ARM_NAMES = {arm: TEXT[f"arm.{arm}"] for arm in ARMS}
EVAL_NAMES = {item: TEXT[f"eval.{item}"] for item in EVALS}


def say(name: str, **values) -> str:
    """Block `name` with its {placeholders} filled in."""
    return TEXT[name].format(**values)


def block(name: str, **values) -> list[str]:
    """say() as lines of the page."""
    return say(name, **values).split("\n")
