"""The leaderboard page and the figures.

The page is checked twice: its structure with the standard library's HTML parser,
and its behaviour in a real headless Chromium (Debian's ``chromium``), driven over
the DevTools protocol on a pipe so no Python package or driver binary is needed:
it loads without a script error and without a network request, a click on a
header sorts the rows (and a second click reverses them), the family and regime
selectors hide the other columns, and the highlighted best cell of every column
is the encoder the numbers say. The browser tests skip only where no Chromium is
installed (CI installs it: ``apt-get install chromium``).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from asap_bench.report.html import _marks, build_context, provenance_from_records, render_html

# --------------------------------------------------------------------------------------------
# a small aggregated frame, built by hand
# --------------------------------------------------------------------------------------------
RUN = {  # (protocol, metric, regime) -> encoder -> (mean, std) as fractions, the way run records hold them
    ("cls/ct-rate", "auc", 0.1): {"random": (0.601, 0.012), "mae": (0.702, 0.010), "ct-clip": (0.745, 0.008),
                                  "merlin": (0.760, 0.006), "asap": (0.781, 0.004), "home-brew": (0.700, 0.020)},
    ("cls/ct-rate", "auc", 1.0): {"random": (0.630, 0.003), "mae": (0.790, 0.002), "ct-clip": (0.805, 0.004),
                                  "merlin": (0.812, 0.003), "asap": (0.823, 0.002)},
    ("seg/msd-lung", "dice", 0.1): {"random": (0.400, 0.050), "mae": (0.551, 0.030), "ct-clip": (0.520, 0.020),
                                    "merlin": (0.502, 0.010), "asap": (0.566, 0.020), "home-brew": (0.300, 0.040)},
    ("seg/msd-lung", "dice", 1.0): {"random": (0.660, 0.010), "mae": (0.712, 0.006), "ct-clip": (0.690, 0.004),
                                    "merlin": (0.700, 0.005), "asap": (0.705, 0.007)},
}
PAPER_ROW = {"encoder": "asap", "protocol": "cls/ct-rate", "regime": 1.0, "metric": "auc", "mean": 84.1, "std": 0.0,
             "n_seeds": 5, "source": "paper", "table": "II", "dagger": True}


def small_frame() -> pd.DataFrame:
    rows = []
    for (protocol, metric, regime), values in RUN.items():
        for encoder, (mean, std) in values.items():
            rows.append({"encoder": encoder, "protocol": protocol, "regime": regime, "metric": metric,
                         "mean": mean, "std": std, "n_seeds": 5, "source": "run"})
    # metrics that are not the protocol's primary one get no column
    rows.append({"encoder": "asap", "protocol": "cls/ct-rate", "regime": 1.0, "metric": "balanced_acc",
                 "mean": 0.99, "std": 0.0, "n_seeds": 5, "source": "run"})
    rows.append({"encoder": "asap", "protocol": "seg/msd-lung", "regime": 1.0, "metric": "hd95",
                 "mean": 3.2, "std": 0.4, "n_seeds": 5, "source": "run"})
    rows.append(PAPER_ROW)
    return pd.DataFrame(rows)


def significance_frame() -> pd.DataFrame:
    return pd.DataFrame([
        {"encoder": "asap", "protocol": "cls/ct-rate", "regime": 1.0, "metric": "auc", "p": 0.0004,
         "p_adjusted": 0.0016, "significant": True, "test": "paired bootstrap", "unit": "case", "n": 240},
        {"encoder": "mae", "protocol": "seg/msd-lung", "regime": 1.0, "metric": "dice", "p": 0.31,
         "p_adjusted": 0.62, "significant": False, "test": "Wilcoxon signed-rank", "unit": "case", "n": 40},
    ])


PROVENANCE = {
    "asap": {"records": 20, "fingerprints": {"encoder": "enc-f00d", "protocol cls/ct-rate": "proto-beef"}},
    "*": {"asap-bench": "0.1.0"},
}


def expected_best(frame: pd.DataFrame) -> dict[tuple[str, str, str], tuple[set[str], set[str]]]:
    """(protocol, regime key, source) -> (encoders printed best, printed second), from the numbers alone."""
    out = {}
    shown = frame[frame["metric"].isin(["auc", "dice", "acc", "c_index", "bleu4", "recall@50_v2r"])]
    for (protocol, regime, metric, source), rows in shown.groupby(["protocol", "regime", "metric", "source"]):
        if len(rows) < 2:
            continue
        scale = 1.0 if source == "paper" else 100.0
        printed = {e: round(m * scale, 1) for e, m in zip(rows["encoder"], rows["mean"])}
        levels = sorted(set(printed.values()), reverse=True)
        best = {e for e, v in printed.items() if v == levels[0]}
        second = {e for e, v in printed.items() if len(levels) > 1 and v == levels[1]}
        out[(protocol, f"{regime:g}", source)] = (best, second)
    return out


# --------------------------------------------------------------------------------------------
# structure, read with the standard library's parser
# --------------------------------------------------------------------------------------------
class Page(HTMLParser):
    """Collects the leaderboard's header and body cells, every id, link and resource-loading tag."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.loading: list[tuple[str, dict]] = []  # tags that could fetch something
        self.head: list[dict] = []
        self.rows: list[dict] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.text_of: dict[str, str] = {}  # id -> its text
        self._in_table = self._in_thead = False
        self._cell: dict | None = None
        self._script = self._style = None
        self._open_ids: list[tuple[str, str, list[str]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            assert attrs["id"] not in self.ids, f"duplicate id {attrs['id']}"
            self.ids.add(attrs["id"])
            if tag in ("section", "details", "tr", "th"):
                self._open_ids.append((tag, attrs["id"], []))
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])
        if tag in ("img", "iframe", "link", "object", "embed", "video", "audio", "source") or (
                tag == "script" and "src" in attrs):
            self.loading.append((tag, attrs))
        if tag == "script":
            self._script = []
        if tag == "style":
            self._style = []
        if tag == "table" and attrs.get("id") == "leaderboard":
            self._in_table = True
        if not self._in_table:
            return
        if tag == "thead":
            self._in_thead = True
        elif tag == "tbody":
            self._in_thead = False
        elif tag == "tr" and not self._in_thead:
            self.rows.append({"attrs": attrs, "cells": []})
        elif tag in ("th", "td"):
            self._cell = {"tag": tag, "attrs": attrs, "text": "", "links": [], "sup": []}
        elif tag == "a" and self._cell is not None:
            self._cell["links"].append(attrs.get("href"))
        elif tag == "sup" and self._cell is not None:
            self._cell["sup"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None
        if tag == "style" and self._style is not None:
            self.styles.append("".join(self._style))
            self._style = None
        if self._open_ids and self._open_ids[-1][0] == tag:
            _, ident, parts = self._open_ids.pop()
            self.text_of[ident] = " ".join("".join(parts).split())
        if tag == "table" and self._in_table:
            self._in_table = False
        if tag in ("th", "td") and self._cell is not None and self._in_table:
            self._cell["text"] = " ".join(self._cell["text"].split())
            (self.head if self._in_thead else self.rows[-1]["cells"]).append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._script is not None:
            self._script.append(data)
        if self._style is not None:
            self._style.append(data)
        for _, _, parts in self._open_ids:
            parts.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def classes(cell: dict) -> set[str]:
    return set(cell["attrs"].get("class", "").split())


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "site" / "leaderboard.html"
    written = render_html(small_frame(), significance_frame(), out, title="Test <leaderboard>", provenance=PROVENANCE)
    assert written == out and out.is_file()
    return out


@pytest.fixture(scope="module")
def page(page_file) -> Page:
    return Page(page_file.read_text(encoding="utf-8"))


def setting_columns(page: Page) -> list[dict]:
    return [c for c in page.head if "data-family" in c["attrs"]]


def column_index(page: Page, protocol: str, regime: str) -> int:
    for i, cell in enumerate(page.head):
        if cell["attrs"].get("data-protocol") == protocol and cell["attrs"].get("data-regime") == regime:
            return i
    raise AssertionError(f"no column for {protocol} {regime}")


def row_of(page: Page, encoder: str, source: str = "run") -> dict:
    hits = [r for r in page.rows if r["attrs"]["data-encoder"] == encoder and r["attrs"]["data-source"] == source]
    assert len(hits) == 1, (encoder, source, len(hits))
    return hits[0]


def test_one_row_per_encoder_and_source_one_column_per_setting(page):
    settings = setting_columns(page)
    assert [(c["attrs"]["data-protocol"], c["attrs"]["data-regime"], c["attrs"]["data-metric"]) for c in settings] == [
        ("cls/ct-rate", "0.1", "auc"), ("cls/ct-rate", "1", "auc"),
        ("seg/msd-lung", "0.1", "dice"), ("seg/msd-lung", "1", "dice")]  # primary metrics only
    assert {c["attrs"]["data-family"] for c in settings} == {"cls", "seg"}
    assert len(page.head) == 3 + len(settings)
    assert all(c["attrs"].get("aria-sort") == "none" for c in page.head)  # every header sorts
    keys = [(r["attrs"]["data-encoder"], r["attrs"]["data-source"]) for r in page.rows]
    assert len(keys) == len(set(keys)) == 7
    assert ("asap", "paper") in keys and ("home-brew", "run") in keys
    assert all(len(r["cells"]) == len(page.head) for r in page.rows)
    # paper order: quoted first, then random init, SSL, VLP by card order, unknown encoders last
    assert keys[0] == ("asap", "paper") and keys[1] == ("random", "run") and keys[-1] == ("home-brew", "run")


def test_labels_groups_and_unknown_encoders_from_cards(page):
    asap = row_of(page, "asap")
    assert asap["cells"][0]["text"].startswith("ASAP") and asap["cells"][1]["text"] == "3D Med-VLP"
    assert row_of(page, "mae")["cells"][1]["text"] == "3D Med-SSL"
    assert row_of(page, "random")["cells"][0]["text"].startswith("Random init")
    unknown = row_of(page, "home-brew")
    assert unknown["cells"][0]["text"].startswith("home-brew") and unknown["cells"][1]["text"] == "No card"
    assert "No encoder card" in page.text_of["card-home-brew"]


def test_values_in_percent_with_one_decimal_and_missing_cells(page):
    col = column_index(page, "cls/ct-rate", "0.1")
    assert row_of(page, "asap")["cells"][col]["text"] == "78.1 ± 0.4"
    assert row_of(page, "random")["cells"][col]["text"] == "60.1 ± 1.2"
    col100 = column_index(page, "cls/ct-rate", "1")
    assert row_of(page, "asap", "paper")["cells"][col100]["text"].startswith("84.1 ± 0.0")  # percent as printed
    missing = row_of(page, "home-brew")["cells"][col100]
    assert "missing" in classes(missing) and missing["attrs"]["data-value"] == ""
    assert float(row_of(page, "asap")["cells"][col]["attrs"]["data-value"]) == pytest.approx(78.1)


def test_best_and_second_per_column_and_source(page):
    expected = expected_best(small_frame())
    assert expected[("cls/ct-rate", "1", "run")] == ({"asap"}, {"merlin"})
    assert expected[("seg/msd-lung", "1", "run")] == ({"mae"}, {"asap"})
    for (protocol, regime, source), (best, second) in expected.items():
        col = column_index(page, protocol, regime)
        marked_best = {r["attrs"]["data-encoder"] for r in page.rows
                       if r["attrs"]["data-source"] == source and "best" in classes(r["cells"][col])}
        marked_second = {r["attrs"]["data-encoder"] for r in page.rows
                         if r["attrs"]["data-source"] == source and "second" in classes(r["cells"][col])}
        assert (marked_best, marked_second) == (best, second), (protocol, regime, source)
    # the quoted 84.1 is above every measured number, yet is not ranked against them
    quoted = row_of(page, "asap", "paper")["cells"][column_index(page, "cls/ct-rate", "1")]
    assert not classes(quoted) & {"best", "second"}


def test_daggers_come_from_the_significance_frame_and_the_paper(page):
    col = column_index(page, "cls/ct-rate", "1")
    measured = row_of(page, "asap")["cells"][col]
    assert len(measured["sup"]) == 1 and "paired bootstrap" in measured["sup"][0]["title"]
    assert "n = 240" in measured["sup"][0]["title"] and "adjusted p = 0.0016" in measured["sup"][0]["title"]
    assert "†" in measured["text"]
    quoted = row_of(page, "asap", "paper")["cells"][col]
    assert "paper's own mark" in quoted["sup"][0]["title"]
    not_significant = row_of(page, "mae")["cells"][column_index(page, "seg/msd-lung", "1")]
    assert not not_significant["sup"] and "†" not in not_significant["text"]
    assert sum(len(c["sup"]) for r in page.rows for c in r["cells"]) == 2


def test_every_number_says_where_it_comes_from(page):
    for row in page.rows:
        quoted = row["attrs"]["data-source"] == "paper"
        assert row["cells"][2]["text"] == ("quoted (paper)" if quoted else "measured")
        for cell in row["cells"][3:]:
            if "missing" in classes(cell):
                continue
            assert ("src-paper" if quoted else "src-measured") in classes(cell)
            assert cell["attrs"]["title"].startswith("quoted from the paper" if quoted else "measured over 5 seeds")
    assert "Table II" in row_of(page, "asap", "paper")["cells"][3 + 1]["attrs"]["title"]


def test_encoders_link_to_their_card_and_provenance(page):
    for row in page.rows:
        name = row["attrs"]["data-encoder"]
        assert row["cells"][0]["links"] == [f"#card-{name}", f"#prov-{name}"]
        assert f"card-{name}" in page.ids and f"prov-{name}" in page.ids
    card = page.text_of["card-asap"]
    assert "anatomy-aware" in card and "arXiv:2606.00602" in card and "faithful" in card
    assert "code" in page.text_of["card-ct-clip"].lower()
    assert any(h.startswith("https://") for h in page.hrefs)  # a card's code link
    prov = page.text_of["prov-asap"]
    assert "Result records: 20" in prov and "enc-f00d" in prov and "proto-beef" in prov
    assert "Table II" in prov  # the quoted row's origin
    assert "Result records: not given" in page.text_of["prov-merlin"]


def test_static_page_needs_no_network_and_escapes_text(page, page_file):
    assert page.loading == []  # no external script, stylesheet, image or frame
    assert len(page.scripts) == 1 and len(page.styles) == 1
    for inline in page.scripts + page.styles:
        assert "http" not in inline and "@import" not in inline and "url(" not in inline
    raw = page_file.read_text(encoding="utf-8")
    assert "Test &lt;leaderboard&gt;" in raw and "Test <leaderboard>" not in raw
    for name in ("filter-family", "filter-regime", "filter-source"):
        assert name in page.ids
    assert "asap-bench: 0.1.0" in raw  # page-wide provenance


def test_marks_are_dense_on_printed_numbers():
    assert _marks({"a": 80.04, "b": 79.96, "c": 79.0}, lower_is_better=False) == {"a": "best", "b": "best",
                                                                                   "c": "second"}
    assert _marks({"a": 3.0, "b": 2.0}, lower_is_better=True) == {"b": "best", "a": "second"}
    assert _marks({"a": 1.0}, lower_is_better=False) == {}


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="mean"):
        build_context(small_frame().drop(columns=["mean"]))


