"""`mup probes view`: the page checked in a real headless Chromium over the DevTools protocol.

The browser is Debian's chromium: on PATH, in $MUP_CHROMIUM, or where scripts/get_chromium.sh
unpacks it (~/.cache/mup-test/chromium/bin/chromium); the browser tests skip, saying so, when
none is found. It is driven through --remote-debugging-pipe (NUL-separated JSON on fds 3 and
4): no port is opened and no client library is needed.

The page under test is the attention probe's view of the synthetic token store (the bundled
mini set's real SmolLM2 tokens plus two records of hostile text and ids).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mup.experiments import _view
from mup.experiments._cli import main
from mup.text import ROLE_NAMES, load_tokenizer

DEFAULT_CACHE = Path.home() / ".cache/mup-test/chromium/bin/chromium"


def find_chromium() -> str | None:
    """$MUP_CHROMIUM (an error when set to something that does not run), else `chromium` on
    PATH, else scripts/get_chromium.sh's default place."""
    env = os.environ.get("MUP_CHROMIUM")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"MUP_CHROMIUM={env} is not an executable file")
        return env
    return shutil.which("chromium") or (str(DEFAULT_CACHE) if DEFAULT_CACHE.exists() else None)


class Browser:
    """One headless Chromium and one page, driven over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        args = [
            "--headless",
            # Root in a container has no usable sandbox; the page is our own local file.
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--window-size=1280,900",
            "about:blank",
        ]
        # The protocol wants the pipe on fds 3 (browser reads) and 4 (browser writes). The
        # child's ends are first moved to fds >= 10, so the shell's moves onto 3 and 4 never
        # overwrite one of them (os.pipe() itself may hand out 3 and 4); bash, as dash takes
        # single-digit fds only.
        r, self._to_browser = os.pipe()
        self._from_browser, w = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r, w)]
        for fd in (r, w):
            os.close(fd)
        r, w = high
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-', binary, *args],
            pass_fds=(r, w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # dbus and GPU warnings of a display-less machine
        )
        os.close(r)
        os.close(w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        attached = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        result = self.call(
            "Runtime.evaluate", session=True, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the element's centre."""
        x, y = self.js(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                session=True,
                type=kind,
                x=x,
                y=y,
                button="left",
                clickCount=1,
            )

    def errors(self) -> list[dict]:
        """Console errors, uncaught exceptions and browser log errors (CSP violations too)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            console = params.get("type") in ("error", "assert")
            log = method == "Log.entryAdded" and params["entry"].get("level") == "error"
            if (
                method == "Runtime.exceptionThrown"
                or log
                or (method == "Runtime.consoleAPICalled" and console)
            ):
                found.append(params)
        return found

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):  # already gone
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def page(token_probes, token_store, tmp_path_factory):
    """(html path, probe, store) of the attention probe's page of every record."""
    probe, path = token_probes("attention")
    out = tmp_path_factory.mktemp("view") / "view.html"
    args = ["view", "--probe", str(path), "--store", token_store.url, "--records", "0"]
    assert main([*args, "--out", str(out)]) == 0
    return out, probe, token_store


@pytest.fixture(scope="module")
def browser(page, tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no chromium: put it on PATH, set MUP_CHROMIUM, or run scripts/get_chromium.sh "
            "(rootless: Debian's packages unpacked into ~/.cache/mup-test/chromium)"
        )
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    try:
        b.open(page[0].resolve().as_uri())
        yield b
    finally:
        b.close()


def reference(probe, store):
    """What the page must show, computed here from the probe and the store directly."""
    rows = np.arange(store.n_records)
    scores, offsets = probe.token_scores(store)
    weights, _ = probe.attention_weights(store)
    return rows, probe.predict(store), scores, weights, offsets


