"""`distill validate`: check a config and its data before spending compute on them.

Two groups of checks, both returning a list of Problems (never raising for what they find):
- cheap checks, before generation: the chat templates (the teacher's must carry the
  system prompt, the student's must render a conversation without one), the queries
  (empty, duplicate ids or texts, near-duplicates across splits) and the context (the
  longest teacher prompt plus sampling.max_tokens must fit);
- answer checks, before training: teacher answers that are empty, cut off at max_tokens,
  recite the system prompt, or refuse / speak as an AI.

Only tokenizers and model configs are loaded, never weights. A model behind an
OpenAI-compatible server (openai backend) has no local tokenizer: its token counts are
skipped with a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from jinja2 import TemplateError

from . import kept_skills, rules
from .config import ModelConfig, RunConfig
from .models import resolve_model
from .render import prompt_ids, render_example, render_text, student_view
from .rundir import RunDir, StageError, iter_jsonl, read_jsonl
from .scores import load_embedder, near_duplicate_pairs, normalise_text, word_ngrams
from .teacher import teacher_messages
from .stages.generate import context_overflows, last_turn_tokens, query_place, window_of
from .stages.queries import load_queries
from .stages.train import training_answer

# RenderError (a ValueError), a template's own raise_exception (a jinja TemplateError), or a
# template indexing a message that is not there (TypeError / jinja's UndefinedError).
TEMPLATE_ERRORS = (ValueError, TypeError, TemplateError)

CHUNK = 2048  # held-out queries compared with every train query at once

# Phrases of a model stepping out of any persona: refusing, or saying what it is. Narrow on
# purpose: "I'm sorry for your loss" is in character, "I'm sorry, but I can't" is not.
REFUSAL = re.compile(
    r"\b(as an ai|i(?:'m| am) (?:just |only )?an ai|(?:large )?language model|"
    r"i(?:'m| am) sorry,? but i (?:can(?:no|')t|am unable|won't)|"
    r"i (?:can(?:no|')t|am unable to|won't) (?:help|assist|comply|provide|answer|do that))",
    re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" stops `distill run`; "warning" is printed and the run goes on
    where: str  # file:line, config field, or query id
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def text(self) -> str:
        lines = [f"note: {n}" for n in self.notes]
        for title, group in (("errors", self.errors), ("warnings", self.warnings)):
            if group:
                lines += [f"{len(group)} {title if len(group) > 1 else title[:-1]}:"] + [f"  {p}" for p in group]
        if not self.problems:
            lines.append("no problems found")
        return "\n".join(lines)


class ValidationFailed(StageError):
    """`distill run` stopped before a stage because validation found errors."""


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class ModelTokenizer:
    """A model's tokenizer and context length, loaded without its weights."""

    tokenizer: object
    context: int | None


def load_tokenizer(model: ModelConfig) -> ModelTokenizer | None:
    """None for an OpenAI-compatible server's model (its tokenizer is on the server); local
    and tinker models render with the run's local copy of the model."""
    if model.backend == "openai":
        return None
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model(model.model)
    return ModelTokenizer(AutoTokenizer.from_pretrained(path), window_of(AutoConfig.from_pretrained(path)))


def load_tokenizers(cfg: RunConfig, report: Report) -> dict[str, ModelTokenizer]:
    out = {}
    for role in ("teacher", "student"):
        model = getattr(cfg, role)
        tok = load_tokenizer(model)
        if tok is None:
            report.notes.append(f"{role} {model.model} is remote (backend {model.backend}): no local tokenizer, "
                                f"so its token counts, context and chat template are not checked")
        else:
            out[role] = tok
    return out


