"""Best-of-N teacher answers (`sampling.best_of`): teacher data that follows the rules.

Per query, up to N tries are drawn, each from its own seed; the kept answer is the first
try that passes every `checks.rules` rule applying to the query, else the try failing the
fewest (the earliest on a tie). The teacher's text is never edited: a rule the teacher
never follows stays broken, and the compliance figures say so.

Every try is appended (with fsync, round by round) to teacher_tries.jsonl before any
choice is made, keyed by the row key and the try index, so a killed run re-reads the
tries it already paid for and never draws a finished try again. Try 0 is drawn from the
row's usual seed: with best_of 1 (or a first try that passes) the kept answer is the
one a run without best_of would have.
"""

from __future__ import annotations

from pathlib import Path

from . import rules
from .backends.base import Completion, SamplingParams
from .rundir import RunDir, append_jsonl, read_jsonl

TRIES_FILE = "teacher_tries.jsonl"
# Try i>0 is seeded at seed + i * TRY_STRIDE: eval's "teacher again" uses seed + 1, and a
# try must not be that very answer (then the ceiling would be one of the tries).
TRY_STRIDE = 7919


def tries_path(run: RunDir) -> Path:
    return run.root / TRIES_FILE


def try_seed(row_seed: int, i: int) -> int:
    return (row_seed + i * TRY_STRIDE) % (2**63)


class Picker:
    """Draws and chooses the tries for batches of queries, reusing those already on disk."""

    def __init__(self, rule_list: list[rules.Rule], n: int, run: RunDir):
        self.rules, self.n, self.path = rule_list, n, tries_path(run)
        self.tries: dict[tuple[str, int], dict] = {(t["key"], t["try"]): t for t in read_jsonl(self.path, repair=True)}

    def sample(self, sampler, batch: list[dict], convs: list[list[dict]], params: SamplingParams,
               seeds: list[int]) -> tuple[list[Completion], list[dict]]:
        """The kept completion per query of `batch` (rows with "id", "key", "query") and the
        fields its teacher row records: the kept try, how many were drawn, what it fails.
        A try the backend could not draw is returned as that error (the query stays undone)."""
        self.drawn: list[Completion] = []  # what this call paid for: every new try, kept or not
        chosen: dict[int, tuple[Completion, dict]] = {}
        drawn: dict[int, list[tuple[list[str], dict]]] = {i: [] for i in range(len(batch))}
        for t in range(self.n):
            pending = [i for i in range(len(batch)) if i not in chosen]
            if not pending:
                break
            missing = [i for i in pending if (batch[i]["key"], t) not in self.tries]
            if missing:
                outs = sampler.sample([convs[i] for i in missing], params, [try_seed(seeds[i], t) for i in missing])
                new = []
                for i, out in zip(missing, outs):
                    if out.finish_reason == "error":
                        chosen[i] = (out, {})
                        continue
                    self.drawn.append(out)
                    row = {"id": batch[i]["id"], "key": batch[i]["key"], "try": t, "seed": try_seed(seeds[i], t),
                           "completion": out.text, "finish_reason": out.finish_reason, "token_ids": out.token_ids,
                           "tokens": {"prompt": out.prompt_tokens, "completion": out.completion_tokens},
                           "failed_checks": rules.failed(self.rules, batch[i]["query"], out.text),
                           **({"logprobs": out.logprobs} if out.logprobs is not None else {})}
                    new.append(row)
                    self.tries[(row["key"], t)] = row
                append_jsonl(self.path, new)  # on disk before any choice rests on them
            for i in pending:
                if i in chosen:
                    continue
                # judged by the rules as they are now (a try on disk may predate a change of them)
                row = self.tries[(batch[i]["key"], t)]
                drawn[i].append((rules.failed(self.rules, batch[i]["query"], row["completion"]), row))
                if not drawn[i][-1][0] or t == self.n - 1:
                    fails, best = min(drawn[i], key=lambda d: len(d[0]))  # min keeps the earliest of a tie
                    chosen[i] = (completion(best), {"try": best["try"], "tries": len(drawn[i]), "failed_checks": fails})
        return [chosen[i][0] for i in range(len(batch))], [chosen[i][1] for i in range(len(batch))]


def completion(row: dict) -> Completion:
    return Completion(text=row["completion"], token_ids=row["token_ids"], prompt_tokens=row["tokens"]["prompt"],
                      finish_reason=row["finish_reason"], logprobs=row.get("logprobs"))


def selection_summary(rule_list: list[rules.Rule], run: RunDir) -> dict:
    """Teacher compliance per rule before selection (every query's first try) and after
    (the kept answers in teacher.jsonl), over the rows teacher.jsonl holds."""
    kept = read_jsonl(run.teacher)
    first = {t["key"]: t for t in read_jsonl(tries_path(run)) if t["try"] == 0}
    queries = [r["messages"][-1]["content"] for r in kept]
    answers = {"first_try": [first.get(r["key"], r)["completion"] for r in kept], "kept": [r["completion"] for r in kept]}
    rates = {when: rules.pass_rates(rule_list, queries, texts) for when, texts in answers.items()}
    all_pass = {when: sum(not rules.failed(rule_list, q, a) for q, a in zip(queries, texts))
                for when, texts in answers.items()}
    return {"answers": len(kept), "tries_drawn": sum(r.get("tries", 1) for r in kept),
            "all_pass": all_pass,
            "rules": {r.name: {"applies": rates["kept"][r.name]["applies"],
                               **{when: rates[when][r.name]["pass_rate"] for when in answers}} for r in rule_list}}
