"""`distill serve`'s per-model counts and latencies, as `GET /metrics` returns them (JSON)."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

LATENCY_WINDOW = 1000  # latency percentiles are over each model's last this many answered requests


class Metrics:
    """Per served model name: requests answered and failed, tokens read, written and saved
    (the distilled prompt dropped), and latency (request received to last token) percentiles.
    Counted from the event loop and read by /metrics, hence the lock."""

    def __init__(self, names: list[str]):
        self.lock = threading.Lock()
        self.counts = {n: {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
                           "prompt_tokens_saved": 0} for n in names}
        self.latencies = {n: deque(maxlen=LATENCY_WINDOW) for n in names}

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
