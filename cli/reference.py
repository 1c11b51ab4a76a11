"""The CLI reference, ``docs/cli.md``, generated from every command's ``--help``.

    python -m zoo.cli.reference [PATH]          # write it (default: docs/cli.md)
    python -m zoo.cli.reference --check [PATH]  # exit 1 when it is not current

tests/test_cli_help.py fails when the file in the repository is not current.
"""

from __future__ import annotations

import sys
from pathlib import Path

WIDTH = 80  # the help's width, fixed so the file does not depend on the terminal
DEFAULT = Path("docs/cli.md")


def _help(args: list[str]) -> str:
    from typer.testing import CliRunner

    from zoo.cli.main import app

    result = CliRunner().invoke(app, [*args, "--help"], prog_name="zoo", terminal_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"zoo {' '.join(args)} --help exited {result.exit_code}: {result.output}")
    return result.output.rstrip() + "\n"


def _commands() -> list[list[str]]:
    """Every command's words, depth first, in the order of ``zoo --help``."""
    import typer

    from zoo.cli.main import app

    root = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(group, path: list[str]) -> None:
        for name, cmd in group.commands.items():
            out.append([*path, name])
            if hasattr(cmd, "commands"):
                walk(cmd, [*path, name])

    walk(root, [])
    return out


def render() -> str:
    """The whole reference, as Markdown."""
    from zoo.merge.methods import METHODS

    parts = ["# zoo command reference\n",
             "Generated from `zoo ... --help` by `python -m zoo.cli.reference` (`make docs`); do not edit it by "
             "hand. tests/test_cli_help.py fails when it is not current.\n",
             "## zoo\n", "```text\n" + _help([]) + "```\n"]
    for words in _commands():
        parts += [f"## zoo {' '.join(words)}\n", "```text\n" + _help(words) + "```\n"]
        if words == ["merge"]:
            for name in METHODS:
                text = _help(["merge", "--method", name])
                parts += [f"### zoo merge --method {name}\n",
                          "```text\n" + text[text.index(f"Method {name}:"):] + "```\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    args = [a for a in args if a != "--check"]
    path = Path(args[0]) if args else DEFAULT
    text = render()
    if check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is not current: run `python -m zoo.cli.reference {path}`", file=sys.stderr)
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
