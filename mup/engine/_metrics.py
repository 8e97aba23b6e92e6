"""Engine counters and histograms, rendered in the Prometheus text exposition format.

Written by the engine thread, read by whoever serves /metrics; one lock keeps a scrape
consistent. The format is small enough to write by hand (no client library needed).
"""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            cum += c
            out.append(f'{name}_bucket{{le="{bound:g}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


class EngineMetrics:
    """Requests, tokens in and out, running / waiting rows, slot occupancy, time to first
    token, inter-token latency and end-to-end latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.running = 0
        self.waiting = 0
        self.slots = 0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)

    def on_submit(self, prompt_tokens: int) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += prompt_tokens

    def on_generated(self, n: int) -> None:
        with self._lock:
            self.generated_tokens += n

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def on_token_gap(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def on_finish(self, reason: str, seconds: float) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(seconds)

    def set_gauges(self, running: int, waiting: int, slots: int) -> None:
        with self._lock:
            self.running, self.waiting, self.slots = running, waiting, slots

    def render(self, prefix: str = "mup") -> str:
        """The Prometheus text format (version 0.0.4)."""
        p = prefix
        with self._lock:
            lines = [
                f"# HELP {p}_requests_total Rows submitted to the engine.",
                f"# TYPE {p}_requests_total counter",
                f"{p}_requests_total {self.requests}",
                f"# HELP {p}_requests_finished_total Rows finished, by finish reason.",
                f"# TYPE {p}_requests_finished_total counter",
                *(
                    f'{p}_requests_finished_total{{reason="{k}"}} {v}'
                    for k, v in sorted(self.finished.items())
                ),
                f"# HELP {p}_prompt_tokens_total Prompt tokens submitted.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Tokens generated.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generated_tokens}",
                f"# HELP {p}_running_rows Rows decoding in a slot.",
                f"# TYPE {p}_running_rows gauge",
                f"{p}_running_rows {self.running}",
                f"# HELP {p}_waiting_rows Rows waiting for a slot.",
                f"# TYPE {p}_waiting_rows gauge",
                f"{p}_waiting_rows {self.waiting}",
                f"# HELP {p}_slot_occupancy Fraction of the engine's slots in use.",
                f"# TYPE {p}_slot_occupancy gauge",
                f"{p}_slot_occupancy {self.running / self.slots if self.slots else 0.0:g}",
                f"# HELP {p}_time_to_first_token_seconds Submission to first token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# HELP {p}_inter_token_latency_seconds Time between a row's tokens.",
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.itl.lines(f"{p}_inter_token_latency_seconds"),
                f"# HELP {p}_request_latency_seconds Submission to finish.",
                f"# TYPE {p}_request_latency_seconds histogram",
                *self.latency.lines(f"{p}_request_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
