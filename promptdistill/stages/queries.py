"""Stage 1, queries: load the user's queries, synthesise more if asked, dedup, split.

Writes queries.jsonl: {"id", "query", "split", "source"} (+ "category" for synthesised
rows) and queries_stats.json (what dedup dropped, diversity of given vs synthesised). A
conversation (a JSONL row in the OpenAI or ShareGPT chat format, conversations.py) is one row
whose "query" is its first user turn, with "turns" (every user turn) and, when
queries.logged_answers is context, "logged" (the answers the source gave): one row, so a
conversation goes to one split whole.

Order matters: dedup first, then a seeded, group-aware split. Queries whose MiniLM
cosine reaches `dedup_threshold` form one group (connected components), and a group goes
to one split whole, so no near-duplicate of a test query is trained on.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import HUB_PREFIX, QueriesConfig, RunConfig
from ..conversations import ConversationError, conversation_field, read_conversation
from ..rundir import (RunDir, StageError, Timer, atomic_write_json, atomic_write_text, fingerprint, iter_jsonl,
                      sha256_file, sha256_text)
from ..scores import load_embedder, near_duplicate_pairs, normalise_text

STATS_FILE = "queries_stats.json"
CLUSTER_DISTANCE = 0.6  # average-linkage cosine distance below which queries count as one cluster


# --------------------------------------------------------------------------- loaders


def _check_utf8(path: Path) -> None:
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise StageError(f"{path}:{line}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def _records(path: Path, field: str, id_field: str) -> list[tuple[str, dict]]:
    """(where, record) from a JSONL or CSV file; `where` is 'line N' for error messages."""
    if path.suffix == ".jsonl":
        return [(str(lineno), obj) for lineno, obj in iter_jsonl(path)]
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise StageError(f"{path}:1: no column {field!r} in the CSV header {reader.fieldnames or []} "
                             f"(set queries.field to the column holding the queries)")
        return [(str(reader.line_num), row) for row in reader]


def _dataset_records(spec: str, field: str, split: str) -> tuple[str, list[tuple[str, dict]]]:
    """(name, [(row number, record)]) from a `datasets` save_to_disk dir or an hf:OWNER/NAME hub id."""
    try:
        import datasets
    except ImportError:
        raise StageError(f"{spec}: reading a Hugging Face dataset needs the `datasets` package: "
                         f"pip install 'promptdistill[datasets]'") from None
    if spec.startswith(HUB_PREFIX):
        hub_id = spec[len(HUB_PREFIX):]
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise StageError(f"{spec}: the hub dataset {hub_id!r} needs the network, but HF_HUB_OFFLINE is set; "
                             f"save it with `save_to_disk` on a connected machine and list that dir instead")
        try:
            ds = datasets.load_dataset(hub_id, split=split)
        except Exception as e:  # the hub raises many kinds; all mean "could not get it"
            raise StageError(f"{spec}: could not load the hub dataset {hub_id!r} split {split!r}: {e}") from None
    else:
        try:
            ds = datasets.load_from_disk(spec)
        except (FileNotFoundError, ValueError) as e:
            raise StageError(f"{spec}: not a dataset saved with `save_to_disk`: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise StageError(f"{spec}: no split {split!r} (it has {sorted(ds)}); set queries.dataset_split")
            ds = ds[split]
    if field not in ds.column_names:
        raise StageError(f"{spec}: no column {field!r} (it has {ds.column_names}); set queries.field")
    name = spec.rstrip("/").split("/")[-1]
    return name, [(str(i), row) for i, row in enumerate(ds, 1)]


def load_queries(path: Path | str, field: str = "query", id_field: str = "id", split: str = "train",
                 bad_conversations: str = "error", logged_answers: str = "regenerate") -> list[dict]:
    """Rows {"id", "query", "source"} from JSONL, CSV, .txt (one per line), or a `datasets`
    dir / hf:OWNER/NAME; `field` and `id_field` name the query and id columns. A record holding
    a conversation instead ('messages' or 'conversations') gives a conversation row (`conversation_row`)."""
    spec = str(path)
    if spec.startswith(HUB_PREFIX) or Path(spec).is_dir():
        name, records = _dataset_records(spec, field, split)
        stem, where = name, spec
    else:
        path = Path(spec)
        if not path.is_file():
            raise StageError(f"queries file {path} not found")
        _check_utf8(path)
        stem, name, where = path.stem, path.name, str(path)
        if path.suffix == ".txt":
            records = [(str(i), {field: line}) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                       if line.strip()]
        elif path.suffix in (".jsonl", ".csv"):
            records = _records(path, field, id_field)
        else:
            raise StageError(f"{path}: unsupported queries format {path.suffix!r} (use .jsonl, .csv, .txt or a datasets dir)")
    rows, bad = [], []
    for line, rec in records:
        kind = conversation_field(rec)
        if kind and (field not in rec or kind == "turns"):  # a run's own queries.jsonl holds both for a conversation
            try:
                rows.append(conversation_row(rec, logged_answers) | {"id": row_id(rec, id_field, stem, line),
                                                                     "source": f"{name}:{line}"})
            except ConversationError as err:
                if bad_conversations == "error":
                    raise StageError(f"{where}:{line}: {err}") from None
                bad.append(f"{where}:{line}: {err}")
            continue
        query = rec.get(field)
        if not isinstance(query, str):
            raise StageError(f"{where}:{line}: expected a string field {field!r}")
        if not query.strip():
            raise StageError(f"{where}:{line}: empty query")
        rows.append({"id": row_id(rec, id_field, stem, line), "query": query.strip(), "source": f"{name}:{line}"})
    if bad:
        print(f"warning: dropped {len(bad)} conversations that cannot be used as they are "
              f"(queries.bad_conversations: drop), e.g. {bad[0]}")
    if not rows:
        raise StageError(f"{where}: no queries in this file")
    return rows


def row_id(rec: dict, id_field: str, stem: str, line: str) -> str:
    given = rec.get(id_field)
    return str(given) if given not in (None, "") else f"{stem}-{line}"


def conversation_row(rec: dict, logged_answers: str) -> dict:
    """A conversation's row: its first user turn as the query, every user turn, and with
    logged_answers 'context' the answers it logged before its last user turn (the teacher then
    answers only that one); a conversation of one user turn is a plain query."""
    c = read_conversation(rec)
    row = {"query": c.turns[0]}
    if len(c.turns) > 1:
        row["turns"] = c.turns
        if logged_answers == "context":
            row["logged"] = c.logged[:len(c.turns) - 1]
    return row


def conversation_text(r: dict) -> str:
    """What makes a row the same as another: its query, or every turn of its conversation."""
    return "\n".join(r.get("turns", [r["query"]]) + r.get("logged", []))


# --------------------------------------------------------------------------- dedup, split, diversity


def groups_of(ids: list[str], pairs: list[tuple[int, int, float]]) -> dict[str, str]:
    """id -> its group's representative (the smallest id): connected components of the pairs."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[str]] = {}
    for k, i in enumerate(ids):
        members.setdefault(root(k), []).append(i)
    return {i: min(group) for group in members.values() for i in group}


