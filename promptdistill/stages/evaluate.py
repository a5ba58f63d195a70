"""Stage 4, evaluate: how much of the prompted behaviour did the student keep, and what
does dropping the prompt save?

On the held-out test split, four answerers reply to each query:
  teacher        the teacher WITH the prompt (its answers from teacher.jsonl)
  teacher_again  the teacher WITH the prompt, another seed: the ceiling, since a
                 teacher is not even identical to itself
  student        student model + adapter, NO prompt
  base           student model, NO adapter, NO prompt: the floor
and three independent scores compare them with the teacher: semantic similarity
(MiniLM cosine), likelihood (teacher-forced NLL of the teacher's answer) and persona
consistency (a classifier trained on the train split to tell teacher-style answers from
base-style ones). Each score gives quality retained = (student - base) / (ceiling - base).
Token counts come from the real tokenizers, latency is measured here, and cost follows
from the config's pricing section. Per-query rows go to eval.jsonl; every headline
number to summary.json (keys documented in docs/summary.md).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time

import numpy as np
from tqdm import tqdm

from .. import best_of, judge, rules, scores
from ..backends.base import Completion, SamplingParams
from ..backends.local import AnswerScorer, LocalSampler, load_causal_lm
from ..config import RunConfig
from ..models import check_adapter, resolve_model
from ..render import RenderError, prompt_ids, render_example, to_datum
from ..rundir import (RunDir, StageError, Timer, atomic_write_json, atomic_write_text, fingerprint, fmt_seconds,
                      json_safe, read_jsonl, sha256_file)
from .generate import answer_settings, row_seed, sampling_params
from .train import load_split


def student_messages(query: str) -> list[dict]:
    return [{"role": "user", "content": query}]


class Models:
    """The student base model with its adapter (switchable off for `base`) and the
    teacher, loaded once; when teacher and student are the same model, one copy serves both."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        student_dir = check_adapter(run.student, cfg.student.model)
        self.student, self.tokenizer = load_causal_lm(student_dir, cfg.student.device, adapter_dir=run.student)
        if cfg.teacher.model == cfg.student.model:
            self.teacher, self.teacher_tokenizer, self.shared = self.student, self.tokenizer, True
        else:
            self.teacher, self.teacher_tokenizer = load_causal_lm(resolve_model(cfg.teacher.model), cfg.teacher.device)
            self.shared = False
        self.batch_size = cfg.sampling.batch_size

    def adapter(self, on: bool):
        return contextlib.nullcontext() if on else self.student.disable_adapter()

    def teacher_context(self):
        return self.student.disable_adapter() if self.shared else contextlib.nullcontext()

    def sampler(self, who: str) -> LocalSampler:
        if who == "teacher":
            return LocalSampler(self.teacher, self.teacher_tokenizer, self.batch_size)
        return LocalSampler(self.student, self.tokenizer, self.batch_size)

    def context(self, who: str):
        return self.teacher_context() if who == "teacher" else self.adapter(on=(who == "student"))


def answer(models: Models, who: str, rows: list[dict], params: SamplingParams, seed_offset: int) -> list[Completion]:
    """Sample answers for `rows` as `who` (teacher: with the prompt; student/base: without)."""
    sampler = models.sampler(who)
    convs = [r["messages"] if who == "teacher" else student_messages(r["query"]) for r in rows]
    seeds = [row_seed(r["key"], params.seed + seed_offset) for r in rows]
    out: list[Completion] = []
    with models.context(who):
        for start in tqdm(range(0, len(rows), models.batch_size), desc=f"eval: {who} answers", unit="batch", leave=False):
            out += sampler.sample(convs[start:start + models.batch_size], params, seeds[start:start + models.batch_size])
    return out


