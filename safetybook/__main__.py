"""Command line: the book's measurements on a reader's own prompts.

    python -m safetybook score --model base --prompts my_prompts.txt

Bad input gets one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m safetybook", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    score = sub.add_parser("score", help="probability that the model opens with a refusal")
    score.add_argument("--model", default="base", help="base, tuned, repaired or a hub id")
    score.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or text, one per line")
    return parser


def cmd_score(args: argparse.Namespace) -> None:
    from .data import read_prompt_file
    from .models import load_model, model_folder

    prompts = read_prompt_file(args.prompts)
    if "/" not in args.model:
        model_folder()  # a missing model package is reported before anything heavy happens
    model, tok = load_model(args.model)
    from .refusal import refusal_score

    for prompt, score in zip(prompts, refusal_score(model, tok, prompts)):
        print(json.dumps({"prompt": prompt, "refusal": round(score, 4)}), flush=True)


COMMANDS = {"score": cmd_score}


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .models import ModelError

    try:
        args = build_parser().parse_args(argv)
        COMMANDS[args.command](args)
    except (_UsageError, DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
