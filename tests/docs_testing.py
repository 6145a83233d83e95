"""Command lines quoted in README.md and launch/README.md, extracted as a reader would type them.

A quoted command is a line of a fenced block that starts with `vdit COMMAND` (COMMAND one of the
CLI's), `$ vdit COMMAND`, `launch/...` or `export NAME=...`, with its `\\` continuation lines; a
bash `for VAR in A B C; do ... done` loop around such lines is expanded; `# ...` comments end a
line and `[...]` marks optional flags (dropped). Output lines of the examples (`+ gcloud ...`,
`vdit plan: ...`, tables) are not commands.
"""

from __future__ import annotations

import os
import re
import shlex

from vdit.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOR = re.compile(r"^for (\w+) in ([^;]+); do$")


def fenced_blocks(path: str) -> list[list[str]]:
    """The lines of every ``` block of a markdown file."""
    blocks, current = [], None
    with open(path) as f:
        for line in f:
            if line.startswith("```"):
                if current is None:
                    current = []
                else:
                    blocks.append(current)
                    current = None
            elif current is not None:
                current.append(line.rstrip("\n"))
    return blocks


def _is_command(line: str) -> bool:
    words = line.split()
    if not words:
        return False
    if words[0] == "vdit":
        return len(words) > 1 and words[1] in COMMANDS
    return words[0].startswith("launch/") or (words[0] == "export" and "=" in line)


def commands(path: str) -> list[list[str]]:
    """Every quoted command of the file at `path`, in order, as argument lists."""
    out = []
    for block in fenced_blocks(path):
        lines = [line.strip().removeprefix("$ ") for line in block]
        i, loop = 0, None
        while i < len(lines):
            line = lines[i]
            match = FOR.match(line)
            if match:
                loop = (match.group(1), match.group(2).split(), [])
            elif line == "done" and loop:
                var, values, body = loop
                out += [[w.replace(f"${var}", v) for w in cmd] for v in values for cmd in body]
                loop = None
            elif _is_command(line):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i]
                words = shlex.split(re.sub(r"\[[^\]]*\]", "", line), comments=True)
                (loop[2] if loop else out).append(words)
            i += 1
    return out