def test_page_loads_without_errors_or_requests(browser, page):
    assert browser.errors() == []
    # One script (ours): the hostile record's <script> and <img onerror> stayed text.
    assert browser.js("document.scripts.length") == 1
    assert browser.js("document.images.length") == 0
    assert browser.js("document.title") == page[0].read_text().split("<title>")[1].split("<")[0]
    hostile = browser.js(
        "Array.from(document.querySelectorAll('section.record')).map(s => s.dataset.id)"
    )
    assert 'x"><img src=x onerror="document.title=1">' in hostile


def test_one_span_per_token_with_its_text_role_and_read_flag(browser, page):
    _, probe, store = page
    tokenizer = load_tokenizer("smollm2-135m")
    shown = browser.js(
        "Array.from(document.querySelectorAll('section.record')).map(s => ({"
        "id: s.dataset.id, n: +s.dataset.nTokens,"
        "toks: Array.from(s.querySelectorAll('.tok')).map(t => ["
        "t.textContent, t.closest('.run').dataset.role, !t.classList.contains('unread')])}))"
    )
    assert [r["id"] for r in shown] == list(store.ids)
    assert sum(len(r["toks"]) for r in shown) == store.n_tokens
    mask, roles, ids = np.asarray(store.mask), np.asarray(store.roles), store.input_ids
    for i, record in enumerate(shown):
        a, b = store.offsets[i], store.offsets[i + 1]
        assert len(record["toks"]) == record["n"] == b - a
        texts = [t[0] for t in record["toks"]]
        # Decoded token by token, nothing added or cleaned up between tokens.
        assert "".join(texts) == tokenizer.decode(ids[a:b], clean_up_tokenization_spaces=False)
        assert [t[1] for t in record["toks"]] == [ROLE_NAMES[r] for r in roles[a:b]]
        assert [t[2] for t in record["toks"]] == mask[a:b].tolist()
    # Role runs are marked: every message run carries a badge with its role's name.
    badges = browser.js(
        "Array.from(document.querySelectorAll('.run')).filter(r => r.dataset.role !== "
        "'template').map(r => [r.dataset.role, r.querySelector('.badge').textContent])"
    )
    assert badges and all(role == text for role, text in badges)
    assert {"system", "user", "assistant"} <= {role for role, _ in badges}