# --------------------------------------------------------------------------- templates


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt a chat template inserts when a conversation has none, if any: the
    text the no-system rendering holds where a given system prompt would go."""
    marker = "\x00SYSTEM\x00"
    given = render_text(tokenizer, [{"role": "system", "content": marker}, {"role": "user", "content": "{query}"}], True)
    if marker not in given:
        return None
    before, after = given.split(marker, 1)
    bare = student_view(tokenizer)
    if bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
        return bare[len(before):len(bare) - len(after)]
    return None


def template_problems(cfg: RunConfig, toks: dict[str, ModelTokenizer]) -> list[Problem]:
    """The teacher's template must carry the system prompt; the student's must render a user
    turn alone and locate an answer after it. A tokenizer that fails here is removed from
    `toks`, so the token counts after this do not fail on it again."""
    problems = []
    for role in [r for r in ("teacher", "student") if r in toks]:
        check = teacher_template_problem if role == "teacher" else student_template_problem
        problem = check(cfg, toks[role].tokenizer, f"{role}.model {getattr(cfg, role).model}")
        if problem is not None:
            problems.append(problem)
            if problem.severity == "error":
                del toks[role]
    return problems


def teacher_template_problem(cfg: RunConfig, tokenizer, where: str) -> Problem | None:
    try:
        text = render_text(tokenizer, teacher_messages(cfg, "{query}"), True)
    except TEMPLATE_ERRORS as e:
        return Problem("error", where, f"its chat template cannot render a system prompt ({e})")
    if cfg.system_prompt.strip() not in text:
        return Problem("error", where, "its chat template drops the system prompt: the teacher would answer "
                       "without the behaviour to distill")
    return None


def student_template_problem(cfg: RunConfig, tokenizer, where: str) -> Problem | None:
    try:
        view = student_view(tokenizer)
        default = default_system_prompt(tokenizer)
        render_example(tokenizer, [{"role": "user", "content": "Hi"}], "Hello there.", "probe")
    except TEMPLATE_ERRORS as e:
        return Problem("error", where, f"its chat template cannot express 'no system prompt' (a user turn alone, "
                       f"then the answer): {e}")
    if default:
        return Problem("warning", where, f"its chat template inserts a default system prompt when none is given "
                       f"({default.strip()!r}); the student is trained and served with it, so it really sees {view!r}")
    return None


# --------------------------------------------------------------------------- queries


def current_queries(cfg: RunConfig, run: RunDir, report: Report) -> list[dict]:
    """The split queries of the run dir if `distill queries` made them, else the config's
    query files as loaded (no split yet)."""
    if run.queries.exists():
        return read_jsonl(run.queries)
    q, rows = cfg.queries, []
    for f in q.files:
        try:
            rows += load_queries(f, q.field, q.id_field, q.dataset_split)
        except StageError as e:
            report.problems.append(Problem("error", f, str(e)))
    report.notes.append(f"{run.queries} does not exist yet: the cross-split near-duplicate check needs the split "
                        f"(`distill queries` makes it)")
    return rows[: q.limit] if q.limit else rows


def query_problems(rows: list[dict]) -> list[Problem]:
    problems = [Problem("error", query_place(r), "empty query")
                for r in rows if not r["query"].strip()]
    by_id: dict[str, list[dict]] = {}
    by_text: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
        if r["query"].strip():
            by_text.setdefault(normalise_text(r["query"]), []).append(r)
    for qid, group in by_id.items():
        if len(group) > 1:
            problems.append(Problem("error", f"query {qid!r}", f"duplicate id at {', '.join(r['source'] for r in group)}"))
    for text, group in by_text.items():
        if len(group) > 1:
            places = ", ".join(f"{r['id']!r} ({r['source']})" for r in group)
            problems.append(Problem("error", f"query {group[0]['id']!r}",
                                    f"the same query (normalised: {text!r}) appears {len(group)} times: {places}"))
    return problems


def leakage_problems(rows: list[dict], threshold: float) -> list[Problem]:
    """Val/test queries that are near-duplicates of a train query: the score on them would
    measure memory, not generalisation. Exact duplicates are reported by query_problems."""
    train = [r for r in rows if r.get("split") == "train" and r["query"].strip()]
    held = [r for r in rows if r.get("split") in ("val", "test") and r["query"].strip()]
    if not train or not held:
        return []
    embedder = load_embedder()
    held_emb, train_emb = embedder.encode([r["query"] for r in held]), embedder.encode([r["query"] for r in train])
    pairs = []
    for start in range(0, len(held), CHUNK):  # bounded memory: CHUNK x len(train) similarities at a time
        pairs += [(start + i, j, cos) for i, j, cos in near_duplicate_pairs(held_emb[start:start + CHUNK], train_emb, threshold)]
    problems = []
    for i, j, cos in sorted(pairs, key=lambda p: -p[2]):
        h, t = held[i], train[j]
        if normalise_text(h["query"]) == normalise_text(t["query"]):
            continue
        problems.append(Problem("error", f"{query_place(h)} [{h['split']}]",
                                f"near-duplicate of train query {t['id']!r} ({t['source']}), cosine {cos:.3f} >= "
                                f"{threshold:g}: {h['query']!r} ~ {t['query']!r}"))
    return problems


# --------------------------------------------------------------------------- context


def context_problems(cfg: RunConfig, rows: list[dict], toks: dict[str, ModelTokenizer]) -> list[Problem]:
    """The teacher prompt (system prompt + query, or a conversation's last turn after its history)
    plus what is written before its answer ends must fit the teacher's context; a student example
    longer than train.max_seq_len is skipped by train."""
    problems = []
    rows = [r for r in rows if r["query"].strip()]
    teacher = toks.get("teacher")
    if teacher is not None and teacher.context is not None:
        def count(messages: list[dict]) -> int:
            return len(prompt_ids(teacher.tokenizer, messages))

        problems += [Problem("error", query_place(q), message)
                     for q, message in context_overflows(cfg, rows, count, teacher.context)]
    student = toks.get("student")
    if student is not None:
        limit = cfg.train.max_seq_len
        for r in rows:  # a conversation's longest example is its last turn, after the whole history
            need, prompt, adds = last_turn_tokens(cfg, r, lambda m: len(prompt_ids(student.tokenizer, m)), with_prompt=False)
            if need > limit:
                problems.append(Problem("warning", query_place(r), f"{prompt}, + {adds} can reach {need} tokens > "
                                        f"train.max_seq_len {limit}: train skips such an example"))
    return problems


# --------------------------------------------------------------------------- answers


def recited_span(answer: str, prompt_grams: set[tuple[str, ...]], n: int) -> str | None:
    """The first run of `n` consecutive (normalised) words of the answer found in the prompt."""
    return next((" ".join(gram) for gram in word_ngrams(answer, n) if gram in prompt_grams), None)


def answer_problems(cfg: RunConfig, run: RunDir) -> list[Problem]:
    c = cfg.checks
    grams = set(word_ngrams(cfg.system_prompt, c.verbatim_words))
    problems, cut, dropped, unusable, refusals, recitals, total = [], [], [], [], [], [], 0
    for lineno, row in iter_jsonl(run.teacher):
        total += 1
        where = f"{run.teacher}:{lineno} ({row.get('id')})"
        text = str(row.get("completion", ""))
        if not text.strip():
            problems.append(Problem("error", where, "empty answer"))
            unusable.append(where)
            continue
        if row.get("finish_reason") == "length":
            cut.append(where)
            if training_answer(row) is None:
                dropped.append(where)
                unusable.append(where)
        span = recited_span(text, grams, c.verbatim_words)
        if span:
            recitals.append(where)
            problems.append(Problem("warning", where, f"the answer recites the system prompt verbatim "
                                    f"({c.verbatim_words}+ words: {span!r}); the student would learn to recite it"))
        refusal = REFUSAL.search(text)
        if refusal:
            refusals.append(where)
            start = max(0, refusal.start() - 30)
            problems.append(Problem("warning", where, f"the answer refuses or speaks as an AI: "
                                    f"{'...' * (start > 0)}{text[start:refusal.end() + 30]!r}..."))
    if not total:
        return problems
    problems += rule_problems(cfg, run) + label_problems(cfg, run)
    if cut:
        problems.append(Problem("warning", str(run.teacher),
                                f"{len(cut)} of {total} answers ({len(cut) / total:.0%}) hit sampling.max_tokens="
                                f"{cfg.sampling.max_tokens}; train trims them to their last full sentence, and drops the "
                                f"{len(dropped)} with none in their first half (first cut: {cut[0]})"))
    shares = [(unusable, "are empty or cut off before a full sentence", "max_unusable_share",
               "train would drop them; raise sampling.max_tokens and `distill generate --force`"),
              (recitals, "recite the system prompt verbatim", "max_recital_share",
               "the student would learn to recite it; revise the prompt or the queries asking for it"),
              (refusals, "refuse or speak as an AI", "max_refusal_share",
               "the student would learn to refuse; revise the system prompt or the queries")]
    for rows, what, setting, consequence in shares:  # one bad answer is a warning; many are an error
        limit = getattr(c, setting)
        if len(rows) / total > limit:
            problems.append(Problem("error", str(run.teacher), f"{len(rows)} of {total} answers ({len(rows) / total:.0%}) "
                                    f"{what}, more than checks.{setting}={limit:g}: {consequence}"))
    return problems


def rule_problems(cfg: RunConfig, run: RunDir) -> list[Problem]:
    """A warning per checks.rules rule the teacher's (kept) answers follow less often than
    checks.min_rule_share: the student cannot learn what it rarely sees."""
    if not cfg.checks.rules:
        return []
    rows = read_jsonl(run.teacher)
    rates = rules.pass_rates(cfg.checks.rules, [r["messages"][-1]["content"] for r in rows],
                             [str(r.get("completion", "")) for r in rows])
    return [Problem("warning", f"checks.rules {name}", f"the teacher's answers follow it {r['pass_rate']:.0%} of the "
                    f"{r['applies']} times it applies, less than checks.min_rule_share={cfg.checks.min_rule_share:g}: "
                    "the student cannot learn what it rarely sees (raise sampling.best_of, or make the rule one the "
                    "teacher can follow)")
            for name, r in rates.items() if r["applies"] and r["pass_rate"] < cfg.checks.min_rule_share]


def label_problems(cfg: RunConfig, run: RunDir) -> list[Problem]:
    """A warning when fewer of the teacher's answers than checks.min_rule_share give a label
    checks.labels can read: label agreement is over those only, and the student learns the rest."""
    if not cfg.checks.labels:
        return []
    parsed = [cfg.checks.labels.parse(str(r.get("completion", "")))[0] for r in read_jsonl(run.teacher)]
    given = sum(p is not None for p in parsed)
    if not parsed or given / len(parsed) >= cfg.checks.min_rule_share:
        return []
    return [Problem("warning", "checks.labels", f"{given} of the teacher's {len(parsed)} answers give a label the pattern "
                    f"reads ({given / len(parsed):.0%}), less than checks.min_rule_share={cfg.checks.min_rule_share:g}: "
                    "label agreement counts only those, and the student learns the unlabelled rest (make the "
                    "format easier for the teacher, or the pattern match what it writes)")]


# --------------------------------------------------------------------------- entry points


def skills_problems(cfg: RunConfig) -> list[Problem]:
    """A user's kept-skills set (eval.skills), read whole now: a bad row found by eval would come
    after generate and train."""
    try:
        kept_skills.load(cfg.eval.skills)
    except StageError as e:
        return [Problem("error", "eval.skills", str(e).removeprefix("eval.skills: "))]
    return []


def before_generate(cfg: RunConfig, run: RunDir) -> Report:
    """The cheap checks: templates, queries, leakage across splits, context, a user's kept-skills set."""
    report = Report()
    toks = load_tokenizers(cfg, report)
    report.problems += template_problems(cfg, toks)
    rows = current_queries(cfg, run, report)
    report.problems += query_problems(rows)
    report.problems += leakage_problems(rows, cfg.queries.dedup_threshold)
    report.problems += context_problems(cfg, rows, toks)
    report.problems += skills_problems(cfg)
    return report


def before_train(cfg: RunConfig, run: RunDir) -> Report:
    report = Report()
    if not run.teacher.exists():
        report.notes.append(f"{run.teacher} does not exist yet: the answer checks run once `distill generate` made it")
        return report
    report.problems += answer_problems(cfg, run)
    return report


def validate(cfg: RunConfig) -> Report:
    """Every check the run dir's current contents allow."""
    run = RunDir(cfg.run_path)
    report, answers = before_generate(cfg, run), before_train(cfg, run)
    return Report(report.problems + answers.problems, report.notes + answers.notes)


def gate(cfg: RunConfig, run: RunDir, stage: str) -> None:
    """For `distill run`: print what the checks before `stage` found, and stop on errors."""
    report = before_generate(cfg, run) if stage == "generate" else before_train(cfg, run)
    if report.errors:
        raise ValidationFailed(f"validate: {stage} not started, nothing changed in {run.root}; fix these "
                               f"(or pass --no-validate to go on anyway):\n{report.text()}")
    if report.problems or report.notes:
        print(f"validate (before {stage}):\n{report.text()}", flush=True)
