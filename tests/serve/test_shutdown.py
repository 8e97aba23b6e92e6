"""SIGTERM while a request is in flight: the request completes, then the server exits cleanly."""

from __future__ import annotations

import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_sigterm_finishes_in_flight_request(start_server, tiny_dir, vector_file, tmp_path):
    # No warm-up and no persistent compilation cache: the first request compiles the
    # generation loop, so it is surely still in flight a second after it was sent.
    srv = start_server(
        ["--model", str(tiny_dir), "--vector", str(vector_file), "--layer", "1", "--no-warmup"],
        tmp_path,
        env={"MUP_COMPILATION_CACHE": "0"},
    )
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=300)
    name = srv.wait_healthy()["model"]
    result: dict = {}

    def request():
        try:
            result["response"] = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": "Tell me about the sea."}],
                max_tokens=8,
                temperature=0,
                extra_body={"steer_multiplier": 1.0},
            )
        except Exception as e:  # reported by the asserts below
            result["error"] = e
        result["done"] = time.monotonic()

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(1.0)
    assert "done" not in result, "the request finished before SIGTERM; nothing was in flight"
    sent = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    thread.join(300)
    assert "error" not in result, result.get("error")
    assert result["done"] > sent
    response = result["response"]
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.model_extra["steer_multiplier"] == 1.0
    # uvicorn re-raises the signal once shut down, so the exit status is "killed by SIGTERM"
    # (what supervisors expect) - after the lifespan exit drained the engine.
    assert srv.proc.wait(60) in (0, -signal.SIGTERM), srv.log()
    assert "engine stopped" in srv.log()
