"""The README's quick-start commands work as pasted, and CI runs exactly the test one."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    section = readme[start:readme.index("\n## ", start)]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_two_one_line_commands_that_need_no_activated_environment():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert commands[0].endswith("twistproxy demo") and "pytest" in commands[1]
    # a fresh Debian has no `python` and refuses a system-wide `pip install`
    for command in commands:
        for step in command.split("&&"):
            program = step.split()[0]
            assert program == "python3" or program.startswith(".venv/bin/"), step


def test_ci_runs_exactly_the_readme_test_command():
    lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip()]
    assert lines[-1] == quick_start_commands()[1]
