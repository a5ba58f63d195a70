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

A teacher behind an endpoint (teacher.backend openai) is never loaded here: it answers
again there, its latency is timed over streaming, its token counts are the server's usage
generate recorded, and fidelity uses the top-k log-probabilities it returned with its
answers (with token ids); on-policy fidelity, which needs it to score given tokens, is
skipped. summary.json's `sources` says where each teacher figure came from.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import numpy as np

from .. import best_of, judge, kept_skills, labels, rules, scores, tracking
from ..answerers import Models, answer_settings, sampling_params
from ..backends.base import Completion, SamplingParams
from ..config import RunConfig
from ..render import prompt_ids
from ..rundir import (RunDir, StageError, Timer, atomic_write_json, atomic_write_text, fingerprint, fmt_seconds,
                      json_safe, read_jsonl, sha256_file)
from ..verdict import verdict
from . import evaluate_skills
from .evaluate_chats import own_history_kl
from .evaluate_fidelity import divergent_tokens, fidelity_skipped, on_policy_kl, teacher_forced, teacher_topk, topk_k
from .generate import row_seeds
from .train import load_split


def answer(cfg: RunConfig, models: Models, who: str, rows: list[dict], seed_offset: int) -> list[Completion]:
    """Sample answers for `rows` as `who` (teacher: with the prompt; student/base: without),
    each from its teacher row's seed + `seed_offset`; a teacher behind an endpoint answers there."""
    params = sampling_params(cfg)
    convs = [r["messages"] if who == "teacher" else r["prompt"] for r in rows]
    seeds = row_seeds(cfg, [r["identity"] for r in rows], params.seed + seed_offset)
    return models.answer_all(who, convs, params, seeds, desc=f"eval: {who} answers")


def latency(models: Models, who: str, rows: list[dict], params: SamplingParams) -> dict:
    """Median time to first token and total time per query, one query at a time: in this
    process for a local model, over streaming for a teacher behind an endpoint (the time to
    its first text chunk and to its end, as its client sees them)."""
    if who == "teacher" and not models.teacher.local:
        done = models.teacher.sampler().timed([r["messages"] for r in rows], params)
        failed = [c.error for c in done if c.finish_reason == "error"]
        if failed:
            raise StageError(f"eval: timing the teacher at {models.cfg.teacher.base_url} failed: {failed[0]}")
        ttft, total = [c.first_token_s for c in done], [c.total_s for c in done]
    else:
        ttft, total = local_timings(models, who, rows, params)
    return {"ttft_ms_median": 1000 * statistics.median(ttft), "total_ms_median": 1000 * statistics.median(total),
            "queries": len(rows)}


def local_timings(models: Models, who: str, rows: list[dict], params: SamplingParams) -> tuple[list[float], list[float]]:
    """Seconds to the first token and to the end of each row's answer, decoded here."""
    sampler = models.sampler(who)
    ttft, total = [], []
    with models.context(who), sampler.merged():  # merged once, outside the timings
        for r in rows:
            conv = r["messages"] if who == "teacher" else r["prompt"]
            ids = prompt_ids(sampler.tokenizer, conv)
            sampler.forget_prefix()  # every query pays its own prefill, as a served model would
            first: list[float] = []
            start = time.perf_counter()
            sampler.generate([ids], params, [0], on_token=lambda row, tok: first or first.append(time.perf_counter()))
            total.append(time.perf_counter() - start)
            ttft.append(first[0] - start)
    return ttft, total


def openings(test: list[dict], answers: dict[str, list[Completion]], on_policy: dict[str, np.ndarray]
             ) -> dict[str, dict[str, tuple[Completion, float]]]:
    """Each model's answer to the first turn of each test conversation and its on-policy KL, by
    conversation id: its own-history play-out opens with this very answer (the same prompt, the
    same seed), so it is neither sampled nor scored twice."""
    return {who: {r["conversation"]: (answers[who][i], float(on_policy[who][i]))
                  for i, r in enumerate(test) if r["turn"] == 1}
            for who in ("student", "base")}


TURNS = {1: "1", 2: "2", 3: "3+"}  # the turn indices scored apart; the third holds every later turn too


def per_turn(turns: np.ndarray, kl: dict[str, np.ndarray], ceiling: np.ndarray, n_boot: int) -> dict:
    """{"per_turn": {"1": summary, "2": ..., "3+": ...}} of a fidelity score when its answers
    include later turns of conversations, else {}: how much of the prompt's behaviour the student
    keeps as a conversation goes on. Within one turn index each conversation gives one row."""
    turn = np.minimum(turns, 3)
    if turn.max() == 1:
        return {}
    return {"per_turn": {label: scores.summarise(kl["student"][turn == t], kl["base"][turn == t], ceiling[turn == t], n_boot)
                         for t, label in TURNS.items() if (turn == t).any()}}


