"""Bad input, driven through the CLI in-process: each gets exit code 2 and one clear line
naming the file and line or the config field (no traceback), and the outputs already in
the run dir stay byte-for-byte as they were."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from promptdistill.cli import main
from promptdistill.config_file import load_config
from promptdistill.models import ModelError, resolve_model
from promptdistill.render import prompt_ids
from promptdistill.teacher import teacher_messages
from promptdistill.stages.generate import row_key
from tiny import QUESTIONS, save_tiny, tiny_model, tiny_tokenizer

QUERIES = [{"id": f"q{i}", "query": q} for i, q in enumerate(QUESTIONS[:10])]
# What an earlier run left in the run dir; no bad input may change it.
TEACHER_BEFORE = '{"id": "old", "key": "0123456789abcdef0123", "split": "train", "completion": "Kept as it was."}\n'


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model"), "chatml")


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PROMPTDISTILL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def config_data(tiny: Path, tmp_path: Path, **sections) -> dict:
    data = {"name": "bad", "run_dir": str(tmp_path / "run"), "system_prompt": "You are a pirate. Answer briefly.",
            "teacher": {"model": str(tiny)}, "student": {"model": str(tiny)},
            "queries": {"files": ["queries.jsonl"], "train": 0.6, "val": 0.2, "test": 0.2},
            "sampling": {"max_tokens": 8, "batch_size": 4}, "train": {"steps": 2, "batch_size": 2}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = data[key] | value
        else:
            data[key] = value
    return data


def project(tmp_path: Path, tiny: Path, config: dict | str | None = None, rows: list[dict] | bytes | None = None,
            **sections) -> Path:
    """Write queries.jsonl (`rows`), config.yaml (`config`, or the defaults updated with
    `sections`) into tmp_path and an earlier run's teacher.jsonl into tmp_path/run; return
    the config path."""
    qpath = tmp_path / "queries.jsonl"
    if isinstance(rows, bytes):
        qpath.write_bytes(rows)
    else:
        qpath.write_text("".join(json.dumps(q) + "\n" for q in rows or QUERIES), encoding="utf-8")
    if config is None:
        config = config_data(tiny, tmp_path, **sections)
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "teacher.jsonl").write_text(TEACHER_BEFORE, encoding="utf-8")
    return path


def outputs(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.glob("*.jsonl"))}


def fails(capsys, argv: list[str], run: Path | None, *fragments: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` message holding every fragment, and
    leave the run dir's outputs as they were. Returns the message."""
    before = outputs(run) if run is not None else {}
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    starts = [m.end() for m in re.finditer(r"(^|[\r\n])(?=error: )", err)]
    assert starts, err
    message = err[starts[0]:]  # the progress bars of model loading may come first
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if run is not None:
        assert outputs(run) == before and "teacher.jsonl" in before
    print(message.strip())  # pytest -s shows every message
    return message


def queries_done(capsys, config: Path) -> None:
    assert main(["queries", str(config)]) == 0
    capsys.readouterr()


# --- the config ------------------------------------------------------------------------


def test_missing_config_file(tmp_path, capsys):
    fails(capsys, ["generate", tmp_path / "nope.yaml"], None, f"{tmp_path / 'nope.yaml'}: config file not found")


def test_run_dir_without_config(tmp_path, capsys):
    fails(capsys, ["train", tmp_path], None, f"{tmp_path / 'config.yaml'}: config file not found")


def test_yaml_syntax_error_names_file_and_line(tiny, tmp_path, capsys):
    text = yaml.safe_dump(config_data(tiny, tmp_path), sort_keys=False).replace("name: bad\n", "name: bad\nteacher: model: x\n")
    config = project(tmp_path, tiny, config=text)
    fails(capsys, ["queries", config], tmp_path / "run", f"{config}:2:", "YAML syntax error")


def test_top_level_must_be_a_mapping(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, config="- name: bad\n")
    fails(capsys, ["queries", config], tmp_path / "run", f"{config}: expected a mapping")


