"""The endpoint's own parts: the requests-per-minute limiter across threads, and its
configuration's checks."""

from __future__ import annotations

import argparse
import threading
import time

import pytest

from mup.datagen import EndpointConfig, RateLimiter


def test_rate_limiter_spaces_calls_across_threads():
    limiter = RateLimiter(requests_per_minute=600)  # one call every 0.1 s
    stamps: list[float] = []
    lock = threading.Lock()

    def call():
        limiter.wait()
        with lock:
            stamps.append(time.monotonic())

    threads = [threading.Thread(target=call) for _ in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert min(gaps) >= 0.09 and stamps[-1] - started >= 0.49  # never a burst


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of"),
        ({"base_url": "http://x/v1", "serve": "smollm2-135m"}, "exactly one of"),
        ({"base_url": "http://x/v1", "concurrency": 0}, "concurrency"),
        ({"base_url": "http://x/v1", "requests_per_minute": 0}, "per minute"),
    ],
)
def test_endpoint_config_refuses_what_cannot_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EndpointConfig(**kwargs)


def test_attempt_timeout_defaults_to_the_queue_of_a_served_model():
    from mup.datagen import add_endpoint_args
    from mup.datagen._endpoint import SERVED_TIMEOUT_S

    parser = argparse.ArgumentParser()
    add_endpoint_args(parser)
    remote = EndpointConfig.from_args(parser.parse_args(["--base-url", "http://x/v1"]))
    served = EndpointConfig.from_args(parser.parse_args(["--serve", "smollm2-135m"]))
    assert remote.attempt_timeout_s == 600.0
    assert served.attempt_timeout_s == SERVED_TIMEOUT_S > 3600
    given = parser.parse_args(["--serve", "smollm2-135m", "--timeout", "30"])
    assert EndpointConfig.from_args(given).attempt_timeout_s == 30.0
    with pytest.raises(ValueError, match="timeout_s positive"):
        EndpointConfig(base_url="http://x/v1", timeout_s=0)
