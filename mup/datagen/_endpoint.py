"""One OpenAI-compatible chat endpoint for data generation and labelling, through the official
`openai` client: a remote one (``--base-url`` + ``--model``, the key from ``$OPENAI_API_KEY`` or
``--api-key-env NAME``) or a `mup serve` process started on loopback for one command
(``--serve SPEC``).

with open_endpoint(EndpointConfig(serve="smollm2-135m", concurrency=16)) as endpoint:
    for item, future in endpoint.map(work, items, total=len(items)):
        future.result()          # work(item)'s return value, or its exception
    print(endpoint.usage.summary())

Retries (429, 5xx, 408/409, timeouts, dropped connections) are the client's own: exponential
backoff from 0.5 s to 8 s with jitter, honouring ``Retry-After``; ``max_retries`` and
``timeout_s`` configure it. What the client lacks is added here: a requests-per-minute limit
that paces every HTTP attempt (retries included, so a rate-limited provider is not hammered by
them), token and request accounting, a bounded thread pool with a progress bar, and one clear
line when the endpoint cannot be used, before any work.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mup._cli_args import non_negative_int, positive_float, positive_int

logger = logging.getLogger(__name__)


def quiet_http_logs() -> None:
    """INFO logging for a command, without the HTTP clients' line per request (it would bury
    the progress bar); the openai client logs through httpx, and some builds through httpx2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


T = TypeVar("T")
R = TypeVar("R")

# The line `mup serve` prints once it listens; with `--port 0` it is how the port is learnt.
_SERVING_LINE = re.compile(r"on http://(?P<host>[^\s:/]+):(?P<port>\d+)/v1")
# The one request that checks an endpoint before any work must fail fast, not retry for minutes.
CHECK_TIMEOUT_S = 15.0


class EndpointError(RuntimeError):
    """The endpoint cannot be used; the message is one line that says why (and where to look)."""


# A served model's attempts wait this long: the loopback server is ours and queues every request;
# on a slow machine a shorter timeout made each attempt expire in the queue and its retry
# requeue the same work at the back, so a run stopped making progress at all.
SERVED_TIMEOUT_S = 6 * 3600.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EndpointConfig:
    """How to reach one chat model.

    base_url: an OpenAI-compatible API root (``http://127.0.0.1:8000/v1``, ``https://api.openai.com/v1``).
    model: the model name requests carry; None takes the endpoint's first listed model.
    api_key_env: environment variable holding the key; unset means "none" (local servers).
    serve: instead of base_url, a model spec to serve with `mup serve` on loopback for the
      duration of `open_endpoint`; serve_args are extra `mup serve` flags.
    concurrency: requests in flight at once (threads).
    requests_per_minute: pace every HTTP attempt to at most this many a minute; None: no limit.
    timeout_s: one attempt's read timeout (None: 600 s for a base_url, SERVED_TIMEOUT_S for a
      served model); max_retries: the client's retries after the first.
    serve_startup_s: how long a served model may take to load and compile before we give up.
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    serve: str | None = None
    serve_args: tuple[str, ...] = ()
    concurrency: int = 8
    requests_per_minute: float | None = None
    timeout_s: float | None = None
    max_retries: int = 6
    serve_startup_s: float = 900.0

    def __post_init__(self):
        if (self.base_url is None) == (self.serve is None):
            raise ValueError("give exactly one of --base-url (a running endpoint) or --serve SPEC")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.requests_per_minute is not None and not self.requests_per_minute > 0:
            raise ValueError(
                f"requests per minute must be positive, got {self.requests_per_minute}"
            )
        if self.max_retries < 0 or (self.timeout_s is not None and not self.timeout_s > 0):
            raise ValueError("max_retries must be >= 0 and timeout_s positive")

    @property
    def attempt_timeout_s(self) -> float:
        if self.timeout_s is not None:
            return self.timeout_s
        return SERVED_TIMEOUT_S if self.serve is not None else 600.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EndpointConfig:
        """The config of the flags `add_endpoint_args` added, as parsed."""
        return cls(
            base_url=args.base_url,
            model=args.model,
            api_key_env=args.api_key_env,
            serve=args.serve,
            serve_args=tuple(args.serve_arg),
            concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            timeout_s=args.timeout,
            max_retries=args.http_retries,
        )


def add_endpoint_args(
    parser: argparse.ArgumentParser, *, role: str = "model", retries_flag: str = "--max-retries"
) -> None:
    """The endpoint flags of a command that talks to one chat model (`EndpointConfig.from_args`
    reads them): `role` names the model in the help ("judge"); `retries_flag` spells the HTTP
    retries where the command's own --max-retries means something else."""
    where = parser.add_argument_group("endpoint (one of --base-url or --serve)")
    where.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://host:8000/v1")
    where.add_argument("--model", help=f"{role} name (default: the endpoint's first model)")
    where.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable with the API key (default %(default)s; unset: none)",
    )
    where.add_argument(
        "--serve",
        metavar="SPEC",
        help=f"serve this {role} with `mup serve` on loopback for this command (e.g. smollm2-135m)",
    )
    where.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `mup serve` argument, repeatable (e.g. --serve-arg=--max-batch=32)",
    )
    where.add_argument("--concurrency", type=positive_int, default=8, help="requests in flight (8)")
    where.add_argument(
        "--rpm", type=positive_float, default=None, help="at most this many requests a minute"
    )
    where.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help="seconds per attempt, queueing at the server included (600; with --serve 6 h: "
        "a loopback server queues every request, and a retry would only requeue it)",
    )
    where.add_argument(
        retries_flag,
        dest="http_retries",
        type=non_negative_int,
        default=6,
        help="retries on 429 / 5xx / timeouts (6)",
    )