def weightiest_by_turn(per_turn: dict, ids: list[str], turns: np.ndarray, kl: dict[str, np.ndarray],
                       worst_tokens: list[list[dict] | None]) -> None:
    """Beside each turn's fidelity in `per_turn`: the answer whose leaving out moves its retained most
    (a ratio of summed KLs, so one answer the student gets badly wrong can carry a turn), its KLs,
    its share of the student's KL at that turn, its largest-KL token, and retained without it. A
    reading aid next to the score, never instead of it."""
    turn = np.minimum(turns, 3)
    for t, label in TURNS.items():
        at = np.flatnonzero(turn == t)
        found = scores.most_influential(kl["student"][at], kl["base"][at], np.zeros(len(at)))
        if found is None or label not in per_turn:
            continue
        j, without = found
        i = at[j]
        per_turn[label]["weightiest"] = {
            "id": ids[i], "student": float(kl["student"][i]), "base": float(kl["base"][i]),
            "student_share": float(kl["student"][i] / np.nansum(kl["student"][at])), "retained_without": without,
            "token": max(worst_tokens[i] or [], key=lambda w: w["kl"], default=None)}


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def sources(cfg: RunConfig, models: Models, quality: dict) -> dict[str, str]:
    """Where each teacher figure came from, the teacher's weights here or its endpoint (the report
    shows them); the student's and the base's figures are always this process's."""
    t = cfg.teacher
    where = (f"the endpoint {t.base_url} (model {t.served_name})" if not models.teacher.local
             else "the student's base weights, adapter off" if models.teacher.base_of_adapter else f"the local teacher {t.model}")
    fidelity = quality.get("fidelity", {}).get("source")
    return {
        "teacher": where + ("; no teacher weights loaded here" if not models.teacher.local else ""),
        "teacher_answers": "teacher.jsonl, as generate recorded them",
        "teacher_again": f"the ceiling of similarity and persona: sampled again from {where}",
        "fidelity": ("skipped (see notes)" if not fidelity else
                     f"{fidelity}, returned by the endpoint with its answers (teacher.jsonl)" if not models.teacher.local else
                     f"{fidelity}: {where}, teacher-forced here" if models.full_vocab else
                     f"{fidelity}, recorded with its answers (teacher.jsonl)"),
        "on_policy_fidelity": (f"{where}, scoring the models' own answers" if "on_policy_fidelity" in quality
                               else "skipped (see notes)"),
        "likelihood": "the student's base model WITH the prompt as the ceiling, here",
        "teacher_tokens": ("the server's usage, as generate recorded it in teacher.jsonl" if not models.teacher.local
                           else "the teacher's tokenizer, as generate recorded it in teacher.jsonl"),
        "teacher_latency": (f"over streaming from {t.base_url}: to its first text chunk and its end, as this client "
                            f"sees them" if not models.teacher.local else "decoded in this process"),
        "student": "the student's base model and adapter, in this process",
    }


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
    # With sampling.best_of every try was paid for, kept or not.
    keys = {r["key"] for r in teacher_rows}
    tries = [t for t in read_jsonl(best_of.tries_path(run)) if t["key"] in keys]  # [] without best_of
    paid = tries or teacher_rows
    generation = sum(p.teacher.million_calls(r["tokens"]["prompt"], r["tokens"]["completion"]) for r in paid) / 1e6
    trained_tokens = sum(m.get("tokens", 0) for m in read_jsonl(run.metrics))
    training = trained_tokens * p.training_per_1m_tokens / 1e6
    saving_per_query = (per_million["teacher"] - per_million["student"]) / 1e6
    return {
        "currency": p.currency, "source": p.source, "date": p.date,
        "per_1m_queries": per_million,
        "saving_pct": 100 * (1 - per_million["student"] / per_million["teacher"]),
        "one_time": {"generation": generation, "training": training, "total": generation + training,
                     "trained_tokens": trained_tokens, "teacher_answers_paid": len(paid)},
        "break_even_queries": (generation + training) / saving_per_query if saving_per_query > 0 else None,
    }


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    adapter = run.student / "adapter_model.safetensors"
    return {"adapter": sha256_file(adapter)[:16] if adapter.exists() else None,
            "eval": cfg.eval.model_dump(exclude_none=True), "sampling": answer_settings(cfg),
            **({"rules": fingerprint([r.model_dump() for r in cfg.checks.rules])} if cfg.checks.rules else {}),
            **({"labels": fingerprint(cfg.checks.labels.model_dump())} if cfg.checks.labels else {}),
            **({"skills": fingerprint(text)} if (text := kept_skills.fingerprint_source(cfg.eval.skills)) else {}),
            "pricing": cfg.pricing.model_dump() if cfg.pricing else None}


