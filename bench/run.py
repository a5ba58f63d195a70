"""Benchmarks: promptdistill's own sampler and trainer against the usual baselines.

    python bench/run.py [--only generation,training,objectives,latency,machine,e2e,concurrency] [--quick] [--repeats N]

Every measured run is a separate child process (bench/workloads.py), started one at a
time, baseline and ours alternating, on the same model (the embedded SmolLM2-135M),
data and settings. Prints a markdown table and writes bench/results/<date>.json.
Timings are only meaningful on an otherwise idle machine: the script warns when it is not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKLOADS = BENCH / "workloads.py"
COMPARISONS = ["machine", "generation", "training", "objectives", "latency", "e2e", "concurrency"]  # machine first: MFU needs it

# The settings of the full run; --quick and the size flags shrink them.
FULL = {
    "generation": {"queries": 64, "max_tokens": 96, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.15,
                   "batch_sizes": [128, 64]},
    "training": {"examples": 128, "steps": 16, "batch_size": 8, "lr": 2e-4, "rank": 16, "alpha": 32, "seed": 0,
                 "max_length": 512, "warmup_steps": 2},
    "latency": {"queries": 16, "max_tokens": 96},
    "machine": {"matmul_sizes": [1024, 2048], "matmul_repeats": 10},
    "concurrency": {"requests": 128, "latency_s": 0.2, "tokens": 64, "levels": [1, 4, 16, 64]},
    "objectives": {"objectives": ["sft", "kl", "kl_top256", "on_policy", "on_policy_ahead8"], "steps": 8},
}
QUICK = {"generation": {"queries": 16, "max_tokens": 48}, "training": {"examples": 32, "steps": 6},
         "latency": {"queries": 4, "max_tokens": 48}, "machine": {"matmul_repeats": 5}, "concurrency": {"requests": 64},
         "objectives": {"steps": 4}}
# on_policy_step: its seconds per optimiser step over sft's, both at the demo's settings
TARGETS = {"generation": 25.0, "training": 2.0, "ttft": 0.25, "demo_s": 600, "concurrency": 31.0, "on_policy_step": 2.0}


def settings(args) -> dict:
    s = {k: dict(v) for k, v in FULL.items()}
    if args.quick:
        for k, v in QUICK.items():
            s[k].update(v)
    if args.queries:
        s["generation"]["queries"] = s["latency"]["queries"] = args.queries
    if args.max_tokens:
        s["generation"]["max_tokens"] = s["latency"]["max_tokens"] = args.max_tokens
    for k in ("generation", "training", "latency", "objectives"):  # baseline and ours alike
        s[k]["dtype"] = args.dtype
    if args.steps:
        s["training"]["steps"] = args.steps
        s["training"]["examples"] = min(s["training"]["examples"], args.steps * s["training"]["batch_size"])
        s["training"]["warmup_steps"] = min(2, args.steps - 1)
    return s


# ---------------------------------------------------------------- child processes


def child_env() -> dict:
    env = dict(os.environ)
    # Everything is local; never let a library reach for a hub. Quiet, so a failure's tail is readable.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    return env


def exit_on_failure(proc: subprocess.CompletedProcess) -> None:
    """A failed child ends the benchmark, with the tail of what it printed."""
    if proc.returncode != 0:
        print(f" FAILED (exit {proc.returncode})\n{proc.stderr[-4000:]}")
        raise SystemExit(1)


def run_child(name: str, spec: dict, label: str) -> dict:
    """Run one workload in a fresh process and return its result."""
    busy = cpu_busy()  # the previous child has exited: anything busy now is someone else
    print(f"  {label} ...", end="", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(WORKLOADS), name, json.dumps(spec), str(out)],
                              capture_output=True, text=True, env=child_env(), cwd=ROOT)
        wall = time.perf_counter() - start
        exit_on_failure(proc)
        result = json.loads(out.read_text())
    result["process_wall_s"] = wall
    result["cpu_busy_before"] = busy
    warn = f"; CPU was {busy:.0%} busy before it: unreliable" if busy > 0.2 else ""
    print(f" {wall:.1f}s (peak RSS {result['peak_rss_mb']:.0f} MB{warn})")
    return result


def alternate(variants: list[tuple[str, str, dict]], repeats: int) -> dict[str, list[dict]]:
    """Run (key, workload, spec) variants round-robin `repeats` times: baseline, ours,
    baseline, ours... so slow drift in machine speed falls on both sides alike."""
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in variants}
    for r in range(repeats):
        for key, name, spec in variants:
            runs[key].append(run_child(name, spec, f"{key} (round {r + 1}/{repeats})"))
    return runs


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the lower middle for an even count)."""
    return sorted(runs, key=lambda r: r[key])[(len(runs) - 1) // 2]


# ---------------------------------------------------------------- comparisons


def bench_machine(s: dict, repeats: int) -> dict:
    return run_child("machine", s["machine"], "matmul")


def bench_generation(s: dict, repeats: int) -> dict:
    g = s["generation"]
    spec = {k: v for k, v in g.items() if k != "batch_sizes"}
    variants = [("baseline", "gen_baseline", spec)]
    variants += [(f"ours_b{b}", "gen_ours", spec | {"batch_size": b}) for b in g["batch_sizes"]]
    runs = alternate(variants, repeats)
    out = {"settings": g, "runs": runs}
    base = median_run(runs["baseline"], "tokens_per_s")
    for key in runs:
        out[key] = median_run(runs[key], "tokens_per_s")
        out[key]["ratio"] = out[key]["tokens_per_s"] / base["tokens_per_s"]
    return out


def bench_training(s: dict, repeats: int) -> dict:
    t = s["training"]
    runs = alternate([("baseline", "train_baseline", t), ("ours", "train_ours", t)], repeats)
    base, ours = (median_run(runs[k], "tokens_per_s") for k in ("baseline", "ours"))
    return {"settings": t, "runs": runs, "baseline": base, "ours": ours,
            "ratio": ours["tokens_per_s"] / base["tokens_per_s"],
            "memory_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"]}


