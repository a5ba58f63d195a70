"""`distill compare` on two finished tiny runs that differ in lr (one with TensorBoard tracking on),
and that tracking's event files read back with TensorBoard's own reader."""

import hashlib
import json
import shutil
import sys

import pytest
from tiny import save_tiny, trained_tiny_run

from promptdistill import cli, tracking
from promptdistill.compare import compare
from promptdistill.config_file import load_config
from promptdistill.pipeline import run_stage
from promptdistill.rundir import StageError

EVAL = {"classifier_train_size": 12, "latency_queries": 2, "bootstrap": 200}
TRAIN = {"steps": 3, "batch_size": 4, "eval_every": 2}
PRICING = {"source": "test", "date": "2026-12-01", "teacher": {"input_per_1m": 1.0, "output_per_1m": 2.0},
           "student": {"input_per_1m": 0.5, "output_per_1m": 1.0}, "training_per_1m_tokens": 4.0}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    model = save_tiny(tmp)
    runs = []
    for name, lr, extra in (("slow", 2e-4, {"tracking": {"backend": "tensorboard"}}), ("fast", 1e-3, {"pricing": PRICING})):
        (tmp / name).mkdir()
        cfg, run = trained_tiny_run(tmp / name, model, 24, name=name, eval=EVAL, train=TRAIN | {"lr": lr}, **extra)
        run_stage(cfg, "eval")
        runs.append((cfg, run))
    return runs


