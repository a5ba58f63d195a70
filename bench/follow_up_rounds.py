"""Where a round of generate spends its time: for each turn of a run's simulated conversations, the
simulated user writing that turn (every try; none for the first, the query) and the teacher
answering it, timed apart on the run's own conversations (its teacher.jsonl), with the tokens each
reads beyond the prompt the batch shares and the tokens it writes.

The teacher's rows already hold its earlier answers, so each round starts from the same history
`distill generate` gave it; the turns written here are not stored.

    python bench/follow_up_rounds.py /tmp/prof/config.yaml --out results/follow-up-rounds.json

`--split-prefill` is the baseline for the joined-keys prefill: every width through the split
shared-prefix attention, as decoding steps go.
"""

from __future__ import annotations

import argparse
import json
import time

from promptdistill import follow_ups, teacher
from promptdistill.answerers import sampling_params
from promptdistill.backends import local_attention
from promptdistill.config_file import load_config
from promptdistill.conversations import history, turn_identity
from promptdistill.rundir import RunDir, read_jsonl


def timed(sampler, calls: list[dict]):
    """The sampler, each call's rows, own prompt tokens, written tokens and seconds appended to `calls`."""
    sample = sampler.sample

    def wrapped(convs, params, seeds):
        started = time.perf_counter()
        out = sample(convs, params, seeds)
        calls.append({"rows": len(convs), "prompt_tokens": sum(o.prompt_tokens for o in out),
                      "written_tokens": sum(o.completion_tokens for o in out),
                      "seconds": round(time.perf_counter() - started, 2)})
        return out
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--split-prefill", action="store_true", help="no prefill through the joined keys (the baseline)")
    args = ap.parse_args()
    if args.split_prefill:
        local_attention.JOINED_KEYS_WIDTH = 1 << 30

    cfg = load_config(args.config, [])
    run = RunDir(cfg.run_path)
    queries = {q["id"]: q for q in read_jsonl(run.queries)}
    chats: dict[str, dict[int, dict]] = {}
    for r in read_jsonl(run.teacher):
        if "follow_ups" in queries.get(r.get("conversation"), {}):  # every turn, a fallback user turn's too
            chats.setdefault(r["conversation"], {})[r["turn"]] = r
    prompted = teacher.load(cfg)
    sampler = prompted.sampler()
    calls: list[dict] = []
    sampler.sample = timed(sampler, calls)
    simulator = follow_ups.Simulator(cfg, sampler)
    shared = sampler.count_prompt_tokens(prompted.with_prompt([]))  # the system prompt, read once a batch
    out = {"conversations": len(chats), "shared_prompt_tokens": shared, "split_prefill": args.split_prefill, "rounds": []}
    for turn in range(max(len(c) for c in chats.values())):
        asks = [(cid, turn_identity(queries[cid], turn), [c[i]["messages"][-1]["content"] for i in range(1, turn + 1)],
                 [c[i]["completion"] for i in range(1, turn + 1)]) for cid, c in chats.items() if turn + 1 in c]
        calls.clear()
        # the first turn is the query itself; a later one, the simulated user's
        written = simulator.next_turns(asks) if turn else [(queries[cid]["query"], "given") for cid, *_ in asks]
        user = list(calls)
        calls.clear()
        convs = [prompted.with_prompt(history(users + [text], answers)) for (_, _, users, answers), (text, _) in zip(asks, written)]
        sampler.sample(convs, sampling_params(cfg), list(range(len(convs))))
        answer = list(calls)
        row = {"turn": turn + 1, "rows": len(asks), "user_tries": user, "teacher": answer[0],
               "user_seconds": round(sum(c["seconds"] for c in user), 1), "teacher_seconds": answer[0]["seconds"],
               "teacher_own_prompt_tokens_per_row": round(answer[0]["prompt_tokens"] / len(asks) - shared)}
        out["rounds"].append(row)
        print(f"turn {row['turn']}: {row['rows']} rows; simulated user {row['user_seconds']} s over {len(user)} tries "
              f"({', '.join(str(c['rows']) for c in user)} rows); teacher {row['teacher_seconds']} s, "
              f"{row['teacher_own_prompt_tokens_per_row']} own prompt tokens a row past the shared {shared}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