def likelihoods(models: Models, rows: list[dict], system_prompt: str | None, adapter_on: bool) -> np.ndarray:
    """Mean NLL per token of each teacher answer (and its end-of-turn) under the student
    model, with or without the adapter and the system prompt; nan where it cannot render."""
    scorer = AnswerScorer(models.student)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    out = np.full(len(rows), np.nan)
    datums = {}
    for i, r in enumerate(rows):
        try:
            datums[i] = to_datum(render_example(models.tokenizer, head + student_messages(r["query"]), r["answer"], r["id"]))
        except RenderError:
            continue
    index = sorted(datums, key=lambda i: len(datums[i].input_tokens))  # similar lengths, less padding
    with models.adapter(on=adapter_on):
        size = models.batch_size // 2 or 1
        for start in range(0, len(index), size):
            chunk = index[start:start + size]
            for i, (nll, n) in zip(chunk, scorer.per_example([datums[i] for i in chunk])):
                out[i] = nll / n
    return out


def latency(models: Models, who: str, rows: list[dict], params: SamplingParams) -> dict:
    """Median time to first token and total time per query, one query at a time."""
    sampler = models.sampler(who)
    ttft, total = [], []
    with models.context(who):
        for r in rows:
            conv = r["messages"] if who == "teacher" else student_messages(r["query"])
            ids = prompt_ids(sampler.tokenizer, conv)
            sampler.forget_prefix()  # every query pays its own prefill, as a served model would
            first: list[float] = []
            start = time.perf_counter()
            sampler.generate([ids], params, [0], on_token=lambda row, tok: first or first.append(time.perf_counter()))
            total.append(time.perf_counter() - start)
            ttft.append(first[0] - start)
    return {"ttft_ms_median": 1000 * statistics.median(ttft), "total_ms_median": 1000 * statistics.median(total),
            "queries": len(rows)}


def summarise(student: np.ndarray, base: np.ndarray, ceiling: np.ndarray, n_boot: int) -> dict:
    keep = ~(np.isnan(student) | np.isnan(base) | np.isnan(ceiling))
    student, base, ceiling = student[keep], base[keep], ceiling[keep]
    out = {}
    for name, values in (("student", student), ("base", base), ("ceiling", ceiling)):
        mean, lo, hi = scores.bootstrap_ci(values, n_boot=n_boot)
        out[name] = {"mean": mean, "ci95": [lo, hi]}
    value, lo, hi = scores.paired_retained_ci(student, base, ceiling, n_boot=n_boot)
    out["retained"] = {"mean": value, "ci95": [lo, hi]}
    out["n"] = int(keep.sum())
    return out


def cost_section(cfg: RunConfig, run: RunDir, tokens: dict) -> dict | None:
    """Cost per 1M queries for teacher-with-prompt and student-without, the one-time cost
    of the generation and training actually done, and the break-even query count."""
    p = cfg.pricing
    if p is None:
        return None
    per_million = {
        "teacher": p.teacher.million_calls(tokens["teacher_input"], tokens["teacher_output"]),
        "student": p.student.million_calls(tokens["student_input"], tokens["student_output"]),
    }
    teacher_rows = read_jsonl(run.teacher)
    generation = sum(p.teacher.million_calls(r["tokens"]["prompt"], r["tokens"]["completion"]) for r in teacher_rows) / 1e6
    trained_tokens = sum(m.get("tokens", 0) for m in read_jsonl(run.metrics))
    training = trained_tokens * p.training_per_1m_tokens / 1e6
    saving_per_query = (per_million["teacher"] - per_million["student"]) / 1e6
    return {
        "currency": p.currency, "source": p.source, "date": p.date,
        "per_1m_queries": per_million,
        "saving_pct": 100 * (1 - per_million["student"] / per_million["teacher"]),
        "one_time": {"generation": generation, "training": training, "total": generation + training,
                     "trained_tokens": trained_tokens},
        "break_even_queries": (generation + training) / saving_per_query if saving_per_query > 0 else None,
    }


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    adapter = run.student / "adapter_model.safetensors"
    return {"adapter": sha256_file(adapter)[:16] if adapter.exists() else None,
            "eval": cfg.eval.model_dump(exclude_none=True), "sampling": answer_settings(cfg),
            **({"rules": fingerprint([r.model_dump() for r in cfg.checks.rules])} if cfg.checks.rules else {}),
            "pricing": cfg.pricing.model_dump() if cfg.pricing else None}


