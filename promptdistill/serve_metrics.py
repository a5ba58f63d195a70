"""`distill serve`'s per-model counts and latencies, as `GET /metrics` returns them (JSON)."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

LATENCY_WINDOW = 1000  # latency percentiles are over each model's last this many answered requests
COUNTED = ("requests", "failed", "prompt_tokens", "completion_tokens", "prompt_tokens_saved")


class Metrics:
    """Per served model name: requests answered and failed, tokens read, written and saved
    (the distilled prompt dropped), and latency (request received to last token) percentiles.
    Counted from the event loop and read by /metrics, hence the lock. A student unloaded while
    serving keeps its counts: they are what this process served."""

    def __init__(self, names: list[str]):
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}
        self.latencies: dict[str, deque] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        """Count `name` too (a student loaded while serving); a name served before keeps its counts."""
        with self.lock:
            self.counts.setdefault(name, {k: 0 for k in COUNTED})
            self.latencies.setdefault(name, deque(maxlen=LATENCY_WINDOW))

    def answered(self, name: str, seconds: float, prompt_tokens: int, completion_tokens: int, saved: int) -> None:
        with self.lock:
            c = self.counts[name]
            c["requests"] += 1
            c["prompt_tokens"] += prompt_tokens
            c["completion_tokens"] += completion_tokens
            c["prompt_tokens_saved"] += saved
            self.latencies[name].append(seconds)

    def failed(self, name: str) -> None:
        with self.lock:
            self.counts[name]["failed"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            models = {}
            for name, c in self.counts.items():
                lat = np.array(self.latencies[name])
                models[name] = c | {"latency_s": None if not len(lat) else {
                    "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                    "mean": float(lat.mean()), "window": len(lat)}}
            return {"models": models}
