"""Stage 1, queries: load the user's queries, check them, split train/val/test.

Writes queries.jsonl: {"id", "query", "split", "source"}. The split is a seeded shuffle
of the ids, so it is the same on every machine and every re-run.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from ..config import RunConfig
from ..rundir import RunDir, StageError, Timer, atomic_write_text, fingerprint, iter_jsonl, sha256_file


def load_queries(path: Path) -> list[dict]:
    """Rows {"id", "query", "source"} from a .jsonl ({"id"?, "query"}) or .txt file (one per line)."""
    if not path.is_file():
        raise StageError(f"queries file {path} not found")
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StageError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    rows = []
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            query = obj.get("query")
            if not isinstance(query, str):
                raise StageError(f"{path}:{lineno}: expected a string field 'query'")
            rows.append({"id": str(obj.get("id", f"{path.stem}-{lineno}")), "query": query, "line": lineno})
    elif path.suffix == ".txt":
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rows.append({"id": f"{path.stem}-{lineno}", "query": line, "line": lineno})
    else:
        raise StageError(f"{path}: unsupported queries format {path.suffix!r} (use .jsonl or .txt)")
    if not rows:
        raise StageError(f"{path}: no queries in this file")
    for row in rows:
        if not row["query"].strip():
            raise StageError(f"{path}:{row['line']}: empty query")
        row["query"] = row["query"].strip()
        row["source"] = f"{path.name}:{row.pop('line')}"
    return rows


def split_rows(rows: list[dict], train: float, val: float, seed: int) -> list[dict]:
    """Seeded shuffle of ids, then cut into train/val/test by the given fractions."""
    ids = sorted(r["id"] for r in rows)
    random.Random(seed).shuffle(ids)
    n_train = round(len(ids) * train)
    n_val = round(len(ids) * val)
    split_of = {i: "train" if k < n_train else "val" if k < n_train + n_val else "test" for k, i in enumerate(ids)}
    return [{"id": r["id"], "query": r["query"], "split": split_of[r["id"]], "source": r["source"]} for r in rows]


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    q = cfg.queries
    return {"query_files": {f: sha256_file(Path(f)) if Path(f).is_file() else None for f in q.files},
            "split": fingerprint([q.train, q.val, q.test, q.seed, q.limit])}


def run(cfg: RunConfig, run: RunDir) -> str:
    with Timer() as t:
        rows = [row for f in cfg.queries.files for row in load_queries(Path(f))]
        dupes = [i for i, n in Counter(r["id"] for r in rows).items() if n > 1]
        if dupes:
            where = [r["source"] for r in rows if r["id"] == dupes[0]]
            raise StageError(f"duplicate query id {dupes[0]!r} at {', '.join(where)} ({len(dupes)} duplicated ids in all)")
        if cfg.queries.limit:
            rows = rows[: cfg.queries.limit]
        rows = split_rows(rows, cfg.queries.train, cfg.queries.val, cfg.queries.seed)
        counts = Counter(r["split"] for r in rows)
        if counts["train"] == 0:
            raise StageError(f"the train split is empty: {len(rows)} queries x queries.train {cfg.queries.train} rounds to 0; "
                             f"add queries or raise queries.train")
        atomic_write_text(run.queries, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return (f"queries: {len(rows)} queries -> train {counts['train']}, val {counts['val']}, "
            f"test {counts['test']} in {t.seconds:.1f}s")