def test_provenance_from_records_counts_files_and_lists_fingerprints():
    records = pd.DataFrame([
        {"encoder": "asap", "path": "a/r1_s0.json", "status": "ok", "metric": "auc", "protocol": "cls/ct-rate",
         "encoder_fingerprint": "e1", "protocol_fingerprint": "p1", "synthetic": True},
        {"encoder": "asap", "path": "a/r1_s0.json", "status": "ok", "metric": "balanced_acc",
         "protocol": "cls/ct-rate", "encoder_fingerprint": "e1", "protocol_fingerprint": "p1", "synthetic": True},
        {"encoder": "asap", "path": "a/r1_s1.json", "status": "failed", "metric": None, "protocol": "cls/ct-rate",
         "encoder_fingerprint": "e1", "protocol_fingerprint": "p1", "synthetic": True},
    ])
    prov = provenance_from_records(records)
    assert prov["asap"]["records"] == 2 and prov["asap"]["failed"] == 1
    assert prov["asap"]["fingerprints"] == {"encoder": ["e1"], "protocol cls/ct-rate": ["p1"]}
    assert prov["asap"]["synthetic demo data"] == "yes"


def test_the_papers_tables_render_with_the_papers_best_cells(tmp_path):
    from asap_bench.results.paper import paper_frame

    try:
        frame = paper_frame()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    page = Page(render_html(frame, None, tmp_path / "paper.html").read_text(encoding="utf-8"))
    assert len(page.rows) == frame["encoder"].nunique()
    ctx = build_context(frame)
    shown = {(c["protocol"], c["regime_key"], c["metric"]) for c in ctx["columns"]}
    subset = frame[[(p, f"{r:g}", m) in shown for p, r, m in zip(frame["protocol"], frame["regime"], frame["metric"])]]
    for (protocol, regime, _), (best, _second) in expected_best(subset).items():
        col = column_index(page, protocol, regime)
        assert {r["attrs"]["data-encoder"] for r in page.rows if "best" in classes(r["cells"][col])} == best
    ct_rate = column_index(page, "cls/ct-rate", "1")
    assert "best" in classes(row_of(page, "asap", "paper")["cells"][ct_rate])


