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
    score.add_argument("--model", default="base", help="base, tuned, repaired, control or a hub id")
    score.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or text, one per line")
    score.add_argument("--intervention", choices=("ablate-refusal", "add-refusal", "conditional", "highlight"),
                       help="remove the model's refusal direction at every layer, add it at its layer, "
                            "add it where the condition gate reads the prompt as harmful and remove it elsewhere, "
                            "or shrink each prompt's tokens that most push towards compliance (Token Highlighter)")
    guard = sub.add_parser("guard", help="probability that each prompt is harmful, from the guard probe (and whether it is flagged)")
    guard.add_argument("--model", default="base", choices=("base", "tuned"), help="whose activations the probe reads")
    guard.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or text, one per line")
    gen = sub.add_parser("generate", help="answers, verified by a monitor before they are shown")
    gen.add_argument("--model", default="base", choices=("base", "tuned", "repaired", "control"),
                     help="which of the book's models")
    gen.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field, or text, one per line")
    gen.add_argument("--monitor", default="none", choices=("none", "probe", "self-check", "keyword"),
                     help="the generation chapter's latent monitor (a harmfulness probe on the request's "
                          "mean activation), the model's self-check, or a keyword filter")
    gen.add_argument("--max-new-tokens", type=_positive, default=24, help="length of each answer in tokens")
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def cmd_score(args: argparse.Namespace) -> None:
    from .data import read_prompt_file
    from .models import model_folder
    from .zoo import load_model

    prompts = read_prompt_file(args.prompts)
    if "/" not in args.model:
        model_folder()  # a missing model package is reported before anything heavy happens
    model, tok = load_model(args.model)
    from contextlib import nullcontext

    from .refusal import refusal_score

    edit = nullcontext()
    if args.intervention == "highlight":
        from .tokens import highlighted

        edit = highlighted(model, tok, prompts)
    elif args.intervention:
        from .interventions import ablate_direction, add_direction, conditionally_steered
        from .zoo import condition_gate, refusal_direction

        found = refusal_direction(args.model)
        if args.intervention == "conditional":
            gate = condition_gate(args.model)
            scores, _ = conditionally_steered(model, tok, prompts, gate, found.vector(), found.layer, found.coefficient,
                                              refusal_score)
        else:
            edit = (ablate_direction(model, found.vector()) if args.intervention == "ablate-refusal"
                    else add_direction(model, found.vector(), found.layer, found.coefficient))
    if args.intervention != "conditional":
        with edit:
            scores = refusal_score(model, tok, prompts)
    for prompt, score in zip(prompts, scores):
        print(json.dumps({"prompt": prompt, "refusal": round(score, 4)}), flush=True)


def cmd_guard(args: argparse.Namespace) -> None:
    from .data import read_prompt_file
    from .models import model_folder
    from .zoo import guard, load_model

    prompts = read_prompt_file(args.prompts)
    model_folder()
    gate = guard(args.model)
    model, tok = load_model(args.model)
    for prompt, p in zip(prompts, gate.probability(model, tok, prompts)):
        print(json.dumps({"prompt": prompt, "harmful": round(float(p), 4), "flagged": bool(p > gate.threshold)}), flush=True)


def cmd_generate(args: argparse.Namespace) -> None:
    from .data import read_prompt_file
    from .models import model_folder
    from .monitor import checked_generate
    from .zoo import load_model, pooled_monitor

    prompts = read_prompt_file(args.prompts)
    model_folder()
    probe, threshold = pooled_monitor(args.model) if args.monitor == "probe" else (None, None)
    model, tok = load_model(args.model)
    for row in checked_generate(model, tok, prompts, args.monitor, args.max_new_tokens, probe=probe,
                                threshold=threshold, reading="mean"):
        print(json.dumps({"prompt": row.prompt, "response": row.response, "blocked": row.blocked,
                          "monitor_score": round(row.monitor_score, 4)}), flush=True)


COMMANDS = {"score": cmd_score, "guard": cmd_guard, "generate": cmd_generate}


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
