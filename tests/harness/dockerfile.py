"""Reading the Dockerfile as Docker does (instructions, stages, COPY sources) and the runtime
stage's environment: for the tests of the image, its security and the KServe store."""

from __future__ import annotations

import json
import re
import shlex

from scripts.serve import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def copy_sources(arguments: str) -> tuple[list[str], dict[str, str]]:
    """Sources and flags of a COPY / ADD (shell or JSON form)."""
    words = shlex.split(arguments)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    if words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    return words[:-1], flags


def image_env(text: str | None = None) -> dict[str, str]:
    """The ENV the serving image's runtime stage (the last) sets."""
    env: dict[str, str] = {}
    for keyword, rest in stages(text if text is not None else DOCKERFILE.read_text())[-1]:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env