def bench_latency(s: dict, repeats: int) -> dict:
    runs = [run_child("latency", s["latency"], f"teacher vs student (round {r + 1}/{repeats})") for r in range(repeats)]
    for r in runs:
        r["ttft_ratio"] = r["student"]["ttft_ms_median"] / r["teacher"]["ttft_ms_median"]
        r["total_ratio"] = r["student"]["total_ms_median"] / r["teacher"]["total_ms_median"]
    return {"settings": s["latency"], "runs": runs, **median_run(runs, "ttft_ratio")}


def bench_e2e(s: dict, repeats: int) -> dict:
    """Per-stage seconds of the last `make demo` (runs/beethoven/manifest.json); nothing is run."""
    manifest = ROOT / "runs" / "beethoven" / "manifest.json"
    if not manifest.exists():
        return {"manifest": None}
    stages = json.loads(manifest.read_text()).get("stages", {})
    seconds = {name: st.get("seconds") for name, st in stages.items()}
    done = [v for v in seconds.values() if v is not None]
    return {"manifest": str(manifest.relative_to(ROOT)), "stages": seconds, "total_s": sum(done),
            "complete": bool(seconds) and len(done) == len(seconds) and "report" in seconds}


def bench_objectives(s: dict, repeats: int) -> dict:
    """Seconds per optimiser step of each objective at the demo's settings: `distill train` for
    a few steps on the demo's own teacher answers (runs/beethoven), one objective at a time,
    round-robin. A step's seconds are read from metrics.jsonl; the first step (it carries the
    step-0 validation and the warm-up) is left out, and no validation or checkpoint falls between."""
    from compare_objectives import seed_run, step_rows, variants

    o, source = s["objectives"], ROOT / "runs" / "beethoven"
    if not (source / "teacher.jsonl").exists():
        return {"source": None}
    steps = max(3, o["steps"])
    runs: dict[str, list[dict]] = {name: [] for name in o["objectives"]}
    for r in range(repeats):
        for name in o["objectives"]:
            busy = cpu_busy()
            print(f"  {name} (round {r + 1}/{repeats}) ...", end="", flush=True)
            # sample_ahead K: one step in K decodes for all K, so a step costs the mean over one
            # whole group, the second (the first carries the warm-up): 2K steps are run.
            ahead = next((int(x.split("=")[1]) for x in variants(steps)[name] if "sample_ahead=" in x), 1)
            n = max(steps, 2 * ahead) if ahead > 1 else steps
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / name
                seed_run(source, run)
                sets = [*variants(n)[name], "train.phases=null", f"train.eval_every={n}", f"train.save_every={n + 1}",
                        f"student.dtype={o['dtype']}", f"teacher.dtype={o['dtype']}"]
                proc = subprocess.run([sys.executable, "-m", "promptdistill.cli", "train", str(run),
                                       *[a for x in sets for a in ("--set", x)]],
                                      capture_output=True, text=True, env=child_env(), cwd=ROOT)
                exit_on_failure(proc)
                seconds = [row["seconds"] for row in step_rows(run)]
            per_step = [b - a for a, b in zip(seconds, seconds[1:])]  # per_step[j]: step index j + 1
            step_s = statistics.mean(per_step[ahead - 1:2 * ahead - 1]) if ahead > 1 else statistics.median(per_step)
            # soft labels scored once before the first step (kl with train.topk): train's own line
            scored = re.search(r"top-\d+ targets of \d+ answers in ([\d.]+)s", proc.stdout)
            runs[name].append({"median_step_s": step_s, "step_seconds": per_step, "sample_ahead": ahead,
                               "targets_s": float(scored.group(1)) if scored else None, "cpu_busy_before": busy})
            print(f" {step_s:.2f} s/step" + (f" (mean over steps {ahead + 1}-{2 * ahead})" if ahead > 1 else "")
                  + (f", targets {scored.group(1)} s" if scored else ""))
    out = {"settings": o | {"steps": steps}, "source": str(source.relative_to(ROOT)), "runs": runs}
    for name in runs:
        out[name] = median_run(runs[name], "median_step_s")
    if "sft" in out:
        for name in runs:
            out[name]["ratio_to_sft"] = out[name]["median_step_s"] / out["sft"]["median_step_s"]
    return out


