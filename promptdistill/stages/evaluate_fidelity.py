"""eval's scores read from the models' next-token distributions, teacher-forced: likelihood (the
NLL of the teacher's answer) and fidelity (KL to the prompted teacher) on the teacher's answers,
on-policy fidelity on the models' own answers, the tokens where the student strays furthest, and
why fidelity was skipped where it cannot be computed here."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import divergence
from ..answerers import Models, recorded_positions, recorded_topk
from ..backends.base import Completion
from ..render import Datum, RenderError, render_example, sampled_datum, to_datum


def rows_datums(tokenizer, rows: list[dict], system_prompt: str | None) -> dict[int, Datum]:
    """Each test row's teacher answer rendered for teacher-forcing, with or without the prompt."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    datums = {}
    for i, r in enumerate(rows):
        with contextlib.suppress(RenderError):
            datums[i] = to_datum(render_example(tokenizer, head + r["prompt"], r["answer"], r["id"]))
    return datums


def logits_by_row(models: Models, who: str, datums: list[Datum],
                  share_prefix: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher-forced logits at each datum's weighted positions, as `who` (teacher: the
    teacher model; student: adapter on; base: adapter off)."""
    with torch.no_grad(), models.context(who):
        s = models.scorer(who).scored(datums, share_prefix=share_prefix)
    logits, targets = zip(*s.per_row(len(datums))) if datums else ((), ())
    return list(logits), list(targets)


def teacher_forced(models: Models, rows: list[dict], system_prompt: str, teacher_topk: dict | None) -> dict:
    """On each test row's teacher answer, per token and averaged per row:
      nll        of the answer under student, base (no prompt) and base WITH the prompt (likelihood);
      fidelity   forward KL(teacher WITH the prompt || student / base WITHOUT it), over the full
                 vocabulary when the teacher is local and shares the student's tokenizer, else
                 against the teacher's top-k log-probabilities (`teacher_topk`: row key -> recorded_topk)
                 at the answer positions they describe (`recorded_positions`), else not computed (None).
    Rows that cannot render get nan. Also the per-token KL of the student, for the report, and
    how many of the answers' tokens the KL covers."""
    n = len(rows)
    out = {name: np.full(n, np.nan) for name in ("student", "base", "base_with_prompt")}
    kl = {"student": np.full(n, np.nan), "base": np.full(n, np.nan)} if (models.full_vocab or teacher_topk) else None
    token_kl: list[list[float] | None] = [None] * n
    kl_tokens = {"scored": 0, "of": 0}
    plain, prompted = rows_datums(models.tokenizer, rows, None), rows_datums(models.tokenizer, rows, system_prompt)
    # The teacher's own rendering, where its own forward pass gives the KL (a local teacher that is not the student).
    own_pass = models.full_vocab and not models.teacher.base_of_adapter
    teacher = rows_datums(models.teacher.tokenizer, rows, system_prompt) if own_pass else prompted
    index = sorted(set(plain) & set(prompted) & set(teacher), key=lambda i: len(plain[i].input_tokens))  # less padding
    size = max(1, models.batch_size // 4)
    for start in tqdm(range(0, len(index), size), desc="eval: teacher-forced scores", unit="batch", leave=False):
        chunk = index[start:start + size]
        by_who = {who: logits_by_row(models, who, [plain[i] for i in chunk]) for who in ("student", "base")}
        ceiling, targets = logits_by_row(models, "base", [prompted[i] for i in chunk], share_prefix=True)
        for who, (logits, _) in by_who.items():
            for j, i in enumerate(chunk):
                out[who][i] = float(F.cross_entropy(logits[j], targets[j]))
        for j, i in enumerate(chunk):
            out["base_with_prompt"][i] = float(F.cross_entropy(ceiling[j], targets[j]))
        if kl is None:
            continue
        if own_pass:
            t_logits, t_targets = logits_by_row(models, "teacher", [teacher[i] for i in chunk], share_prefix=True)
        elif models.full_vocab:
            t_logits, t_targets = ceiling, targets
        for j, i in enumerate(chunk):
            kl_tokens["of"] += len(targets[j])
            if models.full_vocab:
                if not torch.equal(t_targets[j], targets[j]):  # the two tokenizations of the answer differ
                    continue
                scored = len(targets[j])
                kl_to = functools.partial(divergence.forward_kl, t_logits[j])
            else:
                top = teacher_topk.get(rows[i]["key"])
                scored = 0 if top is None else recorded_positions(top[2], targets[j])
                if scored == 0:
                    continue
                kl_to = functools.partial(divergence.topk_forward_kl, top[0][:scored], top[1][:scored])
            kl_tokens["scored"] += scored
            for who, (logits, _) in by_who.items():
                per_token = kl_to(logits[j][:scored])
                kl[who][i] = float(per_token.mean())
                if who == "student":
                    token_kl[i] = per_token.tolist()
    answer_tokens = {i: [t for t, w in zip(d.target_tokens, d.weights) if w > 0] for i, d in plain.items()}
    return {"nll": out, "kl": kl, "kl_tokens": kl_tokens, "token_kl": token_kl, "answer_tokens": answer_tokens}


def on_policy_kl(models: Models, rows: list[dict], answers: dict[str, list[Completion]],
                 whos: tuple[str, ...] = ("student", "base")) -> dict[str, np.ndarray]:
    """Reverse KL(model || teacher WITH the prompt) per token on the model's OWN test answers
    (sampled without the prompt, as it will be served), for student and base."""
    out = {}
    size = max(1, models.batch_size // 4)
    for who in whos:
        values = np.full(len(rows), np.nan)
        for start in tqdm(range(0, len(rows), size), desc=f"eval: on-policy fidelity ({who})", unit="batch", leave=False):
            chunk = range(start, min(start + size, len(rows)))
            own = [sampled_datum(models.tokenizer, rows[i]["prompt"], answers[who][i].token_ids)
                   for i in chunk]
            judged = [sampled_datum(models.teacher.tokenizer, rows[i]["messages"], answers[who][i].token_ids)
                      for i in chunk]
            model_logits, _ = logits_by_row(models, who, own)
            teacher_logits, _ = logits_by_row(models, "teacher", judged, share_prefix=True)
            for j, i in enumerate(chunk):
                values[i] = float(divergence.reverse_kl(model_logits[j], teacher_logits[j]).mean())
        out[who] = values
    return out


def teacher_topk(rows: list[dict]) -> dict:
    """Row key -> recorded_topk, for the rows whose recorded log-probabilities carry token ids."""
    return {r["key"]: top for r in rows if (top := recorded_topk(r)) is not None}


def topk_k(topk: dict) -> int:
    return min(top[0].shape[1] for top in topk.values()) if topk else 0


def fidelity_skipped(models: Models, rows: list[dict], topk: dict) -> str:
    """Why fidelity could not be computed without the teacher here, and what would let it."""
    why = ("the teacher is behind its endpoint (teacher.backend openai), so only the log-probabilities it returned "
           "could serve" if not models.teacher.local else
           "the teacher does not share the student's tokenizer, so only its recorded top-k log-probabilities could serve")
    ids = "teacher.logprob_token_ids: true (vLLM, distill serve)" if not models.teacher.local else "a teacher that gives token ids"
    if not any(r.get("logprobs") for r in rows):
        return f"fidelity skipped: {why}, and teacher.jsonl has none; set sampling.top_logprobs and {ids}, and re-generate"
    if not topk:
        return (f"fidelity skipped: {why}, and those in teacher.jsonl carry token text only, no token ids; set {ids} "
                f"and re-generate")
    return (f"fidelity skipped: {why}, and no test answer's recorded tokens begin as the student's tokenizer reads the "
            f"answer: the teacher numbers its tokens otherwise")


def divergent_tokens(tokenizer, forced: dict, i: int, k: int = 5) -> list[dict] | None:
    """The k answer tokens where the student's next-token distribution is furthest from the
    prompted teacher's: where the prompt's behaviour did not arrive. Each with the text
    before it (what both were reading) and the token the teacher wrote there."""
    per_token, answer = forced["token_kl"][i], forced["answer_tokens"].get(i)
    if per_token is None or answer is None:
        return None
    worst = sorted(range(len(per_token)), key=lambda p: -per_token[p])[:k]
    return [{"position": p, "kl": per_token[p], "token": tokenizer.decode([answer[p]]),
             "before": tokenizer.decode(answer[max(0, p - 8):p])} for p in sorted(worst)]