# --------------------------------------------------------------------------------------------
# a real headless Chromium, over the DevTools protocol on a pipe
# --------------------------------------------------------------------------------------------
CHROMIUM = next((p for p in (os.environ.get("ASAP_BENCH_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars"]


class Chromium:
    """Just enough of the DevTools protocol: one page, evaluate, real mouse clicks, events kept."""

    def __init__(self, executable: str, workdir: Path, timeout: float = 30.0):
        self.timeout = timeout
        self.events: list[dict] = []
        self._next = 0
        self._buffer = b""
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()

        def pipes_on_3_and_4():  # the browser reads commands on fd 3 and writes replies on fd 4
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(resp_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.close(a)
            os.close(b)

        self.log = workdir / "chromium.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={workdir / 'profile'}", "--remote-debugging-pipe",
                 "about:blank"], stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=False,
                preexec_fn=pipes_on_3_and_4)
        os.close(cmd_r)
        os.close(resp_w)
        self.session: str | None = None

    # -- protocol ---------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from chromium; its log: {self.log.read_text(errors='replace')[-2000:]}")
            ready, _, _ = select.select([self._resp_r], [], [], left)
            if ready:
                chunk = os.read(self._resp_r, 1 << 20)
                if not chunk:
                    log = self.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"chromium closed the pipe; its log: {log}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    # -- page -------------------------------------------------------------------------------
    def open(self, url: str, width: int = 1400, height: int = 900) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_for_event("Page.loadEventFired")

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A mouse click at the element's centre, as a person makes it; refuses if something covers it."""
        where = self.eval(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
            " if (!el) return null; el.scrollIntoView({block: 'center', inline: 'center'});"
            " const r = el.getBoundingClientRect(); const x = r.left + r.width / 2, y = r.top + r.height / 2;"
            " const hit = document.elementFromPoint(x, y);"
            " return {x, y, onTop: !!hit && (el === hit || el.contains(hit) || hit.contains(el))}; })()")
        assert where is not None, f"no element {selector}"
        assert where["onTop"], f"{selector} is covered by another element"
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": where["x"], "y": where["y"],
                                                   "button": "left" if kind != "mouseMoved" else "none",
                                                   "clickCount": 1 if kind != "mouseMoved" else 0})

    def choose(self, select_id: str, value: str) -> None:
        """Pick an option of a select box and fire its change event, as choosing it from the list does."""
        ok = self.eval(
            f"(() => {{ const s = document.getElementById({json.dumps(select_id)}); s.focus();"
            f" s.value = {json.dumps(value)};"
            " s.dispatchEvent(new Event('input', {bubbles: true}));"
            " s.dispatchEvent(new Event('change', {bubbles: true})); return s.value; })()")
        assert ok == value, f"{select_id} has no option {value!r}"

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(params["entry"].get("text", ""))
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)


