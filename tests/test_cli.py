"""The `longconv` command: every subcommand parses its help, and `mixers` prints the table."""

import os
import signal
import sys
import threading
import time

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


def test_sigterm_acts_like_ctrl_c_while_a_command_runs(monkeypatch):
    """SIGTERM during a command raises KeyboardInterrupt in it (training checkpoints and MQAR records its
    cut runs on that), with the previous handler back for a second SIGTERM and after the command."""
    if threading.current_thread() is not threading.main_thread():
        pytest.fail("signal handlers need the main thread; this test must run there")
    seen = {}

    class FakeCommand:
        @staticmethod
        def add_arguments(parser):
            pass

        @staticmethod
        def main(args):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(2)
            except KeyboardInterrupt:
                seen["handler"] = signal.getsignal(signal.SIGTERM)
                return 130
            return 0

    monkeypatch.setitem(sys.modules, "fake_command", FakeCommand)
    monkeypatch.setitem(COMMANDS, "fake", ("fake_command", "a command that is sent SIGTERM"))
    def unmapped(signum, frame):  # what runs if the command does not map SIGTERM (instead of the default: exit)
        seen["unmapped"] = True

    before = signal.signal(signal.SIGTERM, unmapped)
    try:
        assert main(["fake"]) == 130 and "unmapped" not in seen
        assert seen["handler"] is unmapped and signal.getsignal(signal.SIGTERM) is unmapped
    finally:
        signal.signal(signal.SIGTERM, before)