@pytest.mark.parametrize("sections, fragment", [
    ({"sytem_prompt": "x"}, "sytem_prompt: unknown field (did you mean 'system_prompt'?)"),
    ({"sampling": {"temprature": 0.5}}, "sampling.temprature: unknown field (did you mean 'temperature'?)"),
    ({"train": {"learning_rate": 1e-4}}, "train.learning_rate: unknown field"),
])
def test_unknown_field_names_it_and_suggests_the_closest(tiny, tmp_path, capsys, sections, fragment):
    config = project(tmp_path, tiny, **sections)
    fails(capsys, ["generate", config], tmp_path / "run", f"{config}: invalid config", fragment)


@pytest.mark.parametrize("sections, fragments", [
    ({"train": {"batch_size": "eight"}}, ["train.batch_size:", "'eight'"]),
    ({"sampling": {"top_p": 1.5}}, ["sampling.top_p:", "less than or equal to 1", "1.5"]),
    ({"sampling": {"max_tokens": 0}}, ["sampling.max_tokens:", "greater than or equal to 1"]),
    ({"queries": {"train": 0.5}}, ["queries:", "must sum to 1, got 0.9"]),
    ({"train": {"steps": 3, "epochs": 1}}, ["train:", "exactly one of train.steps or train.epochs"]),
    ({"teacher": "smollm2-135m"}, ["teacher:", "valid dictionary"]),
])
def test_wrong_type_or_out_of_range_names_the_field(tiny, tmp_path, capsys, sections, fragments):
    config = project(tmp_path, tiny, **sections)
    fails(capsys, ["train", config], tmp_path / "run", f"{config}: invalid config", *fragments)


def test_empty_system_prompt(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, system_prompt=" \n\t")
    fails(capsys, ["generate", config], tmp_path / "run", "system_prompt: the system prompt is empty")


def test_missing_system_prompt_file(tiny, tmp_path, capsys):
    data = config_data(tiny, tmp_path, system_prompt_file="persona.md")
    del data["system_prompt"]
    config = project(tmp_path, tiny, config=yaml.safe_dump(data))
    fails(capsys, ["generate", config], tmp_path / "run", f"system_prompt_file: {tmp_path / 'persona.md'} not found")


@pytest.mark.parametrize("override, fragment", [
    ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
    ("name.first=x", "--set 'name.first=x': 'name' is not a section"),
    ("train.steps=many", "train.steps:"),
    ("trian.steps=3", "trian: unknown field (did you mean 'train'?)"),
])
def test_bad_set_override(tiny, tmp_path, capsys, override, fragment):
    config = project(tmp_path, tiny)
    fails(capsys, ["generate", config, "--set", override], tmp_path / "run", fragment)


# --- the queries -------------------------------------------------------------------------


def test_missing_queries_file(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, queries={"files": ["absent.jsonl"]})
    fails(capsys, ["queries", config], tmp_path / "run", f"queries file {tmp_path / 'absent.jsonl'} not found")


GOOD = '{"id": "a", "query": "Ahoy?"}\n'


@pytest.mark.parametrize("content, where, fragment", [
    (GOOD + '{"id": "b", "query": "Why?"\n' + GOOD.replace('"a"', '"c"'), 2, "malformed JSON"),
    (GOOD + '["not", "an", "object"]\n', 2, "expected a JSON object, got list"),
    (GOOD + '{"id": "b", "text": "no query field"}\n', 2, "expected a string field 'query'"),
    (GOOD + '{"id": "b", "query": 42}\n', 2, "expected a string field 'query'"),
    (GOOD + GOOD.replace('"a"', '"b"') + '{"id": "c", "query": "   "}\n', 3, "empty query"),
])
def test_bad_query_line_names_file_and_line(tiny, tmp_path, capsys, content, where, fragment):
    config = project(tmp_path, tiny, rows=content.encode())
    fails(capsys, ["queries", config], tmp_path / "run", f"{tmp_path / 'queries.jsonl'}:{where}: {fragment}")