def bench_concurrency(s: dict, repeats: int) -> dict:
    c = s["concurrency"]
    runs = [run_child("concurrency", c, f"OpenAI backend vs fixed-latency server (round {r + 1}/{repeats})")
            for r in range(repeats)]
    return {"settings": c, "runs": runs, **median_run(runs, "top_speedup")}


RUNNERS = {"machine": bench_machine, "generation": bench_generation, "training": bench_training,
           "objectives": bench_objectives, "latency": bench_latency, "e2e": bench_e2e, "concurrency": bench_concurrency}


def add_mfu(results: dict) -> None:
    """Training model-FLOPs utilisation: useful FLOPs/s (see workloads.train_flops) over
    the measured matmul rate of the dtype the model trained in. Same FLOPs count for both
    trainers: the same work."""
    train, mach = results.get("training"), results.get("machine")
    if not train or not mach:
        return
    per_token = train["ours"]["flops"]["flops_per_trained_token"]
    for side in ("baseline", "ours"):
        gflops = train[side]["tokens_per_s"] * per_token / 1e9
        bf16 = train[side].get("dtype", "float32").startswith("bfloat16")
        train[side]["useful_gflops"] = gflops
        train[side]["mfu"] = gflops / mach["matmul_gflops_peak_bf16" if bf16 else "matmul_gflops_peak"]


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "loadavg_at_start": os.getloadavg(), "cpu_busy_at_start": cpu_busy()}


def check(ok: bool) -> str:
    return "yes" if ok else "NO"


def dtypes(baseline: dict, ours: dict) -> str:
    """The weights' dtype of both sides (runs before the dtype setting were fp32)."""
    b, o = (side.get("dtype", "float32") for side in (baseline, ours))
    return b if b == o else f"{b} vs {o}"


