"""eval on conversations the model carries itself: what users will live with.

The per-turn fidelity scores read the teacher's in-character history. A served student reads
its OWN: here each test conversation is played out by the student (and by the base, the floor)
WITHOUT the prompt, turn by turn, its own earlier answers as the history; the user's turns are
the conversation's own, or, for a conversation a simulated user carries on (queries.follow_ups),
written by that user in reply to this model's answers. At every turn the prompted teacher, given
that same history WITH the prompt, scores the model's answer: reverse KL(model || teacher) per
token, as on-policy fidelity does on a first turn.
"""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from .. import follow_ups
from ..answerers import Models, sampling_params
from ..backends.base import Completion
from ..config import RunConfig
from ..conversations import history, turn_count, turn_identity, user_turns
from ..rundir import RunDir, StageError, atomic_write_text, json_safe, read_jsonl
from .evaluate_fidelity import on_policy_kl
from .generate import row_seeds


def test_conversations(run: RunDir) -> list[dict]:
    """The test split's conversations of several turns the teacher answered in turn (not those
    answered only at their last turn after logged answers: their history is not the model's)."""
    return [q for q in read_jsonl(run.queries) if q["split"] == "test" and turn_count(q) > 1 and "logged" not in q]


def played_out(cfg: RunConfig, models: Models, conversations: list[dict], who: str,
               openings: dict[str, Completion]) -> list[dict]:
    """Each conversation answered by `who` turn by turn after its own answers: one row per turn,
    {"conversation", "turn", "prompt" (the history it read), "messages" (the same WITH the prompt),
    "answer" (its Completion)}, ordered by conversation, then turn. `openings`: `who`'s answers to
    first turns it already gave (eval's test answers, drawn from the same prompt and seed), by
    conversation id; those are not sampled again."""
    sampler, params = models.answerer(who), sampling_params(cfg)
    # The teacher playing the user too: its own weights here, not a second copy.
    simulator = follow_ups.Simulator(cfg, models.teacher.sampler() if follow_ups.writer_model(cfg) == cfg.teacher else None)
    users = {q["id"]: [] for q in conversations}
    answers: dict[str, list[str]] = {q["id"]: [] for q in conversations}
    rows: list[dict] = []
    for turn in range(max(turn_count(q) for q in conversations)):
        here = [q for q in conversations if turn < turn_count(q)]
        to_write = [q for q in here if turn >= len(user_turns(q))]
        with models.teacher.context():  # the writer samples on the teacher's weights (adapter off, if shared)
            written = simulator.next_turns([(q["id"], turn_identity(q, turn) + f":{who}", users[q["id"]],
                                             answers[q["id"]]) for q in to_write])
        for q in here:
            users[q["id"]].append(user_turns(q)[turn] if turn < len(user_turns(q)) else None)
        for q, (text, _) in zip(to_write, written):
            users[q["id"]][-1] = text
        prompts = [history(users[q["id"]], answers[q["id"]]) for q in here]
        given = {q["id"]: openings[q["id"]] for q in here if turn == 0 and q["id"] in openings}
        todo = [i for i, q in enumerate(here) if q["id"] not in given]
        seeds = row_seeds(cfg, [turn_identity(here[i], turn) for i in todo], params.seed)
        sampled = []
        with models.context(who):
            for start in tqdm(range(0, len(todo), models.batch_size), desc=f"eval: {who} carries turn {turn + 1}",
                              unit="batch", leave=False, disable=not todo):
                sampled += sampler.sample([prompts[i] for i in todo[start:start + models.batch_size]], params,
                                          seeds[start:start + models.batch_size])
        if failed := next((c.error for c in sampled if c.finish_reason == "error"), None):
            raise StageError(f"eval: {who}'s answer at turn {turn + 1} failed ({failed}); re-run eval")
        fresh = dict(zip(todo, sampled))
        done = [fresh[i] if i in fresh else given[q["id"]] for i, q in enumerate(here)]
        for q, prompt, c in zip(here, prompts, done):
            answers[q["id"]].append(c.text)
            rows.append({"conversation": q["id"], "turn": turn + 1, "prompt": prompt,
                         "messages": models.teacher.with_prompt(prompt), "answer": c})
    rows.sort(key=lambda r: (r["conversation"], r["turn"]))
    return rows


ROWS_FILE = "eval_conversations.jsonl"


def own_history_kl(cfg: RunConfig, models: Models, run: RunDir, openings: dict[str, dict[str, tuple[Completion, float]]]
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    """({"student": ..., "base": ...} per-turn reverse KL on the model's own conversation, the
    conversation of each value, its turn), or None when the test split holds no conversations.
    `openings[who][conversation id]`: an answer to its first turn eval already drew and scored
    (on-policy fidelity's), so a conversation's opening is sampled and scored once. Every turn,
    with the history the model read, goes to eval_conversations.jsonl."""
    conversations = test_conversations(run)
    if not conversations:
        return None
    kl, written = {}, []
    for who in ("student", "base"):
        given = openings.get(who, {})
        rows = played_out(cfg, models, conversations, who, {cid: answer for cid, (answer, _) in given.items()})
        reused = [r["turn"] == 1 and r["conversation"] in given for r in rows]
        kl[who] = np.array([given[r["conversation"]][1] if hit else np.nan for r, hit in zip(rows, reused)])
        todo = [i for i, hit in enumerate(reused) if not hit]
        kl[who][todo] = on_policy_kl(models, [rows[i] for i in todo], {who: [rows[i]["answer"] for i in todo]},
                                     whos=(who,))[who]
        written += [{"conversation": r["conversation"], "turn": r["turn"], "who": who, "history": r["prompt"][:-1],
                     "user": r["prompt"][-1]["content"], "answer": r["answer"].text, "answer_tokens": r["answer"].token_ids, "reverse_kl": float(v)}
                    for r, v in zip(rows, kl[who])]
    atomic_write_text(run.root / ROWS_FILE, "".join(json.dumps(json_safe(r), ensure_ascii=False) + "\n" for r in written))
    return kl, np.array([r["conversation"] for r in rows]), np.array([r["turn"] for r in rows])