class RateLimiter:
    """Spaces calls at least 60/rpm seconds apart across threads (a leaky bucket of size one:
    no bursts, so a provider's per-minute window never sees more than rpm)."""

    def __init__(self, requests_per_minute: float):
        self.interval = 60.0 / requests_per_minute
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


@dataclasses.dataclass
class Usage:
    """What an endpoint was asked for: HTTP attempts at completions (retries included),
    answered requests, and the tokens they report. Thread-safe."""

    attempts: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def add_response(self, usage: Any) -> None:
        with self._lock:
            self.requests += 1
            if usage is not None:  # some servers omit usage; the count still stands
                self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
                self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def short(self) -> str:
        return f"tok in {self.prompt_tokens} out {self.completion_tokens}"

    def summary(self) -> str:
        retried = self.attempts - self.requests
        return (
            f"{self.requests} requests ({self.attempts} HTTP attempts, {max(retried, 0)} not "
            f"answered first time), {self.prompt_tokens} prompt + {self.completion_tokens} "
            f"completion tokens in {time.monotonic() - self.started:.1f}s"
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def usage_line(usage: dict[str, int]) -> str:
    """The tokens line of a run's summary, from `Usage.as_dict`."""
    return (
        f"tokens: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion in "
        f"{usage['requests']} requests ({usage['attempts']} HTTP attempts)"
    )


class Endpoint:
    """A checked chat endpoint: `chat` sends one request, `map` runs work over a thread pool."""

    def __init__(
        self,
        client: Any,
        model: str,
        *,
        concurrency: int,
        usage: Usage,
        where: str,
        server: LocalServer | None = None,
    ):
        self.client = client
        self.model = model
        self.concurrency = concurrency
        self.usage = usage
        self.where = where  # base URL, plus the server log with --serve: for error messages
        self.server = server  # the local `mup serve` behind it, if this command started one

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """One chat completion (the client retries transient failures itself)."""
        response = self.client.chat.completions.create(
            model=self.model, messages=messages, **kwargs
        )
        self.usage.add_response(getattr(response, "usage", None))
        return response

    def map(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        total: int | None = None,
        desc: str = "",
        progress: bool = True,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[T, concurrent.futures.Future[R]]]:
        """(item, finished future) pairs in completion order; `future.result()` is fn(item) or
        raises its exception. At most 2 x concurrency items are submitted ahead, so a huge input
        is never all queued. Once `stop` is set nothing more starts, and the work already
        running is still yielded (its answers are paid for); closing the iterator early cancels
        what has not started and waits for what has."""
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="rec", disable=not progress, dynamic_ncols=True)
        pool = concurrent.futures.ThreadPoolExecutor(
            self.concurrency, thread_name_prefix="mup-endpoint"
        )
        pending: dict[concurrent.futures.Future[R], T] = {}
        source = iter(items)
        exhausted = False
        try:
            while True:
                if stop is not None and stop.is_set():
                    exhausted = True
                    for future in [f for f in pending if f.cancel()]:
                        del pending[future]
                while not exhausted and len(pending) < 2 * self.concurrency:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending[pool.submit(fn, item)] = item
                if not pending:
                    return
                done, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    item = pending.pop(future)
                    bar.update(1)
                    bar.set_postfix_str(self.usage.short(), refresh=False)
                    yield item, future
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()


@contextlib.contextmanager
def open_endpoint(config: EndpointConfig) -> Iterator[Endpoint]:
    """A checked `Endpoint`; with ``config.serve`` a `mup serve` process lives for the block.
    Raises `EndpointError` (one line) when the endpoint cannot be reached or used."""
    with contextlib.ExitStack() as stack:
        server = None
        if config.serve is not None:
            server = LocalServer(config.serve, config.serve_args, timeout_s=config.serve_startup_s)
            stack.enter_context(server)
            base_url, where = server.base_url, f"{server.base_url} (log: {server.log_path})"
            key = "none"  # the local server is started without --api-key
        else:
            base_url, where = config.base_url, config.base_url
            key = os.environ.get(config.api_key_env) or "none"
        usage = Usage()
        client = _client(base_url, key, config, usage)
        try:
            model = _check(client, config, where)
        except EndpointError:
            if server is not None:
                server.keep_log = True  # the error names it
            raise
        yield Endpoint(
            client, model, concurrency=config.concurrency, usage=usage, where=where, server=server
        )