def run(cfg: RunConfig, run: RunDir) -> str:
    with Timer() as t:
        splits = load_split(cfg, run)
        by_key = {r["key"]: r for r in read_jsonl(run.teacher)}
        test = [dict(r, messages=by_key[r["key"]]["messages"], teacher=by_key[r["key"]]["completion"],
                     teacher_tokens=by_key[r["key"]]["tokens"]) for r in splits["test"]]
        if len(test) < 2:
            raise StageError(f"only {len(test)} usable test answers; eval needs a test split (queries.test > 0)")
        train_rows = splits["train"][: cfg.eval.classifier_train_size]
        models = Models(cfg, run)
        params = sampling_params(cfg)

        answers = {"teacher_again": answer(models, "teacher", test, params, seed_offset=1),
                   "student": answer(models, "student", test, params, seed_offset=0),
                   "base": answer(models, "base", test, params, seed_offset=0)}
        base_train = answer(models, "base", train_rows, params, seed_offset=0)
        print(f"eval: answers done ({fmt_seconds(t.elapsed)}); scoring", flush=True)

        embed = scores.load_embedder()
        reference = [r["teacher"] for r in test]
        texts = {who: [c.text for c in cs] for who, cs in answers.items()}
        similarity = {who: scores.cosine_to_reference(texts[who], reference, embed) for who in texts}

        notes = []
        try:
            classifier = scores.train_text_persona_classifier([r["answer"] for r in train_rows],
                                                              [c.text for c in base_train], embed, seed=0)
            persona = {who: classifier.share_in_persona(texts[who])[1] for who in texts}
        except ValueError as e:  # a smoke run's train split is too small to train and check a classifier
            classifier = persona = None
            notes.append(f"persona score skipped: {len(train_rows)} train answers are too few ({e})")

        nll = {"student": likelihoods(models, test, None, adapter_on=True),
               "base": likelihoods(models, test, None, adapter_on=False),
               "base_with_prompt": likelihoods(models, test, cfg.system_prompt, adapter_on=False)}

        quality = {
            "similarity": summarise(similarity["student"], similarity["base"], similarity["teacher_again"], cfg.eval.bootstrap),
            "likelihood": summarise(nll["student"], nll["base"], nll["base_with_prompt"], cfg.eval.bootstrap),
        }
        if persona is not None:
            in_persona = {who: (p >= 0.5).astype(float) for who, p in persona.items()}
            quality["persona"] = summarise(in_persona["student"], in_persona["base"], in_persona["teacher_again"],
                                           cfg.eval.bootstrap)
            quality["persona"]["classifier"] = {"heldout_accuracy": classifier.heldout_accuracy,
                                                "heldout_n": classifier.heldout_n, "train_n": 2 * len(train_rows)}

        if cfg.checks.rules:
            quality["compliance"], compliance, failed = rules.compliance(
                cfg.checks.rules, [r["query"] for r in test], {"teacher": reference, **texts}, cfg.eval.bootstrap)

        student_in = [len(prompt_ids(models.tokenizer, student_messages(r["query"]))) for r in test]
        tokens = {
            "teacher_input": statistics.mean(r["teacher_tokens"]["prompt"] for r in test),
            "student_input": statistics.mean(student_in),
            "teacher_output": statistics.mean(r["teacher_tokens"]["completion"] for r in test),
            "student_output": statistics.mean(c.completion_tokens for c in answers["student"]),
        }
        tokens["input_reduction_pct"] = 100 * (1 - tokens["student_input"] / tokens["teacher_input"])
        tokens["total_reduction_pct"] = 100 * (1 - (tokens["student_input"] + tokens["student_output"])
                                               / (tokens["teacher_input"] + tokens["teacher_output"]))
        tokens["student_truncated"] = sum(c.finish_reason == "length" for c in answers["student"])
        tokens["teacher_truncated"] = sum(by_key[r["key"]]["finish_reason"] == "length" for r in test)

        timed = test[: cfg.eval.latency_queries]
        greedy = SamplingParams(temperature=0, max_tokens=params.max_tokens)
        lat = {"teacher": latency(models, "teacher", timed, greedy), "student": latency(models, "student", timed, greedy)}
        lat["ttft_ratio"] = lat["student"]["ttft_ms_median"] / lat["teacher"]["ttft_ms_median"]
        lat["total_ratio"] = lat["student"]["total_ms_median"] / lat["teacher"]["total_ms_median"]

        rows = []
        for i, r in enumerate(test):
            rows.append({"id": r["id"], "query": r["query"], "teacher": r["teacher"],
                         **{who: texts[who][i] for who in texts},
                         "similarity": {who: float(similarity[who][i]) for who in similarity},
                         "persona_prob": {who: float(persona[who][i]) for who in persona} if persona else None,
                         "nll": {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in nll.items()},
                         **({"failed_checks": failed[i]} if cfg.checks.rules else {})})
        atomic_write_text(run.root / "eval.jsonl", "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))
        metrics = read_jsonl(run.metrics)
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        summary = {
            "run": cfg.name, "n_test": len(test),
            "models": {"teacher": cfg.teacher.model, "student": cfg.student.model},
            "quality": quality, "tokens": tokens, "latency": lat,
            "cost": cost_section(cfg, run, tokens),
            "training": {"steps": max((m["step"] for m in metrics), default=0),
                         "val_loss_untrained": vals[0] if vals else None, "val_loss_final": vals[-1] if vals else None,
                         "train_examples": len(splits["train"]), "dropped_truncated": len(splits["dropped"])},
        }
        if cfg.checks.rules:
            summary["compliance"] = {"rules": compliance, "teacher_data": best_of.selection_summary(cfg.checks.rules, run)}
        if cfg.eval.judge:
            summary["judge"] = judge.run(cfg, run, test, texts)
        summary["notes"] = notes
        summary["verdict"] = verdict(summary)
        atomic_write_json(run.root / "summary.json", summary)
    retained = ", ".join(f"{k} {v['retained']['mean']:.0%}" for k, v in quality.items())
    return (f"eval: {len(test)} test queries in {fmt_seconds(t.seconds)}; quality retained: {retained}; "
            f"input tokens -{tokens['input_reduction_pct']:.1f}%")


def verdict(summary: dict) -> str:
    """One plain sentence: did it work? A score counts as a win when the student's 95% CI
    lies entirely on the teacher's side of the base's CI."""
    wins = []
    for name, q in summary["quality"].items():
        s, b, c = q["student"]["ci95"], q["base"]["ci95"], q["ceiling"]["mean"]
        better = s[0] > b[1] if c >= q["base"]["mean"] else s[1] < b[0]
        wins.append((name, better, q["retained"]["mean"]))
    won = [n for n, ok, _ in wins if ok]
    retained = ", ".join(f"{n} {r:.0%}" for n, _, r in wins)
    if len(won) == len(wins):
        head = "The distillation worked: without the prompt, the student is clearly closer to the prompted teacher than the base model on every score"
    elif won:
        head = f"The distillation partly worked: the student beats the base clearly on {', '.join(won)} only"
    else:
        head = "The distillation did not work: the student is not clearly closer to the teacher than the base model"
    return f"{head} (quality retained: {retained}); it reads {summary['tokens']['input_reduction_pct']:.0f}% fewer input tokens per query."
