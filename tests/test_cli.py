"""The `longconv` command: every subcommand parses its help, and `mixers` prints the table."""

import pytest

from lm.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert COMMANDS[command][1] in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_no_command_prints_usage(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_mixers_table_lists_every_mixer(capsys):
    from lm.mixers import MIXERS

    assert main(["mixers", "--d-model", "32", "--max-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "d_model=32" in out
    for name in MIXERS:
        assert f"\n{name} " in out