VISIBLE = "(el => getComputedStyle(el).display !== 'none' && el.getClientRects().length > 0)"
ROW_ORDER = (f"Array.from(document.querySelectorAll('#leaderboard tbody tr')).filter({VISIBLE})"
             ".map(r => r.dataset.encoder + '|' + r.dataset.source)")


def header(protocol: str, regime: str) -> str:
    return f'#leaderboard thead th[data-protocol="{protocol}"][data-regime="{regime}"]'


@pytest.fixture
def browser(page_file, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium); the page's browser checks need one")
    chromium = Chromium(CHROMIUM, tmp_path)
    try:
        chromium.open(page_file.resolve().as_uri())
        yield chromium
    finally:
        chromium.close()


def test_browser_loads_the_page_without_errors_or_network(browser, tmp_path):
    assert browser.eval("document.title") == "Test <leaderboard>"
    assert browser.eval("document.querySelectorAll('#leaderboard tbody tr').length") == 7
    assert browser.eval("document.getElementById('filter-status').textContent") == \
        "showing 4 of 4 settings, 7 of 7 rows"  # the script ran
    assert browser.errors() == []
    assert all(url.startswith("file://") for url in browser.requests()), browser.requests()
    shot = browser.screenshot(tmp_path / "leaderboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_browser_clicking_a_header_sorts_rows_numerically_and_toggles(browser):
    values = RUN[("cls/ct-rate", "auc", 0.1)]
    by_value = sorted(values, key=lambda e: values[e][0], reverse=True)
    missing = ["asap|paper"]  # the quoted row has no number here: it stays last both ways
    browser.click(header("cls/ct-rate", "0.1"))
    assert browser.eval(ROW_ORDER) == [f"{e}|run" for e in by_value] + missing
    assert browser.eval(f"document.querySelector('{header('cls/ct-rate', '0.1')}').getAttribute('aria-sort')") == \
        "descending"
    browser.click(header("cls/ct-rate", "0.1"))
    assert browser.eval(ROW_ORDER) == [f"{e}|run" for e in reversed(by_value)] + missing
    # another column sorts by its own numbers (seg 100 %: MAE first), and text columns sort too
    seg = RUN[("seg/msd-lung", "dice", 1.0)]
    browser.click(header("seg/msd-lung", "1"))
    order = browser.eval(ROW_ORDER)
    assert order[:5] == [f"{e}|run" for e in sorted(seg, key=lambda e: seg[e][0], reverse=True)]
    browser.click("#leaderboard thead th:first-child")
    labels = browser.eval(f"Array.from(document.querySelectorAll('#leaderboard tbody tr')).filter({VISIBLE})"
                          ".map(r => r.cells[0].dataset.value.toLowerCase())")
    assert labels == sorted(labels)
    assert browser.errors() == []


def test_browser_family_and_regime_filters_hide_other_columns(browser):
    visible_settings = (f"Array.from(document.querySelectorAll('#leaderboard thead th[data-family]')).filter({VISIBLE})"
                        ".map(th => th.dataset.protocol + '@' + th.dataset.regime)")
    browser.choose("filter-family", "seg")
    assert browser.eval(visible_settings) == ["seg/msd-lung@0.1", "seg/msd-lung@1"]
    hidden_cells = browser.eval(
        "Array.from(document.querySelectorAll('#leaderboard tbody tr')).flatMap(r =>"
        " Array.from(document.querySelectorAll('#leaderboard thead th')).map((th, i) =>"
        f" th.dataset.family === 'cls' && {VISIBLE}(r.cells[i]))).filter(Boolean).length")
    assert hidden_cells == 0  # every cls cell is hidden with its header
    # the quoted row has no segmentation number, so it leaves the table too
    assert "asap|paper" not in browser.eval(ROW_ORDER) and len(browser.eval(ROW_ORDER)) == 6
    browser.choose("filter-regime", "1")
    assert browser.eval(visible_settings) == ["seg/msd-lung@1"]
    assert "home-brew|run" not in browser.eval(ROW_ORDER)  # no number in the one column left
    browser.choose("filter-family", "all")
    assert browser.eval(visible_settings) == ["cls/ct-rate@1", "seg/msd-lung@1"]
    browser.choose("filter-source", "paper")
    assert browser.eval(ROW_ORDER) == ["asap|paper"]
    browser.choose("filter-source", "all")
    browser.choose("filter-regime", "all")
    assert len(browser.eval(visible_settings)) == 4 and len(browser.eval(ROW_ORDER)) == 7
    assert browser.errors() == []


def test_browser_shows_the_right_best_cell(browser):
    shown = browser.eval(
        "Array.from(document.querySelectorAll('#leaderboard thead th[data-family]')).map(th => {"
        " const i = Array.from(th.parentNode.cells).indexOf(th);"
        " const pick = cls => Array.from(document.querySelectorAll('#leaderboard tbody tr'))"
        "   .filter(r => r.cells[i].classList.contains(cls)).map(r => [r.dataset.encoder, r.dataset.source,"
        "    getComputedStyle(r.cells[i]).fontWeight, getComputedStyle(r.cells[i]).textDecorationLine]);"
        " return [th.dataset.protocol, th.dataset.regime, pick('best'), pick('second')]; })")
    expected = expected_best(small_frame())
    for protocol, regime, best, second in shown:
        want_best, want_second = set(), set()
        for source in ("run", "paper"):
            if (protocol, regime, source) in expected:
                want_best |= {(e, source) for e in expected[(protocol, regime, source)][0]}
                want_second |= {(e, source) for e in expected[(protocol, regime, source)][1]}
        assert {(e, s) for e, s, _, _ in best} == want_best, (protocol, regime)
        assert {(e, s) for e, s, _, _ in second} == want_second, (protocol, regime)
        assert all(int(weight) >= 700 for _, _, weight, _ in best)  # shown bold
        assert all("underline" in line for _, _, _, line in second)  # shown underlined
    cls100 = next(b for p, r, b, _ in shown if (p, r) == ("cls/ct-rate", "1"))
    assert [(e, s) for e, s, _, _ in cls100] == [("asap", "run")]
    assert browser.errors() == []


def test_browser_provenance_link_opens_its_details(browser):
    assert browser.eval("document.getElementById('prov-asap').open") is False
    browser.click('#row-asap-run a[href="#prov-asap"]')
    deadline = time.monotonic() + 5
    while not browser.eval("document.getElementById('prov-asap').open") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.eval("document.getElementById('prov-asap').open") is True
    assert "proto-beef" in browser.eval("document.getElementById('prov-asap').innerText")
    browser.click('#row-merlin-run a[href="#card-merlin"]')
    assert browser.eval("location.hash") == "#card-merlin"
    assert browser.eval("document.querySelector(':target').id") == "card-merlin"
    assert browser.errors() == []


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def vqa_rows() -> pd.DataFrame:
    rows = []
    for i, encoder in enumerate(["random", "merlin", "asap"]):
        for j, metric in enumerate(["bleu1", "bleu4", "rouge_l", "bertscore_f1", "accuracy"]):
            rows.append({"encoder": encoder, "protocol": "vqa/radgenome", "regime": 1.0, "metric": metric,
                         "mean": 0.2 + 0.1 * i + 0.05 * j, "std": 0.01, "n_seeds": 5, "source": "run"})
    return pd.DataFrame(rows)


def _check_files(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000, path
        assert data.startswith(b"\x89PNG\r\n\x1a\n" if path.suffix == ".png" else b"%PDF-"), path


def test_make_figures_writes_png_and_pdf(tmp_path):
    from asap_bench.report.plots import make_figures

    notes: list[str] = []
    frame = pd.concat([small_frame(), vqa_rows()], ignore_index=True)
    paths = make_figures(frame, tmp_path / "figs", notes=notes)
    names = {p.name for p in paths}
    for stem in ("ratio_run", "families_run", "vqa_radar_run", "ratio_paper", "families_paper"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert "vqa_radar_paper.png" not in names
    assert all(p.parent == tmp_path / "figs" and p.is_file() for p in paths)
    _check_files(paths)
    assert any("no VQA" in n for n in notes)


def test_make_figures_skips_the_radar_without_vqa_rows(tmp_path):
    from asap_bench.report.plots import family_averages, make_figures

    notes: list[str] = []
    run = small_frame()
    run = run[run["source"] == "run"]
    paths = make_figures(run, tmp_path, notes=notes)
    assert sorted(p.name for p in paths) == ["critical_difference_run.pdf", "critical_difference_run.png",
                                             "families_run.pdf", "families_run.png", "ratio_run.pdf", "ratio_run.png"]
    _check_files(paths)
    assert notes == ["measured: no VQA results, so no VQA radar"]
    # family averages use the settings every encoder has (home-brew lacks 100 %), distances left out
    from asap_bench.report.plots import _prepare

    table = family_averages(_prepare(run)).set_index(["family", "encoder"])
    assert table.loc[("cls", "asap"), "mean"] == pytest.approx(78.1)  # only the shared 10 % setting
    assert table.loc[("seg", "asap"), "mean"] == pytest.approx(56.6)
    assert table["common"].all()


def test_critical_difference_diagram_for_three_or_more_encoders(tmp_path):
    import pandas as pd

    from asap_bench.report.plots import make_figures

    rows = []
    for i, encoder in enumerate(["random", "mae", "asap"]):
        for j, protocol in enumerate(["cls/ct-rate", "cls/stoic", "cls/luna16", "cls/rad-chestct"]):
            rows.append({"encoder": encoder, "protocol": protocol, "regime": 1.0, "metric": "auc",
                         "mean": 0.6 + 0.1 * i + 0.01 * j, "std": 0.01, "n_seeds": 5, "source": "runs"})
    notes: list[str] = []
    written = make_figures(pd.DataFrame(rows), tmp_path, notes=notes)
    cd = [p for p in written if p.stem.startswith("critical_difference")]
    assert {p.suffix for p in cd} == {".png", ".pdf"} and all(p.stat().st_size > 0 for p in cd)
    two = make_figures(pd.DataFrame([r for r in rows if r["encoder"] != "asap"]), tmp_path / "two", notes=notes)
    assert not [p for p in two if p.stem.startswith("critical_difference")]
    assert any("at least 3 encoders" in n for n in notes)
