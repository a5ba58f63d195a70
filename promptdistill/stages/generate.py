"""Stage 2, generate: the teacher answers every query WITH the system prompt.

Rows are appended to teacher.jsonl batch by batch and keyed by a hash of (system
prompt, query, model, sampling params), so an interrupted run resumes where it stopped
and a re-run never duplicates a row. Each row is sampled from its own seed (the same hash
over the teacher's identity in place of its spec: a local model dir draws the same answers
wherever it lies), so its answer does not depend on batching or on where a resume began.

A conversation is answered turn by turn: the teacher answers every user turn in order, its own
earlier answers as the history (or the answers the source logged, queries.logged_answers
context), one row per turn. Each round answers the next turn of every conversation at once,
batched across conversations; a turn is done once its row is written, so a resumed run answers
each turn exactly once.

A remote teacher can fail a row even after its retries; such rows are not written to
teacher.jsonl (their keys stay undone, so the next run retries them) but appended to
teacher_errors.jsonl, and the stage then ends with an error instead of being recorded
as finished with rows missing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from datetime import datetime, timezone

from tqdm import tqdm

from .. import best_of, follow_ups, teacher
from ..answerers import answer_settings, row_seed, sampling_params
from ..conversations import answered_turns, history, turn_count, turn_id, turn_identity, user_turns
from ..config import RunConfig
from ..models import model_identity
from ..rundir import (RunDir, StageError, Timer, append_jsonl, atomic_write_json, fingerprint, fmt_seconds, read_jsonl,
                      sha256_text)


def row_key(cfg: RunConfig, query: str, model: str | None = None) -> str:
    """A teacher row's identity in teacher.jsonl, what a resumed run finds done; with `model`,
    the same hash over that in place of the teacher's spec (row_seeds)."""
    return sha256_text(json.dumps([cfg.system_prompt, query, model or cfg.teacher.model, answer_settings(cfg)],
                                  sort_keys=True))[:20]


def row_seeds(cfg: RunConfig, queries: list[str], base_seed: int) -> list[int]:
    """The teacher's seed for each query's row (eval's answers take base_seed + an offset):
    from its key over the teacher's identity (models.model_identity), so a model dir seeds the
    same draws wherever it lies; a named model, whose identity is its spec, its row keys' seeds."""
    identity = model_identity(cfg.teacher.model)
    return [row_seed(row_key(cfg, q, identity), base_seed) for q in queries]


ERRORS_FILE = "teacher_errors.jsonl"


def context_window(sampler) -> int | None:
    """The teacher's context length, when the backend exposes its model's config (local does;
    a remote one does not, and its server refuses an over-long prompt itself)."""
    config = getattr(getattr(sampler, "model", None), "config", None)
    return window_of(config) if config is not None else None


