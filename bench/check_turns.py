"""An independent check of eval's per-turn fidelity: plain transformers + peft, no promptdistill.

For each answer in a finished run's eval.jsonl, the teacher's answer as it was trained on (cut
back to its last full sentence when it ran into max_tokens, the rule docs/summary.md states) is
rendered with the model's own chat template twice: after the teacher's conversation WITH the
system prompt (the teacher: the base weights, adapter off) and after the same conversation
without it (the student: base + adapter; the base: adapter off). At every answer token and its
end-of-turn marker the forward KL(teacher || model) of the next-token distributions is taken,
averaged per answer; per turn (1, 2, 3+), retained = 1 - mean KL(student) / mean KL(base), set
beside eval's summary.json. Teacher and student are taken to be one model (as in the demo): the
adapter's base, the adapter switched off for the teacher.

    python bench/check_turns.py runs/beethoven-chats [--limit 20]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def trained_text(row: dict) -> str | None:
    text = row["completion"].strip()
    if row.get("finish_reason") != "length":
        return text or None
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends and ends[-1] >= len(text) / 2 else None


def answer_positions(tokenizer, conversation: list[dict], answer: str) -> tuple[list[int], int]:
    """(the tokens of conversation + answer, where the answer starts); the answer's own tokens and
    the end-of-turn marker after it are the positions scored."""
    head = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(head), "the template renders the prompt differently with the answer"
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return ids, len(tokenizer(head, add_special_tokens=False)["input_ids"])


def scored_logits(model, ids: list[int], start: int, n: int) -> torch.Tensor:
    """Logits predicting tokens start .. start + n - 1."""
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].float()
    return out[start - 1:start - 1 + n]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--limit", type=int, default=None, help="answers per turn index (default all)")
    args = p.parse_args()
    run = Path(args.run_dir)
    config, tokenizer, model = load_run(run)
    teacher_rows = {r["id"]: r for r in map(json.loads, (run / "teacher.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    kl: dict[int, dict[str, list[float]]] = {}
    for r in rows:
        turn = min(r.get("turn", 1), 3)
        if args.limit and len(kl.get(turn, {}).get("student", [])) >= args.limit:
            continue
        if not r.get("fidelity_kl") or r["fidelity_kl"]["student"] is None:
            continue
        kls = answer_kl(model, tokenizer, config["system_prompt"], teacher_rows[r["id"]])
        if kls is None:
            continue
        for who, value in kls.items():
            kl.setdefault(turn, {}).setdefault(who, []).append(value)
            kl[turn].setdefault(f"{who}_eval", []).append(r["fidelity_kl"][who])
    summary = json.loads((run / "summary.json").read_text())["quality"]["fidelity"]
    worst = 0.0
    for turn in sorted(kl):
        label = "3+" if turn == 3 else str(turn)
        mine = 1 - sum(kl[turn]["student"]) / sum(kl[turn]["base"])
        theirs = (summary.get("per_turn") or {}).get(label, summary)["retained"]["mean"]
        same_rows = 1 - sum(kl[turn]["student_eval"]) / sum(kl[turn]["base_eval"])
        worst = max(worst, abs(mine - same_rows) / abs(same_rows))
        means = {k: sum(v) / len(v) for k, v in kl[turn].items()}
        print(f"turn {label}: {len(kl[turn]['student'])} answers; mean KL student {means['student']:.4g} here, "
              f"{means['student_eval']:.4g} eval; base {means['base']:.4g} here, {means['base_eval']:.4g} eval; "
              f"retained here {mine:.1%}, eval's on the same answers {same_rows:.1%}, eval's summary {theirs:.1%}")
    print(f"largest relative difference on the same answers: {worst:.1%}")
    return 0 if worst <= 0.10 else 1


def load_run(run: Path):
    """(config.yaml, tokenizer, the adapter's base in fp32 with the student's adapter) of a finished run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = yaml.safe_load((run / "config.yaml").read_text())
    base_dir = json.loads((run / "student" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return config, AutoTokenizer.from_pretrained(base_dir), PeftModel.from_pretrained(model, str(run / "student")).eval()


def answer_kl(model, tokenizer, system_prompt: str, row: dict) -> dict[str, float] | None:
    """The mean forward KL(teacher WITH the prompt || student, base WITHOUT it) per token of a
    teacher.jsonl row's answer as trained, after the teacher's conversation; None when nothing of
    it is trained or it tokenises differently after the two prompts (not comparable token for token)."""
    answer = trained_text(row)
    if answer is None:
        return None
    plain = [m for m in row["messages"] if m["role"] != "system"]
    ids_t, start_t = answer_positions(tokenizer, [{"role": "system", "content": system_prompt}] + plain, answer)
    ids_s, start_s = answer_positions(tokenizer, plain, answer)
    n = trained_length(tokenizer, ids_t, start_t)
    if ids_t[start_t:start_t + n] != ids_s[start_s:start_s + n]:
        return None
    with model.disable_adapter():
        teacher = F.log_softmax(scored_logits(model, ids_t, start_t, n), -1)
        base = F.log_softmax(scored_logits(model, ids_s, start_s, n), -1)
    student = F.log_softmax(scored_logits(model, ids_s, start_s, n), -1)
    return {who: float((teacher.exp() * (teacher - lp)).sum(-1).mean()) for who, lp in (("student", student), ("base", base))}


def trained_length(tokenizer, ids: list[int], start: int) -> int:
    """The answer's tokens through its end-of-turn marker: up to the first special token after it, included."""
    special = set(tokenizer.all_special_ids)
    return next((i - start + 1 for i in range(start, len(ids)) if ids[i] in special), len(ids) - start)


if __name__ == "__main__":
    sys.exit(main())
