"""Prefill through the joined keys against the split shared-prefix attention, on a run's own
conversations, the two taking turns in one process on the same rows: the teacher reading each
conversation's history before it answers the last turn (the sampler's prefill and its first token),
and the teacher scoring whole conversations WITH the prompt (kl's teacher pass, eval's fidelity).
Both must give the same numbers: the largest difference in log-probability is printed beside the times.

    python bench/joined_prefill.py runs/beethoven-chats/config.yaml --rows 16 --out results/joined-prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from promptdistill import teacher
from promptdistill.backends import local_attention
from promptdistill.backends.base import SamplingParams
from promptdistill.config_file import load_config
from promptdistill.rundir import RunDir, read_jsonl

MODES = {"joined": local_attention.JOINED_KEYS_WIDTH, "split": 1 << 30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--rows", type=int, default=16, help="conversations in the batch")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    cfg = load_config(args.config, [])
    rows = read_jsonl(RunDir(cfg.run_path).teacher)
    last = max(r.get("turn", 1) for r in rows)  # single queries carry no turn
    chats = [r for r in rows if r.get("turn", 1) == last and r["split"] == "train"][:args.rows]
    prompted = teacher.load(cfg)
    sampler, tok = prompted.sampler(), prompted.tokenizer
    histories = [r["messages"] for r in chats]  # WITH the system prompt, ending with the last user turn
    answers = [tok(r["completion"], add_special_tokens=False)["input_ids"] for r in chats]
    shared = sampler.count_prompt_tokens(histories[0][:1])
    own = [sampler.count_prompt_tokens(h) - shared for h in histories]

    def read_history():
        out = sampler.sample(histories, SamplingParams(temperature=0, max_tokens=1, top_logprobs=0), [0] * len(histories))
        return torch.tensor([c.logprobs[0]["logprob"] for c in out])

    def score_whole():
        return torch.cat(prompted.token_logprobs([h[1:] for h in histories], answers))

    tasks = {"read the history, first token": read_history, "score whole conversations": score_whole}
    seconds = {(t, m): [] for t in tasks for m in MODES}
    values = {}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for task, run in tasks.items():
            for mode, width in (MODES.items() if rep % 2 else reversed(MODES.items())):
                local_attention.JOINED_KEYS_WIDTH = width
                sampler.forget_prefix()
                started = time.perf_counter()
                values[task, mode] = run()
                if rep:
                    seconds[task, mode].append(time.perf_counter() - started)
    out = {"conversations": len(chats), "turn": last, "shared_prompt_tokens": shared,
           "own_tokens_per_row": round(statistics.mean(own)), "reps": args.reps, "tasks": {}}
    for task in tasks:
        med = {m: statistics.median(seconds[task, m]) for m in MODES}
        diff = (values[task, "joined"] - values[task, "split"]).abs().max().item()
        out["tasks"][task] = {"seconds": {m: [round(s, 2) for s in seconds[task, m]] for m in MODES},
                              "median": {m: round(v, 2) for m, v in med.items()},
                              "joined_over_split": round(med["joined"] / med["split"], 3), "max_logprob_diff": diff}
        print(f"{task}: joined {med['joined']:.2f} s, split {med['split']:.2f} s "
              f"({med['joined'] / med['split']:.2f}); largest log-probability difference {diff:.1e}", flush=True)
    print(f"{len(chats)} conversations at turn {last}, {out['own_tokens_per_row']} own tokens a row past the shared {shared}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