def window_of(model_config) -> int | None:
    """A transformers model config's context length (multimodal configs keep it in their text config)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return getattr(text, "max_position_embeddings", None)


def query_place(q: dict) -> str:
    return f"query {q['id']!r} ({q['source']})"


def last_turn_tokens(cfg: RunConfig, q: dict, count_prompt_tokens, with_prompt: bool = True) -> tuple[int, str, str] | None:
    """How many tokens the last turn of query `q` can reach, read by the teacher (`with_prompt`) or
    by the student: its prompt, plus sampling.max_tokens for each answer written at and before it
    and queries.follow_ups.max_tokens for each user turn a simulated user writes (none is written
    yet); with what the prompt holds and what is added, in words. None if the count is unknown."""
    budget = cfg.sampling.max_tokens
    given, last = user_turns(q), turn_count(q) - 1
    own = 0 if "logged" in q else last  # the answers written before the last turn
    simulated = last + 1 - len(given)
    messages = history(given, q.get("logged", [""] * (len(given) - 1)))
    n = count_prompt_tokens(teacher.with_prompt(cfg, messages) if with_prompt else messages)
    if n is None:
        return None
    need = n + budget * (own + 1) + simulated * cfg.queries.follow_ups.max_tokens
    held = ("system prompt + " if with_prompt else "") + ("query" if len(given) == 1 else f"{len(given)} user turns")
    adds = f"sampling.max_tokens {budget}" + (f" x {own + 1} answers" if own else "") + (
        f" + queries.follow_ups.max_tokens x {simulated} simulated turns" if simulated else "")
    return need, f"its {'teacher' if with_prompt else 'student'} prompt ({held}) is {n} tokens", adds


def context_overflows(cfg: RunConfig, queries: list[dict], count_prompt_tokens, limit: int) -> list[tuple[dict, str]]:
    """(query, what is wrong) for each query whose teacher prompt plus what the teacher and a
    simulated user write before its last answer ends (last_turn_tokens) does not fit in `limit`
    tokens; `count_prompt_tokens(messages)` counts a rendered prompt."""
    out = []
    for q in queries:
        counted = last_turn_tokens(cfg, q, count_prompt_tokens)
        if counted is not None and counted[0] > limit:
            need, prompt, adds = counted
            out.append((q, (f"{prompt}, + {adds} = {need} > the teacher's context of {limit} tokens; shorten the "
                            f"query or the system prompt, or lower sampling.max_tokens"
                            + (" or queries.follow_ups.turns" if q.get("follow_ups") else ""))))
    return out


def check_context(cfg: RunConfig, sampler, todo: list[dict]) -> None:
    """Refuse, before anything is sampled, a query whose prompt plus max_tokens overflows the
    teacher's context: past it a model does not stop with an error, it answers garbage (or
    crashes mid-batch), and the garbage would become training data."""
    limit = context_window(sampler)
    if limit is None:
        return
    over = context_overflows(cfg, todo, sampler.count_prompt_tokens, limit)
    if over:
        q, message = over[0]
        raise StageError(f"{query_place(q)}: {message}" + (f" ({len(over)} queries in all)" if len(over) > 1 else ""))


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    queries = run.queries.read_text(encoding="utf-8") if run.queries.exists() else ""
    return {"system_prompt": sha256_text(cfg.system_prompt)[:16], "teacher_model": cfg.teacher.model,
            "sampling": answer_settings(cfg), "queries": sha256_text(queries)[:16],
            **({"best_of": [cfg.sampling.best_of, fingerprint([r.model_dump() for r in cfg.checks.rules])]}
               if cfg.sampling.best_of else {})}


def turn_rows(cfg: RunConfig, queries: list[dict]) -> list[dict]:
    """Every turn the teacher answers, as the query row of that turn: its id, key, turn (0-based),
    the user turn as "query" (None for one a simulated user is still to write), and the
    conversation's row as "asked"."""
    return [{"id": turn_id(q, t), "key": row_key(cfg, turn_identity(q, t)), "split": q["split"], "turn": t,
             "query": user_turns(q)[t] if t < len(user_turns(q)) else None, "asked": q}
            for q in queries for t in answered_turns(q)]


