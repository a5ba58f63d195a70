import json

import pytest

from promptdistill.rundir import RunDir, StageError, append_jsonl, atomic_write_json, read_jsonl


def test_torn_last_line_is_cut_and_complete_rows_kept(tmp_path, capsys):
    path = tmp_path / "teacher.jsonl"
    append_jsonl(path, [{"id": 1}, {"id": 2}])
    with open(path, "a") as f:
        f.write('{"id": 3, "compl')  # a writer killed mid-line
    assert read_jsonl(path, repair=True) == [{"id": 1}, {"id": 2}]
    assert "torn last line" in capsys.readouterr().out
    assert path.read_text().endswith("}\n")


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2,,}\n')
    with pytest.raises(StageError, match=r"q\.jsonl:3: malformed JSON"):
        read_jsonl(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(StageError, match=r"q\.jsonl:1: expected a JSON object"):
        read_jsonl(path)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_stage_done_skips_refuses_and_resumes(tmp_path):
    run = RunDir(tmp_path)
    out = tmp_path / "out.txt"
    out.write_text("x")
    run.start_stage("s", {"model": "a", "queries": "q1"})
    assert not run.stage_done("s", {"model": "a", "queries": "q1"})  # started, not finished
    run.finish_stage("s", [out], 1.0, "s: done")
    assert run.stage_done("s", {"model": "a", "queries": "q1"})
    with pytest.raises(StageError, match="different model.*--force"):
        run.stage_done("s", {"model": "b", "queries": "q1"})
    # a change in a resumable input means "more to do", not a conflict
    assert not run.stage_done("s", {"model": "a", "queries": "q2"}, resumable=("queries",))
    out.write_text("tampered")
    assert not run.stage_done("s", {"model": "a", "queries": "q1"})


def test_move_aside_never_deletes(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "teacher.jsonl").write_text("row\n")
    dest = run.move_aside([tmp_path / "teacher.jsonl", tmp_path / "absent"])
    assert (dest / "teacher.jsonl").read_text() == "row\n"
    assert not (tmp_path / "teacher.jsonl").exists()