def split_rows(rows: list[dict], train: float, val: float, seed: int, group: dict[str, str] | None = None) -> list[dict]:
    """Seeded shuffle of groups (each id its own group unless `group` maps it to a
    representative), larger groups first, then cut into train/val/test by the given
    fractions of rows; a group never straddles two splits."""
    group = group or {}
    members: dict[str, list[str]] = {}
    for r in rows:
        members.setdefault(group.get(r["id"], r["id"]), []).append(r["id"])
    reps = sorted(members)
    random.Random(seed).shuffle(reps)
    reps.sort(key=lambda rep: -len(members[rep]))  # big groups first, so the small ones even out the cut
    n_train, n_val = round(len(rows) * train), round(len(rows) * val)
    split_of, placed = {}, 0
    for rep in reps:
        name = "train" if placed < n_train else "val" if placed < n_train + n_val else "test"
        split_of.update((i, name) for i in members[rep])
        placed += len(members[rep])
    return [{"id": r["id"], "query": r["query"], "split": split_of[r["id"]], "source": r["source"]}
            | {k: r[k] for k in ("turns", "logged", "category") if k in r} for r in rows]


def leaks(split_of: dict[str, str], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The near-duplicate pairs (by id) that straddle two splits: what a leak-free split has none of."""
    return [(a, b) for a, b in pairs if split_of[a] != split_of[b]]


def drop_exact_duplicates(rows: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """Keep the first of each normalised text; (kept, [(dropped, the row it repeats)])."""
    first: dict[str, dict] = {}
    kept, dropped = [], []
    for r in rows:
        key = normalise_text(conversation_text(r))
        if key in first:
            dropped.append((r, first[key]))
        else:
            first[key] = r
            kept.append(r)
    return kept, dropped


def diversity(emb: np.ndarray) -> dict:
    """Mean pairwise cosine (lower = more varied) and the number of clusters: average-linkage
    agglomerative clustering that merges while the mean cosine distance between two clusters
    stays below CLUSTER_DISTANCE. Both from unit MiniLM embeddings."""
    n = len(emb)
    if n < 2:
        return {"n": n, "mean_pairwise_cosine": None, "clusters": n}
    from sklearn.cluster import AgglomerativeClustering

    sims = emb @ emb.T
    mean = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=CLUSTER_DISTANCE).fit_predict(emb)
    return {"n": n, "mean_pairwise_cosine": round(float(mean), 4), "clusters": int(labels.max() + 1)}


def _given(cfg: RunConfig) -> tuple[list[dict], dict]:
    """The user's queries, checked; exact duplicates dropped with a warning, near ones reported."""
    q = cfg.queries
    rows = [row for f in q.files
            for row in load_queries(f, q.field, q.id_field, q.dataset_split, q.bad_conversations, q.logged_answers)]
    dupes = [i for i, n in Counter(r["id"] for r in rows).items() if n > 1]
    if dupes:
        where = [r["source"] for r in rows if r["id"] == dupes[0]]
        raise StageError(f"duplicate query id {dupes[0]!r} at {', '.join(where)} ({len(dupes)} duplicated ids in all)")
    if q.limit:
        rows = rows[: q.limit]
    rows, dropped = drop_exact_duplicates(rows)
    if dropped:
        r, first = dropped[0]
        print(f"warning: dropped {len(dropped)} of your queries that repeat an earlier one word for word, "
              f"e.g. {r['source']} repeats {first['source']}: {r['query']!r}")
    return rows, {"n": len(rows) + len(dropped), "exact_duplicates_dropped": len(dropped)}


# --------------------------------------------------------------------------- the stage


NEWER_SETTINGS = ("field", "id_field", "dataset_split", "dedup_threshold", "bad_conversations", "logged_answers")


def stage_inputs(cfg: RunConfig, run: RunDir) -> dict:
    q = cfg.queries
    inputs = {"query_files": {f: sha256_file(Path(f)) if Path(f).is_file() else None for f in q.files},
              "split": fingerprint([q.train, q.val, q.test, q.seed, q.limit])}
    # Settings that came later count only when set, so run dirs made before them stay valid.
    changed = {k: getattr(q, k) for k in NEWER_SETTINGS if getattr(q, k) != QueriesConfig.model_fields[k].default}
    if changed:
        inputs["loader_dedup"] = fingerprint(changed)
    if q.follow_ups.share:
        from ..follow_ups import follow_up_key

        inputs["follow_ups"] = fingerprint([q.follow_ups.share, q.follow_ups.turns, follow_up_key(cfg)])
    if q.synthesize.n:
        from ..synthesize import synthesis_key

        # the key adds what shapes a sample beyond these settings: the prompt and the writing model
        inputs["synthesize"] = fingerprint([q.synthesize.model_dump(mode="json"), synthesis_key(cfg)])
    return inputs


def run(cfg: RunConfig, run: RunDir) -> str:
    q = cfg.queries
    with Timer() as t:
        given, given_stats = _given(cfg) if q.files else ([], {"n": 0, "exact_duplicates_dropped": 0})
        embedder = load_embedder()
        given_emb = embedder.encode([r["query"] for r in given])
        synthesized, synth_stats, synth_emb = [], None, given_emb[:0]
        if q.synthesize.n:
            from ..synthesize import synthesize

            synthesized, synth_stats, synth_emb = synthesize(cfg, run, given, given_emb, embedder)
        rows = given + synthesized
        pairs = near_duplicate_pairs(np.vstack([given_emb, synth_emb]), threshold=q.dedup_threshold)
        near = [p for p in pairs if p[1] < len(given)]  # both of yours (given rows come first, and i < j)
        given_stats["near_duplicate_pairs"] = len(near)
        if near:
            i, j, cos = max(near, key=lambda p: p[2])
            print(f"note: {len(near)} pairs of your queries are near-duplicates (cosine >= {q.dedup_threshold}); "
                  f"each pair stays in one split. Closest: {given[i]['query']!r} ~ {given[j]['query']!r} ({cos:.2f})")
        group = groups_of([r["id"] for r in rows], pairs)
        rows = carried_on(cfg, split_rows(rows, q.train, q.val, q.seed, group))
        straddling = leaks({r["id"]: r["split"] for r in rows}, [(rows[i]["id"], rows[j]["id"]) for i, j, _ in pairs])
        counts = Counter(r["split"] for r in rows)
        empty = [name for name, frac in (("val", q.val), ("test", q.test)) if round(len(rows) * frac) and not counts[name]]
        if empty and len(set(group.values())) < len(rows):
            biggest = Counter(group.values()).most_common(1)[0][1]
            print(f"warning: the {' and '.join(empty)} split is empty: near-duplicate groups go to one split whole and "
                  f"the largest holds {biggest} of {len(rows)} queries; raise queries.dedup_threshold to group fewer")
        if counts["train"] == 0:
            raise StageError(f"the train split is empty: {len(rows)} queries x queries.train {q.train} rounds to 0; "
                             f"add queries or raise queries.train")
        stats = {"given": given_stats, "synthesized": synth_stats,
                 "diversity": {"given": diversity(given_emb), "synthesized": diversity(synth_emb)},
                 "cluster_distance": CLUSTER_DISTANCE, "dedup_threshold": q.dedup_threshold,
                 "split": dict(counts), "split_groups": len(set(group.values())),
                 "near_duplicates_across_splits": len(straddling)}
        chats = {"given": sum("turns" in r for r in rows), "carried_on": sum("follow_ups" in r for r in rows)}
        if any(chats.values()):
            stats["conversations"] = chats
        atomic_write_text(run.queries, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_json(run.root / STATS_FILE, stats)
    if synth_stats:
        print(diversity_table(stats))
    made = f" ({len(given)} given, {len(synthesized)} synthesized)" if synth_stats else ""
    if any(chats.values()):
        made += (f", {chats['given']} of them conversations" if chats["given"] else "") + (
            f", {chats['carried_on']} to be carried on by a simulated user" if chats["carried_on"] else "")
    return (f"queries: {len(rows)} queries{made} -> train {counts['train']}, val {counts['val']}, "
            f"test {counts['test']} in {t.seconds:.1f}s")


def carried_on(cfg: RunConfig, rows: list[dict]) -> list[dict]:
    """queries.follow_ups: a share of the single queries, picked by a hash of their ids (so adding
    queries changes no earlier pick), marked for a simulated user to carry on for `turns` - 1 turns."""
    f = cfg.queries.follow_ups
    if not f.share:
        return rows
    from ..follow_ups import follow_up_key

    key = follow_up_key(cfg)
    picked = ({"follow_ups": {"n": f.turns - 1, "key": key}} if "turns" not in r
              and int(sha256_text(f"{f.seed}:{r['id']}")[:8], 16) < f.share * 2**32 else {} for r in rows)
    return [r | extra for r, extra in zip(rows, picked)]


def diversity_table(stats: dict) -> str:
    """Given vs synthesised side by side, as printed after the stage and kept in queries_stats.json."""
    d, s = stats["diversity"], stats["synthesized"]

    def cell(v) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"{'':24}{'given':>10}{'synthesized':>13}"]
    for label, key in (("queries", "n"), ("mean pairwise cosine", "mean_pairwise_cosine"), ("clusters", "clusters")):
        lines.append(f"{label:24}{cell(d['given'][key]):>10}{cell(d['synthesized'][key]):>13}")
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v)
    lines.append(f"synthesis: {s['tried']} tried, {s['kept']} kept; dropped: {dropped or 'none'}")
    return "\n".join(lines)