def run(cfg: RunConfig, run: RunDir) -> str:
    queries = read_jsonl(run.queries)
    if not queries:
        raise StageError(f"{run.queries} is missing or empty; run `distill queries` first")
    done = {r["key"]: r for r in read_jsonl(run.teacher, repair=True)}
    turns = turn_rows(cfg, queries)
    todo = [q for q in turns if q["key"] not in done]
    if not todo:
        return f"generate: all {len(turns)} teacher answers already in {run.teacher.name}" + compliance_note(cfg, run)

    def earlier(q: dict) -> tuple[list[str], list[str]] | None:
        """The user turns and answers before this turn (the logged ones, or the teacher's own, with
        the users' turns as its rows recorded them), None while one is not answered yet."""
        asked = q["asked"]
        if "logged" in asked:
            return user_turns(asked)[:q["turn"]], asked["logged"]
        keys = [row_key(cfg, turn_identity(asked, i)) for i in range(q["turn"])]
        if not all(k in done for k in keys):
            return None
        return [done[k]["messages"][-1]["content"] for k in keys], [done[k]["completion"] for k in keys]

    with Timer() as t:
        prompted = teacher.load(cfg)
        sampler = prompted.sampler()
        check_context(cfg, sampler, [q["asked"] for q in todo])
        params = replace(sampling_params(cfg), top_logprobs=cfg.sampling.top_logprobs)
        picker = best_of.Picker(cfg.checks.rules, cfg.sampling.best_of, run) if cfg.sampling.best_of else None
        size = cfg.sampling.batch_size
        waiting = 0  # turns after one that failed: asked on the next run
        simulator = follow_ups.Simulator(cfg, sampler if follow_ups.writer_model(cfg) == cfg.teacher else None)
        users_written = Counter()  # simulated user turns, by how they came

        def batches():
            """Round by round, a turn once the turn before it is answered (and, for a simulated user's
            turn, written); similar lengths share a batch."""
            nonlocal waiting
            for turn in sorted({q["turn"] for q in todo}):
                level = [(q, before) for q in todo if q["turn"] == turn and (before := earlier(q)) is not None]
                waiting += sum(q["turn"] == turn for q in todo) - len(level)
                to_write = [(q, before) for q, before in level if q["query"] is None]
                written = simulator.next_turns([(q["asked"]["id"], turn_identity(q["asked"], turn), *before)
                                                for q, before in to_write])
                users_written.update(how for _, how in written)
                by_id = {q["id"]: {"query": text, "user": how} for (q, _), (text, how) in zip(to_write, written)}
                ready = []
                for q, (users, answers) in level:
                    q |= by_id.get(q["id"], {})
                    ready.append(q | {"messages": prompted.with_prompt(history(users + [q["query"]], answers))})
                ready.sort(key=lambda q: sum(len(m["content"]) for m in q["messages"]))
                yield from (ready[i:i + size] for i in range(0, len(ready), size))

        with tqdm(total=len(turns), initial=len(turns) - len(todo), desc="generate", unit="answer",
                  dynamic_ncols=True) as bar:  # closed on an error too, so its message starts a new line
            new_tokens = truncated = failed = 0
            cost, price = 0.0, cfg.pricing.teacher if cfg.pricing else None
            for batch in batches():
                convs = [q["messages"] for q in batch]
                seeds = row_seeds(cfg, [turn_identity(q["asked"], q["turn"]) for q in batch], params.seed)
                if picker:  # best-of-N: the kept try, and what the row records about the choice
                    outs, chosen = picker.sample(sampler, batch, convs, params, seeds)
                else:
                    outs, chosen = sampler.sample(convs, params, seeds), [{}] * len(batch)
                good = [(q, conv, out, c) for q, conv, out, c in zip(batch, convs, outs, chosen) if out.finish_reason != "error"]
                rows = [{"id": q["id"], "key": q["key"], "split": q["split"], "model": cfg.teacher.model,
                         **({"conversation": q["asked"]["id"], "turn": q["turn"] + 1} if turn_count(q["asked"]) > 1 else {}),
                         **({"user": q["user"]} if "user" in q else {}),
                         "messages": conv, "completion": out.text, "finish_reason": out.finish_reason,
                         "tokens": {"prompt": out.prompt_tokens, "completion": out.completion_tokens},
                         **({"logprobs": out.logprobs} if out.logprobs is not None else {}), **c}
                        for q, conv, out, c in good]
                done.update((r["key"], r) for r in rows)
                if rows:
                    append_jsonl(run.teacher, rows)
                errors = [{"id": q["id"], "key": q["key"], "error": out.error or "unknown error",
                           "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                          for q, out in zip(batch, outs) if out.finish_reason == "error"]
                if errors:
                    append_jsonl(run.root / ERRORS_FILE, errors)
                failed += len(errors)
                spent = picker.drawn if picker else [o for _, _, o, _ in good]  # best-of: every try drawn is paid for
                new_tokens += sum(o.completion_tokens for o in spent)
                truncated += sum(o.finish_reason == "length" for _, _, o, _ in good)
                if price is not None:  # what this stage has spent so far, at the config's teacher prices
                    cost += sum(price.million_calls(o.prompt_tokens, o.completion_tokens) for o in spent) / 1e6
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{new_tokens / max(t.elapsed, 1e-9):.0f}", truncated=truncated,
                                **({"failed": failed} if failed else {}),
                                **({"cost": f"{cost:.4f} {cfg.pricing.currency}"} if price is not None else {}))
    written = len(todo) - failed - waiting
    summary = (f"generate: {written} teacher answers ({len(turns) - len(todo)} reused), {new_tokens} tokens in "
               f"{fmt_seconds(t.seconds)} ({new_tokens / t.seconds:.0f} tok/s), {truncated} hit max_tokens"
               + (f"; the simulated user wrote {users_written['simulated']} turns, {users_written['fallback']} more "
                  f"were plain follow-ups standing in for unusable samples" if users_written else "")
               + compliance_note(cfg, run))
    if failed:
        # The answers that came back are saved; the stage must not be recorded as finished without the rest.
        later = f", and {waiting} later turns of their conversations wait for them" if waiting else ""
        raise StageError(f"{summary}; {failed} failed after retries{later}; re-run to retry them "
                         f"(errors in {run.root / ERRORS_FILE})")
    return summary


COMPLIANCE_FILE = "teacher_compliance.json"


def compliance_note(cfg: RunConfig, run: RunDir) -> str:
    """With checks.rules: the teacher's compliance per rule, first try and kept answer
    (the same without best_of), written to teacher_compliance.json; '' without rules."""
    if not cfg.checks.rules:
        return ""
    found = best_of.selection_summary(cfg.checks.rules, run)
    atomic_write_json(run.root / COMPLIANCE_FILE, found)
    rates = ", ".join(f"{name} {r['first_try']:.0%}" + (f"->{r['kept']:.0%}" if cfg.sampling.best_of else "")
                      for name, r in found["rules"].items() if r["applies"])
    return f"; teacher follows (first try{'->kept' if cfg.sampling.best_of else ''}): {rates}"