def test_non_utf8_queries_file_names_line_and_byte(tiny, tmp_path, capsys):
    content = (GOOD + '{"id": "b", "query": "Caf\xe9?"}\n').encode("latin-1")
    config = project(tmp_path, tiny, rows=content)
    byte = content.index(b"\xe9")
    fails(capsys, ["queries", config], tmp_path / "run", f"{tmp_path / 'queries.jsonl'}:2: not UTF-8 text (byte {byte})")


def test_empty_queries_file(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, rows=b"\n\n")
    fails(capsys, ["queries", config], tmp_path / "run", f"{tmp_path / 'queries.jsonl'}: no queries in this file")


def test_duplicate_ids_name_the_id_and_both_places(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, rows=QUERIES[:3] + [{"id": "q1", "query": "Again?"}])
    fails(capsys, ["queries", config], tmp_path / "run", "duplicate query id 'q1' at queries.jsonl:2, queries.jsonl:4")


def test_empty_train_split_from_a_tiny_fraction(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, queries={"train": 0.01, "val": 0.49, "test": 0.5})
    fails(capsys, ["queries", config], tmp_path / "run",
          "the train split is empty: 10 queries x queries.train 0.01 rounds to 0")


# --- generate --------------------------------------------------------------------------


def test_query_longer_than_the_teacher_context(tiny, tmp_path, capsys):
    long = "What do you think of the quick brown fox? " * 100
    config = project(tmp_path, tiny, rows=QUERIES + [{"id": "long", "query": long}])
    queries_done(capsys, config)
    cfg = load_config(config)
    n = len(prompt_ids(tiny_tokenizer("chatml"), teacher_messages(cfg, long.strip())))
    assert n > 2048  # the tiny model's max_position_embeddings
    fails(capsys, ["generate", config], tmp_path / "run",
          f"query 'long' (queries.jsonl:11): its teacher prompt (system prompt + query) is {n} tokens, "
          f"+ sampling.max_tokens 8 = {n + 8} > the teacher's context of 2048 tokens", "lower sampling.max_tokens")


