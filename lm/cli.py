"""The `longconv` command: one subcommand per module, each a thin layer over the library.

Each command module exposes ``add_arguments(parser)`` and ``main(args)``; modules are imported lazily
so `longconv --help` stays fast. While a command runs, SIGTERM (`kill`, `timeout`, a scheduler's stop)
acts like Ctrl-C: training checkpoints and MQAR records its cut runs before the process exits. This
matters for background jobs, which a non-interactive shell starts with SIGINT ignored. A second SIGTERM
kills at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lm.signals import sigterm_as_interrupt

COMMANDS: dict[str, tuple[str, str]] = {
    "mixers": ("lm.mixer_table", "list every mixer with its parameter count at a given width"),
    "train": ("lm.train", "pretrain an LM from a YAML config (resumes an existing run directory)"),
    "eval": ("lm.evaluate", "evaluate a trained run on its validation data"),
    "tokenizer": ("lm.data.tokenizer_cli", "train or inspect tokenizers"),
    "mqar": ("lm.mqar.runner", "run an MQAR recall sweep from a YAML config"),
    "distill": ("lm.distill.command", "distill a trained run's long filters into modal SSMs"),
    "generate": ("lm.generate", "sample text from a trained or distilled run"),
    "bench": ("kernels.fftconv.bench", "benchmark the fftconv implementations"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="longconv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(command_parser)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    with sigterm_as_interrupt():
        return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
