"""Seeds follow what a model is, not where its files lie (models.model_identity): a tiny
model dir copied elsewhere draws the same teacher rows and synthesis samples, another model
others, and a named model (the embedded demo's) is seeded by its row keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from promptdistill.answerers import row_seed
from promptdistill.config_file import load_config
from promptdistill.models import model_identity
from promptdistill.rundir import RunDir
from promptdistill.stages.generate import row_key, row_seeds
from promptdistill.synthesize import _Cached
from tiny import QUESTIONS, save_tiny

REPO = Path(__file__).parents[1]


def config(root: Path, model: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "name": "seeds", "run_dir": str(root / "run"), "system_prompt": "You are a pirate.",
        "teacher": {"model": model}, "student": {"model": model},
        "queries": {"files": [], "synthesize": {"n": 4}}, "train": {"steps": 1}}))
    return load_config(root / "config.yaml")


def seeds(root: Path, model: str) -> tuple[list[int], str]:
    """The teacher's row seeds for four queries, and the key synthesis seeds its samples from."""
    cfg = config(root, model)
    return row_seeds(cfg, QUESTIONS[:4], 0), _Cached(cfg, RunDir(cfg.run_path)).seed_key


def test_a_model_dir_seeds_the_same_draws_wherever_it_lies_and_another_model_others(tmp_path):
    model = save_tiny(tmp_path / "here")
    copy = shutil.copytree(model, tmp_path / "elsewhere" / "deeper" / "copy")
    other = save_tiny(tmp_path / "other", seed=1)  # the same architecture and tokenizer, other weights

    assert model_identity(str(model)) == model_identity(str(copy)) != model_identity(str(other))
    mine = seeds(tmp_path / "a", str(model))
    assert seeds(tmp_path / "b", str(copy)) == mine
    theirs = seeds(tmp_path / "c", str(other))
    assert not set(theirs[0]) & set(mine[0]) and theirs[1] != mine[1]
    assert len(set(mine[0])) == 4  # one seed per row
    # Row keys still hold the spec: a run dir's rows are found under the keys they were written with.
    assert row_key(config(tmp_path / "a", str(model)), QUESTIONS[0]) != row_key(config(tmp_path / "b", str(copy)), QUESTIONS[0])

    # A changed file is hashed again, not served from the process's cache.
    config_json = copy / "config.json"
    config_json.write_text(json.dumps(json.loads(config_json.read_text()) | {"rms_norm_eps": 1e-5}))
    assert model_identity(str(copy)) != model_identity(str(model))


def test_a_named_model_keeps_the_seeds_of_its_row_keys():
    """The embedded demo's teacher rows: a name is its own identity, so its seeds are those of
    its row keys, and the demo's data (and the figures published from it) stay as drawn."""
    cfg = load_config(REPO / "examples" / "beethoven" / "config.yaml")
    queries = [json.loads(line)["query"] for line in (REPO / "examples" / "beethoven" / "queries.jsonl").open()][:2]
    assert model_identity(cfg.teacher.model) == "smollm2-135m"
    assert row_seeds(cfg, queries, 0) == [row_seed(row_key(cfg, q), 0) for q in queries]
    assert row_seeds(cfg, queries, 1) == [250782735430648, 129197328871321]  # eval's teacher-again seeds, pinned
    # The sampling settings are part of a row's key: the demo before max_tokens 64 drew these.
    before = load_config(REPO / "examples" / "beethoven" / "config.yaml", ["sampling.max_tokens=96"])
    assert row_seeds(before, queries, 1) == [93569809368822, 79651995677237]