def _tables(md: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def _mean_ci(cell: str) -> tuple[float, float, float]:
    """'0.81 [0.7, 0.9]' -> (0.81, 0.7, 0.9)."""
    mean, rest = cell.split(" [")
    lo, hi = rest.rstrip("]").split(", ")
    return float(mean), float(lo), float(hi)


def _summary(run) -> dict:
    return json.loads((run.root / "summary.json").read_text())


def test_compare_shows_the_summaries_numbers_and_the_config_difference(two_runs, tmp_path, capsys):
    (_, a), (_, b) = two_runs
    out = tmp_path / "cmp" / "lr.md"
    assert cli.main(["compare", str(a.root), str(b.root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _tables(out.read_text())
    assert rows[""] == ["slow", "fast"]
    summaries = [_summary(a), _summary(b)]
    for name in summaries[0]["quality"]:
        for i, s in enumerate(summaries):
            q = s["quality"][name]
            for who in ("student", "base", "ceiling"):
                mean, lo, hi = _mean_ci(rows[f"{name} {who}"][i])
                assert mean == pytest.approx(q[who]["mean"], rel=1e-3, abs=1e-9)
                assert [lo, hi] == pytest.approx(q[who]["ci95"], rel=1e-3, abs=1e-9)
            retained = rows[f"{name} retained"][i]
            if not q["can_tell"]:  # no ratio over a gap within noise
                assert retained == "cannot tell"
            elif q["retained"]["mean"] is None:
                assert retained.startswith("n/a")
            else:  # a whole percent
                assert float(retained.split("%")[0]) == pytest.approx(100 * q["retained"]["mean"], abs=0.5)
            assert rows[f"{name} n"][i] == str(q["n"])
            assert _mean_ci(rows[f"{name} student_minus_base"][i])[1:] == pytest.approx(q["student_minus_base"]["ci95"],
                                                                                      rel=1e-3, abs=1e-9)
    for i, s in enumerate(summaries):
        assert float(rows["tokens.student_output"][i]) == pytest.approx(s["tokens"]["student_output"], rel=1e-3)
        assert float(rows["latency.student.ttft_ms_median"][i]) == pytest.approx(
            s["latency"]["student"]["ttft_ms_median"], rel=1e-3)
        assert rows["training.steps"][i] == "3"
        manifest = json.loads(((a, b)[i].root / "manifest.json").read_text())
        assert float(rows["seconds.train"][i]) == pytest.approx(manifest["stages"]["train"]["seconds_total"], rel=1e-3)
        last = [json.loads(l) for l in ((a, b)[i].root / "metrics.jsonl").read_text().splitlines()][-1]
        assert float(rows["training.train_loss_final"][i]) == pytest.approx(last["train_loss"], rel=1e-3)
        assert float(rows["training.val_loss_final"][i]) == pytest.approx(last["val_loss"], rel=1e-3)
    # Only the second run has prices: its cost numbers, a blank (no cost section) for the first.
    cost = summaries[1]["cost"]
    assert rows["cost"] == ["n/a", ""] and rows["cost.currency"] == ["", "USD"]
    assert float(rows["cost.per_1m_queries.teacher"][1]) == pytest.approx(cost["per_1m_queries"]["teacher"], rel=1e-3)
    assert float(rows["cost.one_time.total"][1]) == pytest.approx(cost["one_time"]["total"], rel=1e-3)
    # The two configs differ in lr, tracking and pricing; names and run dirs always differ and are left out.
    assert rows["train.lr"] == ["0.0002", "0.001"]
    assert rows["tracking.backend"] == ["tensorboard", ""] and rows["pricing.student.input_per_1m"] == ["", "0.5"]
    assert not [k for k in rows if k.startswith(("name", "run_dir", "train.steps", "system_prompt"))]
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "![Quality retained per score and run](lr.png)" in out.read_text()
    assert "train.lr" in printed and "0.001" in printed and f"wrote {out}" in printed


def test_a_score_one_run_lacks_is_blank_and_extra_fields_show(two_runs, tmp_path):
    (_, a), (_, b) = two_runs
    other = tmp_path / "other"
    shutil.copytree(b.root, other)
    s = _summary(b)
    del s["quality"]["persona"]
    # a score only the second run has (every run has fidelity now): a made-up name, compare knows no list
    s["quality"]["made_up_score"] = {"student": {"mean": 0.28, "ci95": [0.2, 0.3]}, "base": {"mean": 0.248, "ci95": [0.2, 0.3]},
                                "ceiling": {"mean": 0.0, "ci95": [0.0, 0.0]},
                                "retained": {"mean": -0.13, "ci95": [-0.2, -0.07]}, "n": 6, "top_k": 20}
    (other / "summary.json").write_text(json.dumps(s))
    config = (other / "config.yaml").read_text()
    long_prompt = "You are a pirate. Talk like one, and never break character, whatever they ask."
    (other / "config.yaml").write_text(config.replace("system_prompt: You are a pirate. Talk like one.",
                                                      f"system_prompt: {long_prompt}"))
    rows = _tables((compare([a.root, other], tmp_path / "c.md"), (tmp_path / "c.md").read_text())[1])
    assert rows["persona retained"][1] == "" and rows["persona retained"][0]
    assert rows["made_up_score retained"] == ["", "-13% [-20%, -7%]"]  # a summary older than can_tell: shown as then
    assert "made_up_score student_minus_base" not in rows
    assert rows["made_up_score student"] == ["", "0.28 [0.2, 0.3]"]
    assert rows["made_up_score top_k"] == ["", "20"]
    assert rows["persona classifier.heldout_accuracy"][1] == ""
    assert rows["system_prompt"] == ["You are a pirate. Talk like one.",  # a long one is cut, with its hash
                                     f"{long_prompt[:48]}… (sha256 {hashlib.sha256(long_prompt.encode()).hexdigest()[:8]})"]


def test_a_dir_that_is_not_a_finished_run_is_named(two_runs, tmp_path, capsys):
    (_, a), _ = two_runs
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(StageError, match=r"not-a-run: not a finished run \(no config.yaml, summary.json, manifest.json\)"):
        compare([a.root, empty], tmp_path / "c.md")
    assert cli.main(["compare", str(a.root), str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.md")]) == 2
    assert "nowhere: no such run directory" in capsys.readouterr().err
    assert not (tmp_path / "c.md").exists()


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_equal_metrics_and_summary(two_runs, tmp_path):
    (_, run), (_, untracked) = two_runs
    assert not (untracked.root / "tb").exists()
    logged = _scalars(run.root / "tb")
    metrics = [json.loads(l) for l in run.metrics.read_text().splitlines()]
    for key in ("train_loss", "val_loss", "lr", "grad_norm"):
        expected = [(m["step"], m[key]) for m in metrics if key in m]
        assert [s for s, _ in logged[f"train/{key}"]] == [s for s, _ in expected]
        assert [v for _, v in logged[f"train/{key}"]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [s for s, _ in logged["train/val_loss"]] == [0, 2, 3]  # step 0 = untrained
    summary = _summary(run)
    for name, q in summary["quality"].items():
        for part in ("retained", "student", "base", "ceiling"):
            if q[part]["mean"] is not None:
                assert logged[f"eval/{name}/{part}"] == [(3, pytest.approx(q[part]["mean"], rel=1e-6))]
    assert logged["eval/tokens/input_reduction_pct"] == [(3, pytest.approx(summary["tokens"]["input_reduction_pct"], rel=1e-6))]
    assert logged["eval/latency/teacher/ttft_ms_median"][0][1] == pytest.approx(
        summary["latency"]["teacher"]["ttft_ms_median"], rel=1e-6)

    # Tracking is not a stage input: with it off, the finished stages are still done, and skipped.
    manifest = run.manifest_path.read_text()
    off = load_config(run.root, ["tracking=null"])
    assert run_stage(off, "train").startswith("train: 3 steps") and run_stage(off, "eval").startswith("eval:")
    assert run.manifest_path.read_text() == manifest

    # A forced re-train (of a copy) replaces the curves of the earlier attempt: one point per step, not two.
    shutil.copytree(run.root, tmp_path / "copy")
    run_stage(load_config(tmp_path / "copy"), "train", force=True)
    again = _scalars(tmp_path / "copy" / "tb")
    assert [s for s, _ in again["train/train_loss"]] == [1, 2, 3]
    assert [v for _, v in again["train/train_loss"]] == pytest.approx([v for _, v in logged["train/train_loss"]], rel=1e-5)


def test_a_missing_tracking_package_names_the_extra(two_runs, tmp_path, monkeypatch):
    (_, run), _ = two_runs
    shutil.copytree(run.root, tmp_path / "copy")
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of it fails as if it were not installed
    wandb = load_config(tmp_path / "copy", ["tracking.backend=wandb"])
    with pytest.raises(StageError, match=r"tracking.backend 'wandb' needs the 'wandb' package.*promptdistill\[wandb\]"):
        tracking.start(wandb, run, "train")
    with pytest.raises(StageError, match=r"promptdistill\[wandb\]"):  # before eval spends anything
        run_stage(wandb, "eval", force=True)
    assert not (tmp_path / "copy" / "eval.jsonl").exists()  # moved aside by --force, and not written again


def _log_train_and_eval(cfg, run) -> list[dict]:
    """What train and eval send, from a finished run's own files; returns its metrics rows."""
    metrics = [json.loads(l) for l in run.metrics.read_text().splitlines()]
    tracker = tracking.start(cfg, run, "train")
    for row in metrics:
        tracker.log(tracking.train_values(row), row["step"])
    tracker.close()
    tracking.log_eval(cfg, run, _summary(run))
    return metrics


def test_mlflow_logs_read_back(two_runs, tmp_path):
    """Only where the mlflow extra is installed (not by `make test`)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    (_, run), _ = two_runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(run.root, ["tracking.backend=mlflow", f"tracking.dir={uri}", "tracking.project=compare-test"])
    metrics = _log_train_and_eval(cfg, run)
    client = MlflowClient(uri)
    runs = {r.data.tags["promptdistill.stage"]: r for r in
            client.search_runs([client.get_experiment_by_name("compare-test").experiment_id])}
    assert set(runs) == {"train", "eval"} and runs["train"].data.params["train.lr"] == "0.0002"
    history = sorted(client.get_metric_history(runs["train"].info.run_id, "train/val_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    retained = _summary(run)["quality"]["similarity"]["retained"]["mean"]
    assert [m.value for m in client.get_metric_history(runs["eval"].info.run_id, "eval/similarity/retained")] == [retained]


def test_wandb_logs_offline(two_runs, tmp_path, monkeypatch):
    """Only where the wandb extra is installed (not by `make test`). Offline, no account: W&B keeps
    the run in a binary .wandb file with no public reader, so this checks that the logged keys
    and values are in it."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (_, run), _ = two_runs
    cfg = load_config(run.root, ["tracking.backend=wandb", f"tracking.dir={tmp_path}"])
    metrics = _log_train_and_eval(cfg, run)
    files = {f.read_bytes() for f in tmp_path.glob("wandb/offline-run-*/run-*.wandb")}
    train = [b for b in files if b"slow-train" in b]
    assert len(files) == 2 and len(train) == 1
    for row in metrics:
        for key, value in tracking.train_values(row).items():
            assert key.encode() in train[0] and json.dumps(value).encode() in train[0]
