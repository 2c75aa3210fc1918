"""`longconv tokenizer`: train a tokenizer from local text, or encode / decode with a saved one.

    longconv tokenizer train --input data/input.txt --vocab-size 4096 --out runs/spm4k [--kind sentencepiece]
    longconv tokenizer train --input data/input.txt --kind char --out runs/char
    longconv tokenizer encode --tokenizer runs/spm4k "Hello world"
    longconv tokenizer decode --tokenizer runs/spm4k 1 2 3
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="build a tokenizer from local text files and save it to a directory")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="local .txt / .jsonl / .parquet files, directories or globs")
    train.add_argument("--out", required=True, metavar="DIR", help="output directory (tokenizer.json [+ tokenizer.model])")
    train.add_argument("--kind", choices=("sentencepiece", "char", "byte"), default="sentencepiece")
    train.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (sentencepiece; required)")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="sentencepiece algorithm")
    train.add_argument("--byte-fallback", choices=("auto", "on", "off"), default="auto",
                       help="encode unseen characters as bytes (sentencepiece; auto = on when vocab >= 1024)")
    train.add_argument("--text-field", default="text", help="text column of JSONL / Parquet inputs")

    encode = sub.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--tokenizer", required=True, metavar="DIR", help="saved tokenizer directory or .model file")
    encode.add_argument("text", nargs="?", default=None, help="text to encode (default: read standard input)")
    encode.add_argument("--pieces", action="store_true", help="also print each token's text")

    decode = sub.add_parser("decode", help="print the text of token ids")
    decode.add_argument("--tokenizer", required=True, metavar="DIR", help="saved tokenizer directory or .model file")
    decode.add_argument("ids", nargs="+", type=int)


def main(args: argparse.Namespace) -> int:
    from lm.data.config import DataError
    from lm.data.tokenizers import load_tokenizer, train_tokenizer

    try:
        if args.tokenizer_command == "train":
            options = {}
            if args.kind == "sentencepiece":
                options = {"model_type": args.model_type,
                           "byte_fallback": {"auto": None, "on": True, "off": False}[args.byte_fallback]}
            tok = train_tokenizer(args.kind, args.input, args.out, args.vocab_size, args.text_field, **options)
            print(json.dumps({"out": args.out, "kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id}))
            return 0
        tok = load_tokenizer(args.tokenizer)
        if args.tokenizer_command == "encode":
            text = sys.stdin.read() if args.text is None else args.text
            ids = tok.encode(text)
            print(" ".join(map(str, ids)))
            if args.pieces:
                print(json.dumps([tok.decode([i]) for i in ids], ensure_ascii=False))
            return 0
        if args.tokenizer_command == "decode":
            print(tok.decode(args.ids))
            return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2