def test_generate_before_queries(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    fails(capsys, ["generate", config], tmp_path / "run", "queries.jsonl is missing or empty; run `distill queries` first")


def test_hand_edited_teacher_file_with_a_broken_line_is_not_repaired(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    queries_done(capsys, config)
    teacher = tmp_path / "run" / "teacher.jsonl"
    broken = TEACHER_BEFORE + '{"id": "q1", "completion": oops}\n' + TEACHER_BEFORE.replace("old", "older")
    teacher.write_text(broken, encoding="utf-8")
    assert main(["generate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{teacher}:2: malformed JSON" in err
    assert teacher.read_text(encoding="utf-8") == broken


@pytest.mark.parametrize("model, fragment", [
    ("smolm2-135m", "model 'smolm2-135m': not a known embedded model (smollm2-135m), a model dir, a .gguf file "
                    "or a hub id (org/name); did you mean 'smollm2-135m'?"),
    ("MISSING_DIR", "model MISSING_DIR: no such model dir"),
    ("NO_CONFIG_DIR", "model NO_CONFIG_DIR: NO_CONFIG_DIR is a directory but has no config.json"),
    ("MISSING_GGUF", "model MISSING_GGUF: GGUF file not found"),
])
def test_bad_teacher_model(tiny, tmp_path, capsys, model, fragment):
    paths = {"MISSING_DIR": tmp_path / "models" / "nope", "NO_CONFIG_DIR": tmp_path / "models" / "empty",
             "MISSING_GGUF": tmp_path / "models" / "nope.gguf"}
    (tmp_path / "models" / "empty").mkdir(parents=True)
    (tmp_path / "models" / "empty" / "tokenizer.json").write_text("{}")
    spec = str(paths.get(model, model))
    config = project(tmp_path, tiny, teacher={"model": spec})
    queries_done(capsys, config)
    fails(capsys, ["generate", config], tmp_path / "run", fragment.replace(model, spec))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from promptdistill.stages.export_gguf import write_gguf

    tokenizer = tiny_tokenizer("chatml")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny_model(tokenizer), tokenizer, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "header only", "random bytes", "empty"])
def test_corrupt_gguf_is_refused_and_leaves_no_cache_dir(tiny_gguf, tmp_path, capsys, cache_home, damage):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "model.gguf"
    bad.write_bytes({"truncated": data[: len(data) * 2 // 3], "header only": data[:200],
                     "random bytes": os.urandom(4096), "empty": b""}[damage])
    fails(capsys, ["models", "fetch", bad], None, f"{bad}: cannot read this GGUF file", "it may be truncated or corrupt")
    with pytest.raises(ModelError, match="truncated or corrupt"):
        resolve_model(str(bad))
    assert not (cache_home / "models").exists() or not list((cache_home / "models").iterdir())


def test_failed_gguf_conversion_leaves_no_half_made_dir(tiny_gguf, tmp_path, cache_home, monkeypatch):
    import promptdistill.models as models

    def disk_full(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"\0" * 100)  # half written
        raise OSError(28, "No space left on device")

    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", disk_full)
    with pytest.raises(OSError, match="No space left"):
        resolve_model(str(tiny_gguf))
    assert list((cache_home / "models").iterdir()) == []
    monkeypatch.setattr(models, "convert_gguf", real)  # the intact file converts, into one dir
    target = resolve_model(str(tiny_gguf))
    assert (target / "config.json").is_file() and list((cache_home / "models").iterdir()) == [target]


# --- train -----------------------------------------------------------------------------


def test_train_before_generate(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    queries_done(capsys, config)
    fails(capsys, ["train", config], tmp_path / "run", "10 queries have no teacher answer yet; run `distill generate` first")


def test_empty_train_split_when_every_answer_was_cut_off(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    queries_done(capsys, config)
    cfg = load_config(config)
    queries = [json.loads(line) for line in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    rows = [{"id": q["id"], "key": row_key(cfg, q["query"]), "split": q["split"],
             "messages": [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": q["query"]}],
             "completion": "Arr, the sea and the", "finish_reason": "length"}
            for q in queries]  # cut off at max_tokens, no full sentence
    (tmp_path / "run" / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fails(capsys, ["train", config], tmp_path / "run",
          f"no training examples: of the train split's answers in {tmp_path / 'run' / 'teacher.jsonl'}, "
          f"6 were cut off at sampling.max_tokens=8 before a full sentence and 0 are longer than train.max_seq_len=1024")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_device_names_the_field(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, teacher={"model": str(tiny), "device": "gpu"})
    fails(capsys, ["queries", config], None, "teacher.device", "'gpu'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_on_a_machine_without_one(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny, teacher={"model": str(tiny), "device": "cuda"})
    queries_done(capsys, config)
    fails(capsys, ["generate", config], tmp_path / "run", "no CUDA GPU")


def test_teacher_without_chat_template(tiny, tmp_path, capsys):
    base = tmp_path / "base-model"
    tokenizer = tiny_tokenizer("chatml")
    tiny_model(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(settings))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = project(tmp_path, tiny, teacher={"model": str(base)})
    queries_done(capsys, config)
    fails(capsys, ["generate", config], tmp_path / "run", "chat template")


def test_fixing_a_bad_model_name_is_not_refused(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    queries_done(capsys, config)
    fails(capsys, ["generate", config, "--set", "teacher.model=smolm2-135m"], tmp_path / "run", "did you mean")
    assert main(["generate", str(config)]) == 0, capsys.readouterr().err


def test_refused_change_leaves_the_run_config_alone(tiny, tmp_path, capsys):
    config = project(tmp_path, tiny)
    queries_done(capsys, config)
    assert main(["generate", str(config)]) == 0
    capsys.readouterr()
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    fails(capsys, ["generate", config, "--set", "sampling.temperature=0.3"], None, "different sampling", "--force")
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before
