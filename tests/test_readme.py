"""The README must describe the code as it is: config reference, commands and recipes."""

import re
from pathlib import Path

from typer.testing import CliRunner

from forkrl.cli import app
from forkrl.config import config_reference_markdown, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_is_current():
    """Regenerate with: python -c 'from tests.test_readme import update; update()'"""
    section = re.search(r"<!-- config-reference:start -->\n(.*)<!-- config-reference:end -->", README, re.S)
    assert section is not None
    assert section.group(1).strip() == config_reference_markdown().strip()


def _commands(*path: str) -> list[str]:
    result = CliRunner().invoke(app, [*path, "--help"])
    return re.findall(r"│ (\w+) ", result.output.split("Commands")[1])


def test_every_cli_command_is_documented():
    for command in _commands():
        if command in ("analyze", "toy", "config"):  # groups: each subcommand must be documented
            for sub in _commands(command):
                assert f"`forkrl {command} {sub}" in README, f"{command} {sub}"
        else:
            assert f"`forkrl {command}" in README, command


def test_every_shipped_recipe_loads_and_is_mentioned():
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(recipe), check_files=False)
        assert recipe.name in README, recipe.name


def update() -> None:
    text = re.sub(
        r"(<!-- config-reference:start -->\n).*(<!-- config-reference:end -->)",
        lambda m: m.group(1) + config_reference_markdown().strip() + "\n" + m.group(2),
        README,
        flags=re.S,
    )
    (ROOT / "README.md").write_text(text, encoding="utf-8")