def _client(base_url: str, key: str, config: EndpointConfig, usage: Usage):
    import openai

    limiter = RateLimiter(config.requests_per_minute) if config.requests_per_minute else None

    def on_request(request) -> None:  # every attempt, the client's retries included
        if limiter is not None:
            limiter.wait()
        if request.url.path.endswith("/completions"):  # the work, not the endpoint check
            usage.add_attempt()

    # The client's own http client (its connection limits and timeouts), plus the hook.
    http_client = openai.DefaultHttpxClient(event_hooks={"request": [on_request]})
    return openai.OpenAI(
        base_url=base_url,
        api_key=key,
        max_retries=config.max_retries,
        timeout=config.attempt_timeout_s,
        http_client=http_client,
    )


def _check(client, config: EndpointConfig, where: str) -> str:
    """The model to use, after one fast request that proves the endpoint answers."""
    import openai

    quick = client.with_options(max_retries=0, timeout=CHECK_TIMEOUT_S)
    key_note = f" (key from ${config.api_key_env})" if config.serve is None else ""
    try:
        models = [m.id for m in quick.models.list()]
    except openai.APIConnectionError as error:  # includes timeouts
        raise EndpointError(
            f"cannot reach the endpoint {where}: {connection_reason(error)}"
        ) from None
    except openai.AuthenticationError as error:
        raise EndpointError(
            f"the endpoint {where} refused the API key{key_note}: {error_message(error)}"
        ) from None
    except openai.NotFoundError:
        models = []  # an endpoint without /v1/models: the first request will tell
    except openai.APIStatusError as error:
        raise EndpointError(
            f"the endpoint {where} answered GET /models with {error.status_code}: "
            f"{error_message(error)}"
        ) from None
    if config.model is None:
        if not models:
            raise EndpointError(f"the endpoint {where} lists no models; name one with --model")
        logger.info("using the endpoint's first model, %s", models[0])
        return models[0]
    if models and config.model not in models:
        shown = ", ".join(models[:8]) + (
            f" (and {len(models) - 8} more)" if len(models) > 8 else ""
        )
        raise EndpointError(
            f"the endpoint {where} does not serve the model {config.model!r}; it lists: {shown}"
        )
    return config.model


def connection_reason(error: BaseException) -> str:
    """The root cause of a connection failure, e.g. "[Errno 111] Connection refused"."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if cause is error else f"{type(error).__name__}: {text}"


def error_message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return " ".join(str(inner["message"]).split())
    return " ".join(str(error).split())


class LocalServer:
    """`python -m mup.serve --model SPEC --port 0` on loopback, for the life of a `with` block.

    Its output goes to a log file (removed after a clean run, kept and named in every error
    otherwise). The port is read from the line the server prints once it listens, then /health
    is polled. The server is told to die with its parent (Linux), so a labelling process killed
    outright does not leave a model loaded in memory.
    """

    def __init__(self, spec: str, extra_args: Iterable[str] = (), *, timeout_s: float = 900.0):
        self.spec = spec
        self.extra_args = tuple(extra_args)
        self.timeout_s = timeout_s
        self.base_url = ""
        self.keep_log = False
        fd, name = tempfile.mkstemp(prefix="mup-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalServer:
        args = [sys.executable, "-m", "mup.serve", "--model", self.spec, "--host", "127.0.0.1"]
        args += ["--port", "0", *self.extra_args]
        logger.info("starting %s (log: %s)", " ".join(args[1:]), self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
        try:
            self.base_url = self._wait()
        except BaseException:
            self.keep_log = True
            self._stop()
            raise
        logger.info("mup serve %s is up at %s", self.spec, self.base_url)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop()
        if exc_type is None and not self.keep_log:
            self.log_path.unlink(missing_ok=True)
        else:
            logger.info("mup serve log kept at %s", self.log_path)

    def _fail(self, problem: str) -> EndpointError:
        tail = [line for line in self._log_text().splitlines() if line.strip()][-1:]
        last = f"; last line: {tail[0].strip()[:200]}" if tail else ""
        return EndpointError(
            f"mup serve --model {self.spec} {problem}{last} (log: {self.log_path})"
        )

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait(self) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout_s
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with status {self.proc.returncode} before serving")
            if url is None:
                match = _SERVING_LINE.search(self._log_text())
                if match:
                    url = f"http://{match['host']}:{match['port']}"
            if url is not None and _healthy(url):
                return url + "/v1"
            time.sleep(0.25)
        raise self._fail(f"did not answer /health within {self.timeout_s:.0f}s")

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # uvicorn drains open requests on SIGTERM
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return json.loads(response.read()).get("status") == "ok"
    except (OSError, ValueError):
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
