from pathlib import Path

import pytest
import yaml

from promptdistill.config_errors import ConfigError

from promptdistill.config_file import load_config

EXAMPLE = Path(__file__).parents[1] / "examples" / "beethoven" / "config.yaml"


def write(tmp_path: Path, data: dict | str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def minimal(**extra) -> dict:
    data = {"name": "t", "system_prompt": "Be a pirate.", "teacher": {"model": "smollm2-135m"},
            "student": {"model": "smollm2-135m"}, "queries": {"files": ["q.jsonl"]}, "train": {"steps": 3}}
    data.update(extra)
    return data


def test_example_config_resolves_prompt_file_and_paths():
    cfg = load_config(EXAMPLE)
    assert cfg.system_prompt_file is None and "Beethoven" in cfg.system_prompt
    assert Path(cfg.queries.files[0]).is_absolute() and Path(cfg.queries.files[0]).is_file()
    assert cfg.run_path == Path("runs/beethoven")


def test_resolved_config_round_trips_through_the_run_dir(tmp_path):
    cfg = load_config(EXAMPLE)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    # a run dir is accepted in place of the file, and the run lives where the dir now is
    assert load_config(tmp_path) == cfg.model_copy(update={"run_dir": str(tmp_path)})


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_config(EXAMPLE, ["train.lr=1e-4", "sampling.max_tokens=12", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.sampling.max_tokens == 12
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_field_suggests_the_closest_name(tmp_path):
    path = write(tmp_path, minimal(train={"steps": 3, "learning_rate": 1e-4}))
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown field"):
        load_config(path)
    path = write(tmp_path, minimal(sampling={"temprature": 0.5}))
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        load_config(path)


def test_wrong_type_and_out_of_range_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*'eight'"):
        load_config(write(tmp_path, minimal(train={"steps": 3, "batch_size": "eight"})))
    with pytest.raises(ConfigError, match=r"sampling\.top_p"):
        load_config(write(tmp_path, minimal(sampling={"top_p": 1.5})))


def test_budget_and_prompt_must_be_given_exactly_once(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of train.steps or train.epochs"):
        load_config(write(tmp_path, minimal(train={"steps": 3, "epochs": 1})))
    with pytest.raises(ConfigError, match="exactly one of system_prompt"):
        load_config(write(tmp_path, minimal(system_prompt_file="p.md")))


def test_empty_system_prompt_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="system prompt is empty"):
        load_config(write(tmp_path, minimal(system_prompt="  \n")))


def test_missing_file_yaml_error_and_bad_encoding(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config\.yaml:2:\d+: YAML syntax error"):
        load_config(write(tmp_path, "name: t\nteacher: model: x\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_split_fractions_must_sum_to_one(tmp_path):
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_config(write(tmp_path, minimal(queries={"files": ["q.jsonl"], "train": 0.5, "val": 0.1, "test": 0.1})))


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(EXAMPLE, ["train.lr"])


def test_logprob_token_ids_is_for_an_openai_teacher_and_changes_the_rows_key(tmp_path):
    from promptdistill.answerers import answer_settings

    with pytest.raises(ConfigError, match=r"teacher: .*logprob_token_ids is for backend openai, not local"):
        load_config(write(tmp_path, minimal(teacher={"model": "smollm2-135m", "logprob_token_ids": True})))
    remote = {"model": "made-up/teacher", "backend": "openai", "base_url": "http://127.0.0.1:8000/v1"}
    plain = load_config(write(tmp_path, minimal(teacher=remote)))
    with_ids = load_config(write(tmp_path, minimal(teacher=remote | {"logprob_token_ids": True})))
    assert "logprob_token_ids" not in answer_settings(plain)  # older runs keep their row keys
    assert answer_settings(with_ids) == answer_settings(plain) | {"logprob_token_ids": True}  # rows without ids are not reused


def test_an_objectives_own_options_are_its_train_section(tmp_path):
    # jsd declares Options: train.jsd is validated by them, kept through the run dir's copy, and
    # a run that does not set them dumps no such section (the fingerprints of older runs hold).
    cfg = load_config(write(tmp_path, minimal(train={"steps": 3, "objective": "jsd", "jsd": {"beta": 0.25}})))
    assert cfg.train.options("jsd").beta == 0.25 and cfg.train.options("jsd").on_policy is False
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(tmp_path / "run").train.options("jsd").beta == 0.25
    assert "jsd" not in load_config(write(tmp_path, minimal())).train.model_dump()
    assert load_config(write(tmp_path, minimal())).train.options("jsd").beta == 0.5  # its default
    for section, fragment in (({"bta": 0.3}, r"train\.jsd\.bta"), ({"beta": 3}, r"train\.jsd\.beta"),):
        with pytest.raises(ConfigError, match=fragment):
            load_config(write(tmp_path, minimal(train={"steps": 3, "jsd": section})))
    with pytest.raises(ConfigError, match="the kl objective has no options"):
        load_config(write(tmp_path, minimal(train={"steps": 3, "kl": {"x": 1}})))