def run(cfg: RunConfig, run: RunDir) -> str:
    tracking.check(cfg)  # a missing package fails now, not after the whole evaluation
    with Timer() as t:
        splits = load_split(cfg, run)
        by_key = {r["key"]: r for r in read_jsonl(run.teacher)}
        test = [dict(r, messages=by_key[r["key"]]["messages"], teacher=by_key[r["key"]]["completion"],
                     teacher_tokens=by_key[r["key"]]["tokens"], logprobs=by_key[r["key"]].get("logprobs"))
                for r in splits["test"]]
        if len(test) < 2:
            raise StageError(f"only {len(test)} usable test answers; eval needs a test split (queries.test > 0)")
        train_rows = splits["train"][: cfg.eval.classifier_train_size]
        skill_items = kept_skills.load(cfg.eval.skills)  # a bad row fails here, before any model is loaded
        models = Models(cfg, run)
        params = sampling_params(cfg)

        answers = {"teacher_again": answer(cfg, models, "teacher", test, seed_offset=1),
                   "student": answer(cfg, models, "student", test, seed_offset=0),
                   "base": answer(cfg, models, "base", test, seed_offset=0)}
        base_train = answer(cfg, models, "base", train_rows, seed_offset=0)
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

        with Timer() as fidelity_time:
            topk = None if models.full_vocab else teacher_topk(test)
            forced = teacher_forced(models, test, cfg.system_prompt, topk)
            nll, kl = forced["nll"], forced["kl"]
            if topk and np.isnan(kl["student"]).all():  # recorded top-k, but on no answer's tokens
                kl = None
            with Timer() as on_policy_time:
                on_policy = on_policy_kl(models, test, answers) if models.full_vocab else None
            with Timer() as own_time:
                own = own_history_kl(cfg, models, run, openings(test, answers, on_policy)) if models.full_vocab else None
        print(f"eval: teacher-forced scores and fidelity in {fmt_seconds(fidelity_time.seconds)}"
              + (f" (on-policy fidelity {fmt_seconds(on_policy_time.seconds)})" if on_policy is not None else "")
              + (f" (conversations carried by the models themselves {fmt_seconds(own_time.seconds)})" if own else ""),
              flush=True)

        quality = {}
        zero = np.zeros(len(test))  # the prompted teacher's KL to itself: the ceiling of both fidelity scores
        # A conversation's turns are not independent: the bootstrap resamples whole conversations.
        turns = np.array([r["turn"] for r in test])
        groups = np.array([r["conversation"] for r in test]) if turns.max() > 1 else None
        summarise = functools.partial(scores.summarise, n_boot=cfg.eval.bootstrap, groups=groups)
        worst_tokens = [divergent_tokens(models.tokenizer, forced, i) for i in range(len(test))]
        if kl is not None:
            quality["fidelity"] = summarise(kl["student"], kl["base"], zero) | per_turn(turns, kl, zero, cfg.eval.bootstrap)
            if "per_turn" in quality["fidelity"]:
                weightiest_by_turn(quality["fidelity"]["per_turn"], [r["id"] for r in test], turns, kl, worst_tokens)
            quality["fidelity"]["source"] = ("full vocabulary" if models.full_vocab else
                                             f"{'endpoint' if not models.teacher.local else 'teacher'}'s top-{topk_k(topk)} "
                                             f"log-probabilities, renormalised")
            quality["fidelity"]["tokens"] = forced["kl_tokens"]
        else:
            notes.append(fidelity_skipped(models, test, topk))
        if on_policy is not None:
            quality["on_policy_fidelity"] = (summarise(on_policy["student"], on_policy["base"], zero)
                                             | per_turn(turns, on_policy, zero, cfg.eval.bootstrap))
        if own is not None:
            kl_own, conversation, turn = own
            ceiling = np.zeros(len(turn))
            quality["own_history_fidelity"] = (
                scores.summarise(kl_own["student"], kl_own["base"], ceiling, cfg.eval.bootstrap, groups=conversation)
                | per_turn(turn, kl_own, ceiling, cfg.eval.bootstrap))
        elif not models.teacher.local:
            notes.append("on-policy fidelity skipped: the teacher is behind its endpoint, and scoring the models' own "
                         "answers would need its log-probabilities of given tokens (prompt log-probabilities), which "
                         "eval does not ask an endpoint for")
        else:
            notes.append("on-policy fidelity skipped: it needs the teacher to score the student's own answers "
                         "token by token over the student's vocabulary")
        quality["likelihood"] = summarise(nll["student"], nll["base"], nll["base_with_prompt"])
        quality["similarity"] = summarise(similarity["student"], similarity["base"], similarity["teacher_again"])
        if persona is not None:
            in_persona = {who: (p >= 0.5).astype(float) for who, p in persona.items()}
            quality["persona"] = summarise(in_persona["student"], in_persona["base"], in_persona["teacher_again"])
            quality["persona"]["classifier"] = {"heldout_accuracy": classifier.heldout_accuracy,
                                                "heldout_n": classifier.heldout_n, "train_n": 2 * len(train_rows)}

        if cfg.checks.rules:
            quality["compliance"], compliance, failed = rules.compliance(
                cfg.checks.rules, [r["query"] for r in test], {"teacher": reference, **texts}, cfg.eval.bootstrap, groups)
        if cfg.checks.labels:
            quality["label_agreement"], label_section, label_rows = labels.agreement(
                cfg.checks.labels, {"teacher": reference, **texts}, cfg.eval.bootstrap, groups)

        student_in = [len(prompt_ids(models.tokenizer, r["prompt"])) for r in test]
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
            rows.append({"id": r["id"], "query": r["query"],
                         **({"conversation": r["conversation"], "turn": r["turn"]} if groups is not None else {}),
                         "teacher": r["teacher"],
                         **{who: texts[who][i] for who in texts},
                         "similarity": {who: float(similarity[who][i]) for who in similarity},
                         "persona_prob": {who: float(persona[who][i]) for who in persona} if persona else None,
                         "nll": {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in nll.items()},
                         "fidelity_kl": {k: _num(v[i]) for k, v in kl.items()} if kl else None,
                         "on_policy_kl": {k: _num(v[i]) for k, v in on_policy.items()} if on_policy else None,
                         "divergent_tokens": worst_tokens[i],
                         **({"failed_checks": failed[i]} if cfg.checks.rules else {}),
                         **(label_rows[i] if cfg.checks.labels else {})})
        atomic_write_text(run.root / "eval.jsonl", "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in rows))
        metrics = read_jsonl(run.metrics)
        vals = [m["val_loss"] for m in metrics if "val_loss" in m]
        summary = {
            "run": cfg.name, "n_test": len(test),
            "models": {"teacher": cfg.teacher.model, "student": cfg.student.model,
                       **({"teacher_endpoint": cfg.teacher.base_url} if not models.teacher.local else {})},
            "sources": sources(cfg, models, quality),
            "quality": quality, "tokens": tokens, "latency": lat,
            "cost": cost_section(cfg, run, tokens),
            "training": {"steps": max((m["step"] for m in metrics), default=0),
                         "val_loss_untrained": vals[0] if vals else None, "val_loss_final": vals[-1] if vals else None,
                         "train_examples": len(splits["train"]), "dropped_truncated": len(splits["dropped"])},
        }
        if cfg.checks.rules:
            summary["compliance"] = {"rules": compliance, "teacher_data": best_of.selection_summary(cfg.checks.rules, run)}
        if cfg.checks.labels:
            summary["labels"] = label_section
        if skill_items:
            with Timer() as skills_time:
                summary["kept_skills"] = evaluate_skills.run(models, run, skill_items, cfg.eval.bootstrap)
            print(f"eval: kept skills, {len(skill_items)} questions x 3 answerers, in {fmt_seconds(skills_time.seconds)}",
                  flush=True)
        if cfg.eval.judge:
            summary["judge"] = judge.run(cfg, run, test, texts)
        summary["notes"] = notes
        summary["verdict"] = verdict(summary)
        atomic_write_json(run.root / "summary.json", summary)
        tracking.log_eval(cfg, run, summary)
    retained = ", ".join(f"{k} {v['retained']['mean']:.0%}" if v["can_tell"] else f"{k} cannot tell"
                         for k, v in quality.items())
    return (f"eval: {len(test)} test queries in {fmt_seconds(t.seconds)}; quality retained: {retained}; "
            f"input tokens -{tokens['input_reduction_pct']:.1f}%")
