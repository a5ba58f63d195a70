"""Typed run config: what a run's YAML file may say, each section a pydantic model
(config_file.py reads the file, applies --set and resolves its paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from . import registry
from .labels import LabelCheck
from .rules import Rule


HUB_PREFIX = "hf:"  # a queries entry naming a Hugging Face hub dataset, not a file


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    model: str = Field(description="embedded name (see `distill models`), model dir, .gguf file or hub id")
    backend: Literal["local", "openai", "tinker"] = Field(
        "local", description="local (transformers) | openai (any OpenAI-compatible chat API) | tinker (Tinker API: LoRA training and sampling)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto | cpu | mps | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="local: the weights' dtype; auto is bfloat16 on a GPU that has it and on a CPU with bf16 units (AMX, AVX512_BF16) "
                            "(2-5x fp32's matmul speed there), else float32. LoRA weights and losses stay float32. "
                            "A teacher that is the student's model shares the student's copy, and its dtype")
    # backends openai and tinker. The key itself never goes in a config (it is copied into the run dir).
    # With tinker, `model` stays the local/HF copy of the same weights: the tokenizer that
    # renders the training data, and the base the downloaded adapter is evaluated and served on.
    base_url: str | None = Field(None, pattern=r"^https?://", description="openai: the API root, e.g. http://127.0.0.1:8000/v1; "
                                                                         "tinker: the Tinker API (default: $TINKER_BASE_URL, then Tinker's)")
    api_model: str | None = Field(None, min_length=1, description="openai: the server's model name (default: model); "
                                                                  "tinker: the Tinker base model, e.g. Qwen/Qwen3-8B")
    api_key_env: str | None = Field(None, description="openai, tinker: NAME of the environment variable holding the API key; "
                                                      "unset: no key (tinker: the SDK's own, $TINKER_API_KEY)")
    concurrency: int = Field(8, ge=1, le=1024, description="openai: requests in flight at once")
    timeout: float = Field(60, gt=0, description="openai: seconds one request may take before it is abandoned and retried")
    max_retries: int = Field(5, ge=0, description="openai: retries per request after 429 / 5xx / timeouts / connection errors")
    logprob_token_ids: bool = Field(False, description="openai: ask for log-probabilities with token ids "
                                    "(vLLM's return_tokens_as_token_ids; distill serve honours it), so eval's fidelity "
                                    "and the kl objective can use a teacher that lives only behind its endpoint")

    @model_validator(mode="before")
    @classmethod
    def _no_secret_in_config(cls, data: Any) -> Any:
        import re

        # Raised from here the error's input is this whole section, which explain never
        # echoes, so a pasted key does not end up on the screen or in a log.
        if isinstance(data, dict):
            inline = [k for k in data if isinstance(k, str) and k.lower().replace("-", "_") in
                      ("api_key", "apikey", "key", "token", "api_token", "secret", "openai_api_key")]
            if inline:
                raise ValueError(f"{inline[0]}: an API key never goes in the config (the run dir keeps a copy of it); "
                                 f"export it in an environment variable and set api_key_env to that variable's NAME")
            env = data.get("api_key_env")
            if env is not None and not (isinstance(env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", env)):
                raise ValueError("api_key_env: expected the NAME of an environment variable (letters, digits and _, "
                                 "e.g. OPENAI_API_KEY), not the key itself")
        return data

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> "ModelConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url, the server's API root (e.g. http://127.0.0.1:8000/v1)")
        if self.logprob_token_ids and self.backend != "openai":
            raise ValueError(f"logprob_token_ids is for backend openai, not {self.backend}; remove it "
                             f"(a local model's log-probabilities carry token ids already)")
        if self.backend == "tinker" and not self.api_model:
            raise ValueError("backend tinker needs api_model, the Tinker base model (e.g. Qwen/Qwen3-8B); "
                             "model stays the local or hub copy of the same weights")
        return self

    @property
    def served_name(self) -> str:
        """The model name sent to an API server."""
        return self.api_model or self.model


SYNTH_CATEGORIES = ("facts", "opinions", "rules", "edge_cases", "off_topic", "adversarial")


class SynthesizeConfig(Strict):
    n: int = Field(0, ge=0, description="write N user queries from the system prompt alone (0: none)")
    seed: int = 0
    model: ModelConfig | None = Field(None, description="the model that plays the user; default: the teacher")
    categories: list[Literal[SYNTH_CATEGORIES]] = Field(list(SYNTH_CATEGORIES), min_length=1,
                                                        description="kinds of query to steer across, in turn")
    topic_samples: int = Field(4, ge=0, description="per category: samples in which the model proposes topics")
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(40, ge=8, description="per sampled query")
    repetition_penalty: float = Field(1.15, ge=1.0)
    max_chars: int = Field(200, ge=10, description="longer outputs are dropped")
    max_attempts: int | None = Field(None, ge=1, description="stop sampling after this many tries; default 8 x n")


class FollowUpsConfig(Strict):
    share: float = Field(0.0, ge=0, le=1, description="the share of single queries (given or synthesised) that a "
                                                      "simulated user carries on into a conversation (0: none)")
    turns: int = Field(3, ge=2, le=8, description="user turns in each such conversation, the query included")
    model: ModelConfig | None = Field(None, description="the model that plays the user; default: synthesize's, "
                                                        "else the teacher")
    seed: int = 0
    temperature: float = Field(0.9, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(40, ge=8, description="per sampled user turn")
    repetition_penalty: float = Field(1.15, ge=1.0)
    max_chars: int = Field(200, ge=10, description="longer user turns are tried again")
    tries: int = Field(3, ge=1, le=10, description="samples per user turn before a plain follow-up of its kind stands in")


class QueriesConfig(Strict):
    files: list[str] = Field([], description="JSONL, CSV, .txt (one per line), a `datasets` save_to_disk dir, "
                                             "or hf:OWNER/NAME (a hub dataset, online only)")
    field: str = Field("query", min_length=1, description="JSONL / CSV / datasets: the column holding the query")
    id_field: str = Field("id", min_length=1, description="JSONL / CSV / datasets: the column holding its id, if any")
    dataset_split: str = Field("train", min_length=1, description="datasets: which split to read")
    bad_conversations: Literal["error", "drop"] = Field(
        "error", description="a conversation row (OpenAI 'messages' or ShareGPT 'conversations') with its own system "
                             "message, an unknown role, two turns of one side in a row or an empty turn: stop with "
                             "an error naming file, line and field, or drop it with a warning")
    logged_answers: Literal["regenerate", "context"] = Field(
        "regenerate", description="a conversation's logged assistant turns: the teacher answers every user turn anew "
                                  "(regenerate), or they are kept as its history and the teacher answers the last "
                                  "user turn only (context)")
    dedup_threshold: float = Field(0.9, gt=0, le=1, description="MiniLM cosine at or above which two queries are near-duplicates")
    synthesize: SynthesizeConfig = SynthesizeConfig()
    follow_ups: FollowUpsConfig = FollowUpsConfig()
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N given queries (smoke runs)")

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "QueriesConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self

    @model_validator(mode="after")
    def _some_queries(self) -> "QueriesConfig":
        if not self.files and self.synthesize.n == 0:
            raise ValueError("no queries: list files, or set synthesize.n to have them written from the system prompt")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(0.7, ge=0, description="0 means greedy")
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(96, ge=1)
    repetition_penalty: float = Field(1.0, ge=1.0, description="applied to tokens already generated")
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20, description="also keep each teacher token's log-probability "
                                     "and the k most likely tokens (for soft-label distillation); remote servers may not offer them")
    best_of: int | None = Field(None, ge=1, le=64, description="draw up to N teacher answers per query and keep the first "
                                "that passes every applicable checks.rules rule, else the one passing most")


class LoraConfig(Strict):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class OnPolicyConfig(Strict):
    """How the student samples its own answers in an on_policy step."""
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature (1: its own distribution)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, description="default: sampling.max_tokens")
    samples_per_query: int = Field(1, ge=1, description="answers sampled per train query in a step")
    sample_ahead: int = Field(1, ge=1, description="steps whose answers are sampled in one decode, with the weights of "
                              "the first of them (1: every step samples with its own weights); decoding is memory-bound, "
                              "so K steps' answers cost little more than one step's, and step i of a group learns on "
                              "answers i steps old")


class Phase(Strict):
    objective: Literal[tuple(registry.OBJECTIVES)]
    steps: int = Field(ge=1)


class TrainConfig(Strict):
    """Besides these fields, `train.<objective>` holds the options of an objective that declares
    its own (its module's `Options`), validated by it; `options(name)` reads them."""

    objective: Literal[tuple(registry.OBJECTIVES)] = Field(
        "sft", description=" | ".join(f"{name}: {what}" for name, what in registry.OBJECTIVES.items()))
    phases: list[Phase] | None = Field(None, min_length=1, description="a schedule, e.g. [{objective: kl, steps: 20}, "
                                       "{objective: on_policy, steps: 10}]; replaces objective and steps/epochs")
    topk: int | None = Field(64, ge=1, description="kl: how many of the teacher's likeliest tokens per position are "
                             "kept; null: its whole distribution, scored each step by the local teacher (local trainer)")
    sft_weight: float = Field(0.0, ge=0, le=1, description="kl: share of the loss on the teacher's sampled token "
                              "(hard label); the rest on its top-k distribution")
    on_policy: OnPolicyConfig = OnPolicyConfig()
    turn_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, min_length=1, description="the loss weight of a conversation's answers by turn: its first answer's "
        "tokens weigh the first value, its second the second, and the last value holds for every later answer "
        "(e.g. [1, 2] weighs turns 2 and later twice); the step's loss stays a weighted token mean. null: all 1. "
        "Objectives that learn whole conversations (sft, kl, jsd off-policy)")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="optimiser steps; or set epochs")
    epochs: float | None = Field(None, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(10, ge=1, description="validation loss every N steps")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="older checkpoints are removed")
    gradient_checkpointing: bool = False
    max_seq_len: int = Field(1024, ge=8)
    seed: int = 0
    objective_options: dict[str, Any] = Field({}, description="read and written as train.<objective>")

    @model_validator(mode="before")
    @classmethod
    def _gather_objective_options(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in registry.OBJECTIVES and k not in cls.model_fields for k in data):
            data = dict(data)
            found = {k: data.pop(k) for k in list(data) if k in registry.OBJECTIVES and k not in cls.model_fields}
            data["objective_options"] = {**data.get("objective_options", {}), **found}
        return data

    @model_validator(mode="after")
    def _objective_options(self) -> "TrainConfig":
        for name, value in self.objective_options.items():
            options = getattr(registry.load(name), "Options", None)
            if options is None:
                raise ValueError(f"train.{name}: the {name} objective has no options")
            if not isinstance(value, options):
                try:
                    self.objective_options[name] = options.model_validate(value)
                except ValidationError as err:  # raised from here its fields would be named from train only
                    raise ValueError("; ".join(f"train.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                               for e in err.errors())) from None
        return self

    @model_serializer(mode="wrap")
    def _flatten_objective_options(self, handler) -> dict:
        data = handler(self)
        options = data.pop("objective_options", {})
        return {**data, **options}

    def options(self, name: str):
        """Objective `name`'s options: its `train.<name>` section, or its defaults."""
        options = self.objective_options.get(name)
        return options if options is not None else registry.load(name).Options()

    @model_validator(mode="after")
    def _some_turn_weighs(self) -> "TrainConfig":
        if self.turn_weights is not None and not any(w > 0 for w in self.turn_weights):
            raise ValueError("train.turn_weights: every weight is 0, so nothing would be learnt; give a turn a weight above 0")
        return self

    @model_validator(mode="after")
    def _one_budget(self) -> "TrainConfig":
        if self.phases is not None:
            if self.steps is not None or self.epochs is not None:
                raise ValueError("train.phases sets the step budget; leave out train.steps and train.epochs")
            return self
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps or train.epochs (or train.phases)")
        return self

    def objective_at(self, step: int) -> str:
        """The objective of optimiser step `step` (0-based)."""
        for phase in self.phases or []:
            if step < phase.steps:
                return phase.objective
            step -= phase.steps
        return self.phases[-1].objective if self.phases else self.objective

    def objectives(self) -> set[str]:
        return {p.objective for p in self.phases} if self.phases else {self.objective}


class JudgeConfig(Strict):
    """An OpenAI-compatible model that compares student and base answers with the teacher's (judge.py)."""
    model: ModelConfig = Field(description="the judge: backend openai, base_url, api_model, api_key_env")
    rubric_file: str | None = Field(None, description="the judge's instructions; default: promptdistill/judge_rubric.md")
    max_tokens: int = Field(64, ge=1, description="per verdict")
    seed: int = 0


class EvalConfig(Strict):
    classifier_train_size: int = Field(96, ge=8, description="train-split queries answered by the base model to train the persona classifier")
    latency_queries: int = Field(12, ge=1, description="test queries timed one by one for latency")
    bootstrap: int = Field(2000, ge=100)
    judge: JudgeConfig | None = Field(None, description="an LLM judge comparing answers pairwise (optional)")
    skills: str = Field("builtin", min_length=1, description="kept skills (kept_skills.py): `builtin` (the shipped "
                        "questions), `none`, or a .jsonl/.csv file of question, answers (regex patterns), category")


class ChecksConfig(Strict):
    """Where `distill validate` draws the line between a warning and an error for the
    teacher's answers (per-answer problems that one bad row does not make fatal)."""
    max_unusable_share: float = Field(0.75, ge=0, le=1, description="error if more of the answers than this are "
                                      "empty or cut off at max_tokens before a full sentence (train drops them)")
    max_refusal_share: float = Field(0.1, ge=0, le=1, description="error if more of the answers than this refuse "
                                     "or speak as an AI model")
    verbatim_words: int = Field(12, ge=4, description="an answer repeating this many consecutive words of the "
                                "system prompt recites it (the student would learn to recite it)")
    # A question like "what are your rules?" draws an honest recital now and then (3 of 300
    # synthesised Beethoven queries did): a warning each; many of them, an error.
    max_recital_share: float = Field(0.02, ge=0, le=1, description="error if more of the answers than this recite "
                                     "the system prompt verbatim")
    rules: list[Rule] = Field([], description="what the prompt demands of an answer, checked on its text (rules.py)")
    min_rule_share: float = Field(0.5, ge=0, le=1, description="warn when the teacher's answers follow a rule less "
                                  "often than this (the student cannot learn what it rarely sees)")
    labels: LabelCheck | None = Field(None, description="a task prompt's answer label: pattern (one capture group) and "
                                      "allowed labels; eval scores label agreement with the teacher (labels.py)")

    @model_validator(mode="after")
    def _unique_rule_names(self) -> "ChecksConfig":
        names = [r.name for r in self.rules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rules: names must be unique, {twice[0]!r} is used twice")
        return self


class Price(Strict):
    input_per_1m: float = Field(ge=0, description="price per 1M input tokens")
    output_per_1m: float = Field(ge=0, description="price per 1M output tokens")

    def million_calls(self, input_tokens: float, output_tokens: float) -> float:
        """What 1M calls of this many input and output tokens cost (divide by 1e6 for one call)."""
        return input_tokens * self.input_per_1m + output_tokens * self.output_per_1m


class PricingConfig(Strict):
    source: str = Field(description="where these prices come from")
    date: str = Field(description="when they were read")
    currency: str = "USD"
    teacher: Price
    student: Price
    training_per_1m_tokens: float = Field(ge=0, description="one-time: price per 1M trained tokens")


class TrackingConfig(Strict):
    """Where train and eval also log their numbers (tracking.py); not a stage input."""
    backend: Literal["tensorboard", "wandb", "mlflow"]
    project: str | None = Field(None, min_length=1, description="wandb project / mlflow experiment (default: the run name)")
    dir: str | None = Field(None, min_length=1, description="tensorboard: log dir (default: <run_dir>/tb); "
                                                            "wandb: its files dir (default: run_dir); mlflow: tracking URI")


class RunConfig(Strict):
    name: str = Field(min_length=1)
    run_dir: str | None = Field(None, description="default: runs/<name>")
    system_prompt: str | None = Field(None, description="the prompt text, inline")
    system_prompt_file: str | None = Field(None, description="or a file holding it")
    teacher: ModelConfig
    student: ModelConfig
    queries: QueriesConfig
    sampling: SamplingConfig = SamplingConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig
    eval: EvalConfig = EvalConfig()
    checks: ChecksConfig = ChecksConfig()
    pricing: PricingConfig | None = None
    tracking: TrackingConfig | None = Field(None, description="absent: no experiment tracking")

    @model_validator(mode="after")
    def _one_prompt(self) -> "RunConfig":
        if (self.system_prompt is None) == (self.system_prompt_file is None):
            raise ValueError("set exactly one of system_prompt (inline) or system_prompt_file")
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