def table(results: dict, info: dict) -> str:
    rows = [("measure", "baseline", "ours", "ours/baseline", "target", "met")]
    if g := results.get("generation"):
        b = g["baseline"]
        for key in (k for k in g if k.startswith("ours_b")):
            o = g[key]
            rows.append((f"generation tokens/s, batch {key[6:]} (baseline: generate, batch 1; {dtypes(b, o)})",
                         f"{b['tokens_per_s']:.1f}", f"{o['tokens_per_s']:.1f}", f"{o['ratio']:.2f}x",
                         f">= {TARGETS['generation']:.0f}x", check(o["ratio"] >= TARGETS["generation"])))
            rows.append((f"  wall s / answers at max_tokens / mean answer tokens (batch {key[6:]})",
                         f"{b['seconds']:.1f} / {b['hit_max_tokens']} / {b['mean_answer_tokens']:.1f}",
                         f"{o['seconds']:.1f} / {o['hit_max_tokens']} / {o['mean_answer_tokens']:.1f}", "", "", ""))
            rows.append((f"  peak RSS MB (batch {key[6:]})", f"{b['peak_rss_mb']:.0f}", f"{o['peak_rss_mb']:.0f}",
                         f"{o['peak_rss_mb'] / b['peak_rss_mb']:.2f}", "", ""))
    if t := results.get("training"):
        b, o = t["baseline"], t["ours"]
        ok = t["ratio"] >= TARGETS["training"] and o["peak_rss_mb"] <= b["peak_rss_mb"]
        rows.append((f"training answer tokens/s (baseline: TRL SFTTrainer; {dtypes(b, o)})", f"{b['tokens_per_s']:.1f}",
                     f"{o['tokens_per_s']:.1f}", f"{t['ratio']:.2f}x", f">= {TARGETS['training']}x, <= memory", check(ok)))
        rows.append(("  median step s (after warm-up)", f"{b['median_step_s']:.2f}", f"{o['median_step_s']:.2f}",
                     f"{o['median_step_s'] / b['median_step_s']:.2f}", "", ""))
        rows.append(("  peak RSS MB", f"{b['peak_rss_mb']:.0f}", f"{o['peak_rss_mb']:.0f}",
                     f"{t['memory_ratio']:.2f}", "<= 1", check(t["memory_ratio"] <= 1)))
        rows.append(("  final step loss / mean of last 4", f"{b['final_loss']:.3f} / {b['final_loss_last4']:.3f}",
                     f"{o['final_loss']:.3f} / {o['final_loss_last4']:.3f}", "", "similar", ""))
        rows.append(("  answer NLL on all examples after training", f"{b['final_nll_all_examples']:.3f}",
                     f"{o['final_nll_all_examples']:.3f}",
                     f"{o['final_nll_all_examples'] - b['final_nll_all_examples']:+.3f}", "similar",
                     check(abs(o["final_nll_all_examples"] - b["final_nll_all_examples"]) < 0.1)))
        rows.append(("  same trained tokens (TRL labels == our mask)", str(b.get("same_tokens_as_ours")), "", "", "True",
                     check(bool(b.get("same_tokens_as_ours")))))
        rows.append(("  useful FLOPs per trained token (README: how counted)", "",
                     f"{o['flops']['flops_per_trained_token'] / 1e9:.2f} G", "", "", ""))
        if "mfu" in o:
            rows.append(("  useful GFLOP/s / MFU of measured matmul peak", f"{b['useful_gflops']:.1f} / {b['mfu']:.1%}",
                         f"{o['useful_gflops']:.1f} / {o['mfu']:.1%}", "", "", ""))
    if lat := results.get("latency"):
        te, st = lat["teacher"], lat["student"]
        rows.append((f"TTFT ms median, teacher WITH prompt vs student WITHOUT ({lat['student_model']})",
                     f"{te['ttft_ms_median']:.0f}", f"{st['ttft_ms_median']:.0f}", f"{lat['ttft_ratio']:.2f}",
                     f"<= {TARGETS['ttft']}", check(lat["ttft_ratio"] <= TARGETS["ttft"])))
        rows.append(("  total ms per query median (mean answer tokens)",
                     f"{te['total_ms_median']:.0f} ({te['mean_answer_tokens']:.0f})",
                     f"{st['total_ms_median']:.0f} ({st['mean_answer_tokens']:.0f})", f"{lat['total_ratio']:.2f}", "", ""))
        rows.append(("  prompt tokens", f"{te['mean_prompt_tokens']:.0f}", f"{st['mean_prompt_tokens']:.0f}", "", "", ""))
    if c := results.get("concurrency"):
        st, seq = c["settings"], c["sequential"]
        rows.append((f"OpenAI backend tokens/s, {st['requests']} requests to a server with {st['latency_s'] * 1000:.0f} ms "
                     f"latency (baseline: sequential openai SDK)", f"{seq['tokens_per_s']:.0f}", "", "", "", ""))
        top = max(st["levels"])
        for level in st["levels"]:
            r = c[f"c{level}"]
            target = f">= {TARGETS['concurrency']:.0f}x" if level == top else ""
            rows.append((f"  concurrency {level} (ideal {r['ideal_tokens_per_s']:.0f})", "", f"{r['tokens_per_s']:.0f}",
                         f"{r['speedup']:.1f}x", target, check(r["speedup"] >= TARGETS["concurrency"]) if target else ""))
    if (ob := results.get("objectives")) and ob.get("source") and "sft" in ob:
        for name in ob["settings"]["objectives"]:
            if name == "sft":
                continue
            ratio = ob[name]["ratio_to_sft"]
            target = f"<= {TARGETS['on_policy_step']:.0f}x" if name.startswith("on_policy") else ""
            once = f" (+ {ob[name]['targets_s']:.0f} s once, scoring the targets)" if ob[name].get("targets_s") else ""
            rows.append((f"{name} step s at the demo's settings{once} (baseline: an sft step)",
                         f"{ob['sft']['median_step_s']:.2f}", f"{ob[name]['median_step_s']:.2f}", f"{ratio:.2f}x", target,
                         check(ratio <= TARGETS["on_policy_step"]) if target else ""))
    if m := results.get("machine"):
        sizes = ", ".join(f"{n}: {v:.1f}" for n, v in m["matmul"].items())
        rows.append((f"fp32 matmul GFLOP/s ({m['torch_threads']} torch threads)", "", sizes, "", "", ""))
        if "matmul_bf16" in m:
            sizes = ", ".join(f"{n}: {v:.1f}" for n, v in m["matmul_bf16"].items())
            rows.append((f"bf16 matmul GFLOP/s ({m['torch_threads']} torch threads)", "", sizes, "", "", ""))
    if e := results.get("e2e"):
        if e.get("stages"):
            for name, sec in e["stages"].items():
                rows.append((f"make demo: {name} s", "", "unfinished" if sec is None else f"{sec:.1f}", "", "", ""))
            # The target is the wall time of `make demo` on a fresh clone, set-up included, which
            # the manifest does not hold: the stages alone cannot meet or miss it.
            rows.append(("make demo: stages total s" + ("" if e["complete"] else " (run incomplete)"), "",
                         f"{e['total_s']:.1f}", "", f"wall with set-up <= {TARGETS['demo_s']}", "see wall"))
        else:
            rows.append(("make demo", "", "no runs/beethoven/manifest.json", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    lines = [fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows[1:]]
    head = (f"{info['cpu']}, {info['usable_cores']} cores, torch {info['versions']['torch']}, "
            f"transformers {info['versions']['transformers']}, peft {info['versions']['peft']}, trl {info['versions']['trl']}")
    return head + "\n\n" + "\n".join(lines)


def save(results: dict, info: dict, s: dict, args) -> Path:
    """bench/results/<UTC date>.json (-quick when shrunk); a partial run (--only) is merged
    into the same day's file instead of replacing the comparisons it did not run."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    shrunk = args.quick or args.queries or args.max_tokens or args.steps
    path = BENCH / "results" / f"{date}{'-quick' if shrunk else ''}.json"
    path.parent.mkdir(exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    data = {"date": date, "machine": old.get("machine", {}) | info, "settings": s, "repeats": args.repeats,
            "comparisons": old.get("comparisons", {}) | results}
    path.write_text(json.dumps(data, indent=1))
    return path


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy over the next `seconds` (from /proc/stat). Unlike the load
    average, which trails by minutes, this says whether something runs NOW."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def busy_warning(busy: float) -> str | None:
    if busy > 0.2:
        return (f"WARNING: {busy:.0%} of the CPU is busy before starting: another process is running, "
                f"and timings taken now are not meaningful")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(COMPARISONS), help="comma-separated: " + ",".join(COMPARISONS))
    ap.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs, in a few minutes")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds per comparison; medians are reported")
    ap.add_argument("--queries", type=int, help="override: generation and latency queries (smoke tests)")
    ap.add_argument("--max-tokens", type=int, help="override: max new tokens (smoke tests)")
    ap.add_argument("--steps", type=int, help="override: training steps (smoke tests)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="weights of baseline and ours alike (auto: bf16 where the CPU has bf16 units, as a run's default)")
    ap.add_argument("--show", metavar="RESULTS_JSON", help="print the table of a saved results file; run nothing")
    args = ap.parse_args()
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(chosen) - set(COMPARISONS)
    if unknown:
        ap.error(f"unknown comparison(s): {', '.join(sorted(unknown))}; choose from {', '.join(COMPARISONS)}")
    if args.show:
        data = json.loads(Path(args.show).read_text())
        print(table(data["comparisons"], data["machine"]))
        return
    info = machine_info()
    if warning := busy_warning(info["cpu_busy_at_start"]):
        print(warning)
    s = settings(args)
    results = {}
    for name in (c for c in COMPARISONS if c in chosen):
        print(f"{name}:")
        results[name] = RUNNERS[name](s, args.repeats)
    if "machine" in results:
        info["torch_threads"] = results["machine"]["torch_threads"]
    add_mfu(results)
    text = table(results, info)
    print("\n" + text)
    path = save(results, info, s, args)
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
