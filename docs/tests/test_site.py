"""Serve the built site on localhost, open every page in headless Chromium, and check that it renders.

For every HTML page reachable from the home page: a title, the navigation, a heading, every ``<img>``
decoded (``naturalWidth > 0``), no severe console messages, and every internal link, image, stylesheet
and script answering 200, with every ``#fragment`` present on its target page.  Every page the build
wrote must be reached, and at least one plot from ``experiments/results`` must be shown.

Needs the built site (``mkdocs build``; ``TQ_SITE_DIR`` overrides ``site/``) and Chromium with its
driver (Debian: ``apt-get install chromium chromium-driver``; ``CHROMIUM`` / ``CHROMEDRIVER`` override
the paths).  ``nox -s docs`` does all of this.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("TQ_SITE_DIR", ROOT / "site"))
SITE_NAME = "tq"
PLOT_PREFIX = "/assets/results/"
PAGE_LOAD_TIMEOUT_S = 60

# Everything the browser test reads from a page, in one round trip.
PAGE_FACTS = """
const abs = (el, attr) => el[attr] ? String(el[attr]) : null;
return {
  title: document.title,
  h1: document.querySelector('article h1, .md-content h1') !== null,
  navLinks: document.querySelectorAll('nav.md-nav--primary a[href]').length,
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, complete: i.complete,
                                                width: i.naturalWidth})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  resources: [
    ...Array.from(document.querySelectorAll('img[src], script[src]')).map(e => abs(e, 'src')),
    ...Array.from(document.querySelectorAll('link[href]')).map(e => abs(e, 'href')),
  ].filter(Boolean),
  ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
};
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # The browser drops connections it no longer needs (a navigation mid-download): not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"no built site at {SITE}: run `mkdocs build --strict` first (nox -s docs does)")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _find(env: str, *names: str) -> str:
    for candidate in (os.environ.get(env), *names):
        if candidate and (shutil.which(candidate) or Path(candidate).is_file()):
            return shutil.which(candidate) or candidate
    pytest.fail(
        f"{names[0]} not found (set {env}); on Debian: apt-get install -y --no-install-recommends "
        "chromium chromium-driver"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = _find("CHROMIUM", "chromium", "/usr/bin/chromium", "chromium-browser", "google-chrome")
    driver_path = _find("CHROMEDRIVER", "chromedriver", "/usr/bin/chromedriver")
    with tempfile.TemporaryDirectory(prefix="tq-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for arg in (
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1280,1024",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
        try:
            yield driver
        finally:
            driver.quit()


@functools.cache
def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _page_key(url: str) -> str:
    """``/a/b/`` and ``/a/b/index.html`` are the same page."""
    path = urlsplit(url).path
    return path[: -len("index.html")] if path.endswith("/index.html") else path


def _built_pages() -> set[str]:
    pages = set()
    for html in SITE.rglob("*.html"):
        rel = html.relative_to(SITE).as_posix()
        if rel == "404.html":
            continue
        pages.add("/" + (rel[: -len("index.html")] if rel.endswith("index.html") else rel))
    return pages


def test_site_renders_in_chromium(base_url: str, browser: object) -> None:
    host = urlsplit(base_url).netloc
    queue, seen = [base_url], {_page_key(base_url)}
    ids: dict[str, set[str]] = {}
    fragments: list[tuple[str, str, str]] = []  # (from page, target page, fragment)
    problems: list[str] = []
    plots = 0
    while queue:
        url = queue.pop(0)
        page = _page_key(url)
        browser.get(url)  # type: ignore[attr-defined]
        facts = browser.execute_script(PAGE_FACTS)  # type: ignore[attr-defined]
        title = facts["title"]
        if not (
            title == SITE_NAME or (title.endswith(f" - {SITE_NAME}") and len(title) > len(SITE_NAME) + 3)
        ):
            problems.append(f"{page}: title {facts['title']!r} does not name the site")
        if facts["navLinks"] < 5:
            problems.append(f"{page}: navigation missing ({facts['navLinks']} links)")
        if not facts["h1"]:
            problems.append(f"{page}: no heading")
        for img in facts["images"]:
            if not img["complete"] or img["width"] == 0:
                problems.append(f"{page}: image {img['src']} did not render")
            elif urlsplit(img["src"]).path.startswith(PLOT_PREFIX):
                plots += 1
        for entry in browser.get_log("browser"):  # type: ignore[attr-defined]
            # The theme asks api.github.com for the repository's stars; the network is closed in CI, so
            # only messages about this site count.
            if entry["level"] == "SEVERE" and (host in entry["message"] or "http" not in entry["message"]):
                problems.append(f"{page}: console: {entry['message']}")
        ids[page] = set(facts["ids"])
        for link in facts["links"] + facts["resources"]:
            target, fragment = urldefrag(link)
            if urlsplit(target).netloc != host:
                continue  # external links are not followed (the network is closed in CI)
            status = _status(target)
            if status != 200:
                problems.append(f"{page}: {target} answers {status}")
                continue
            key = _page_key(target)
            if fragment:
                fragments.append((page, key, fragment))
            if link in facts["links"] and (key.endswith("/") or key.endswith(".html")) and key not in seen:
                seen.add(key)
                queue.append(target)
    for page, target, fragment in fragments:
        if target in ids and fragment not in ids[target]:
            problems.append(f"{page}: link to {target}#{fragment}, but no such anchor")
    missing = _built_pages() - seen
    if missing:
        problems.append(f"built pages not reachable by links from the home page: {sorted(missing)}")
    if plots == 0:
        problems.append(f"no plot from experiments/results ({PLOT_PREFIX}*.png) rendered on any page")
    assert not problems, "\n".join(problems)
    assert len(seen) >= 10, f"only {len(seen)} pages crawled"
