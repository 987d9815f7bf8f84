"""``--help``: every option of every subcommand explains itself and shows its default or that
it is required; each subcommand ends with examples that its own parser accepts."""

from __future__ import annotations

import argparse
import shlex

import pytest

from embedjob import cli

pytestmark = pytest.mark.unit


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return cli.parser()._subparsers._group_actions[0].choices  # noqa: SLF001


def test_every_option_of_every_subcommand_has_help_and_a_default_or_required() -> None:
    subparsers = _subparsers()
    assert set(subparsers) == set(cli.commands())
    for name, sub in subparsers.items():
        for action in sub._actions:  # noqa: SLF001
            if isinstance(action, argparse._HelpAction):  # noqa: SLF001
                continue
            shown = " / ".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {shown}: no help"
            assert "default" in action.help or "required" in action.help, \
                f"{name} {shown}: help shows no default: {action.help!r}"


def test_required_options_are_marked() -> None:
    def helps(command: str) -> dict[str, str]:
        return {(a.option_strings or [a.metavar])[0]: a.help
                for a in _subparsers()[command]._actions}  # noqa: SLF001

    embed, search = helps("embed"), helps("search")
    assert embed["--input"].endswith("(required; or in --config)")
    assert embed["--output"].endswith("(required; or in --config)")
    assert search["OUTPUT"].endswith("(required)")
    assert embed["--packed"].endswith("(default: off)")
    assert embed["--max-tokens-per-batch"].endswith("(default: 16384)")


@pytest.mark.parametrize("name", sorted(cli.commands()))
def test_each_subcommand_ends_with_examples_its_parser_accepts(name: str) -> None:
    sub = _subparsers()[name]
    help_text = sub.format_help()
    examples = help_text.split("\nexamples:\n", 1)[1].strip().splitlines()
    assert 2 <= len(examples) <= 3, help_text
    for line in examples:
        words = shlex.split(line)
        assert words[:2] == ["embedjob", name], line
        args = cli.parser().parse_args(words[1:])  # argparse errors exit 2: the test fails
        assert args.command == name


def test_top_level_help_is_for_users() -> None:
    text = cli.parser().format_help()
    assert text.startswith("usage: embedjob [-h] [--version] COMMAND ...")
    assert "Embed a text corpus" in text and "start here:" in text
    assert "translated here" not in text  # not the module's docstring
    for name, command in cli.commands().items():
        assert f"{name}" in text and command.help.split()[0] in text