def test_colours_follow_the_token_scores(browser, page):
    _, probe, store = page
    _, _, scores, weights, _ = reference(probe, store)
    shown = browser.js(
        "Array.from(document.querySelectorAll('.tok')).map(t => "
        "[+t.dataset.s, +t.dataset.a, getComputedStyle(t).backgroundColor])"
    )
    page_scores = np.array([s for s, _, _ in shown])
    np.testing.assert_allclose(page_scores, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([a for _, a, _ in shown], weights, rtol=1e-5, atol=1e-7)
    colours = [c for _, _, c in shown]
    assert colours == _view.token_colours(scores)
    # And the colours mean what the legend says: redder (red minus blue) for higher scores.
    rgb = np.array([[int(x) for x in c[4:-1].split(",")] for c in colours])
    redness = rgb[:, 0] - rgb[:, 2]
    order = np.argsort(scores, kind="stable")
    assert (np.diff(redness[order]) >= -2).all()  # monotone up to rounding to whole channels
    assert redness[order[-1]] > 100 and redness[order[0]] < -100


def test_attention_toggle_underlines_by_weight(browser):
    underline = "getComputedStyle(document.querySelector('.tok')).boxShadow"
    assert browser.js(underline) == "none"
    browser.click("#attention")
    assert browser.js("document.body.classList.contains('show-attention')")
    shadows = browser.js(
        "Array.from(document.querySelectorAll('section.record')[0].querySelectorAll('.tok'))"
        ".map(t => [+t.dataset.a, getComputedStyle(t).boxShadow])"
    )
    top = max(shadows, key=lambda x: x[0])
    assert top[1].startswith("rgb(17, 24, 39)") and "inset" in top[1]  # full darkness
    unread = [s for a, s in shadows if a == 0]
    assert unread and all("rgba(17, 24, 39, 0)" in s for s in unread)
    browser.click("#attention")
    assert browser.js(underline) == "none"


def test_sort_click_orders_records_by_score(browser, page):
    _, probe, store = page
    probs = probe.predict(store)
    ids = list(store.ids)

    def order():
        return browser.js(
            "Array.from(document.querySelectorAll('section.record')).map(s => s.dataset.id)"
        )

    assert order() == ids
    browser.click("#sort")
    assert browser.js("document.getElementById('sort').textContent") == ("Sort: score, high first")
    descending = [ids[i] for i in np.argsort(-probs.astype(np.float64), kind="stable")]
    assert order() == descending
    shown = browser.js(
        "Array.from(document.querySelectorAll('section.record')).map(s => +s.dataset.score)"
    )
    assert shown == sorted(shown, reverse=True)
    browser.click("#sort")
    assert order() == [ids[i] for i in np.argsort(probs.astype(np.float64), kind="stable")]
    browser.click("#sort")
    assert order() == ids


def test_filters_by_label_and_misclassification(browser, page):
    _, probe, store = page
    probs, labels = probe.predict(store), np.asarray(store.labels)
    ids = np.array(store.ids, dtype=object)

    def visible():
        return browser.js(
            "Array.from(document.querySelectorAll('section.record')).filter(s => !s.hidden)"
            ".map(s => s.dataset.id)"
        )

    def select_label(value):
        browser.js(
            f"(() => {{ const s = document.getElementById('label-filter'); s.value = '{value}';"
            " s.dispatchEvent(new Event('change')); })()"
        )

    select_label("1")
    assert visible() == ids[labels == 1].tolist()
    assert browser.js("document.getElementById('count').textContent") == (
        f"showing {(labels == 1).sum()} of {len(ids)}"
    )
    select_label("all")
    browser.click("#misclassified")
    wrong = (labels >= 0) & ((probs >= 0.5).astype(int) != labels)
    assert wrong.any() and not wrong.all()
    assert visible() == ids[wrong].tolist()
    select_label("0")
    assert visible() == ids[wrong & (labels == 0)].tolist()
    select_label("all")
    browser.click("#misclassified")
    assert len(visible()) == len(ids)
    assert browser.errors() == []


def test_screenshot(browser, tmp_path):
    shot = browser.screenshot(tmp_path / "view.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_page_escapes_untrusted_text(page):
    html = page[0].read_text()
    # The tokenizer splits the markup into pieces ("</", "span", "><", ...): each is escaped.
    assert "<script>document" not in html and "<img" not in html
    assert ">&lt;/</span>" in html and ">&gt;&lt;/</span>" in html
    assert "</span></div><!--" not in html
    assert 'data-id="x&#34;&gt;&lt;img src=x onerror=&#34;document.title=1&#34;&gt;"' in html


def test_view_selects_records_and_refuses_bad_input(token_probes, token_store, stores, tmp_path):
    _, path = token_probes("logreg")
    out = tmp_path / "v.html"
    base = ["view", "--probe", str(path), "--store", token_store.url, "--out", str(out)]
    assert main([*base, "--ids", "mini05-l,mini37-h"]) == 0
    html = out.read_text()
    assert html.index('data-id="mini05-l"') < html.index('data-id="mini37-h"')
    assert html.count('<section class="record') == 2
    assert "attention weights" not in html  # a logreg probe has none to show
    assert main([*base, "--records", "3"]) == 0
    assert out.read_text().count('<section class="record') == 3


def test_view_errors(token_probes, token_store, stores, tmp_path, capsys):
    _, path = token_probes("logreg")
    out = tmp_path / "v.html"
    base = ["view", "--probe", str(path), "--out", str(out)]
    assert main([*base, "--store", token_store.url, "--ids", "nope"]) == 1
    assert "record id(s) ['nope'] not in store" in capsys.readouterr().err
    assert main([*base, "--store", stores.train.url]) == 1
    assert "does not match probe" in capsys.readouterr().err
    assert main([*base, "--store", str(tmp_path / "no-store")]) == 1
    assert "no-store" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--store", token_store.url, "--dataset", "mini"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()
