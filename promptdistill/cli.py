"""The `distill` command: verbs that read like English, each calling one stage function.
Parsing and error presentation only; the work happens in pipeline.py and stages/."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .models import ModelError, describe_models, resolve_model
from .render import RenderError
from .rundir import StageError

USER_ERRORS = (ConfigError, StageError, ModelError, RenderError)


def _stage_verb(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a run config (YAML), or a run dir holding config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="move this stage's earlier outputs (and later stages') aside and start it afresh")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Bake a system prompt into a student model's weights.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _stage_verb(sub, "run", "Run every stage in order (queries, generate, train), skipping what is done.",
                "distill run examples/beethoven/config.yaml --set train.steps=20")
    _stage_verb(sub, "queries", "Load, check and split the queries into train/val/test (writes queries.jsonl).",
                "distill queries examples/beethoven/config.yaml")
    _stage_verb(sub, "generate", "Have the teacher answer every query WITH the system prompt (writes teacher.jsonl; resumable).",
                "distill generate runs/beethoven")
    _stage_verb(sub, "train", "Train the LoRA student on the teacher's answers WITHOUT the prompt (writes student/, metrics.jsonl).",
                "distill train runs/beethoven --set train.lr=1e-4")
    models = sub.add_parser("models", help="List the embedded models, or fetch one into the cache.",
                            description="List the embedded models (no model hub needed), or fetch one into the cache.",
                            epilog="examples:\n  distill models\n  distill models fetch smollm2-135m",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    models.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    models.add_argument("name", nargs="?", help="model to fetch (an embedded name, .gguf file or model dir)")
    return parser


def _models(args) -> None:
    if args.action == "fetch":
        if not args.name:
            raise ModelError("distill models fetch NAME: which model? (see `distill models`)")
        print(f"{args.name}: ready at {resolve_model(args.name)}")
        return
    for m in describe_models():
        state = "cached" if m["cached"] else "not fetched yet"
        print(f"{m['name']:16} {m['description']}  [{m['license']}, {m['source']}, {state}]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "models":
            _models(args)
            return 0
        from . import pipeline  # imports torch: only for the verbs that need it

        cfg = load_config(args.config, args.overrides)
        if args.verb == "run":
            pipeline.run_all(cfg, force=args.force)
        else:
            pipeline.run_stage(cfg, args.verb, force=args.force)
        return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: everything finished so far is saved; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
