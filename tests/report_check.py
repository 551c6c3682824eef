"""Check a built Snakemake report: it parses, carries its figures, and a real browser shows them.

Not a rule script: a check for users, CI and the end-to-end test, run after
``snakemake --report report.html``::

    python tests/report_check.py report.html --screenshot report.png \
        --expect-category Metrics --expect-file results/demo/metrics_summary.tsv

Two levels:

1. Static (always): the embedded ``results`` and ``categories`` objects parse as JSON, every
   expected category and file is present, every image decodes (PNG/SVG signature in its data
   URI) and every entry has a caption.
2. Browser (when Debian's ``chromium`` is on PATH; skipped otherwise, and reported as skipped):
   headless chromium opens a copy of the report with a small probe script appended. The probe
   waits for the report's React app, decodes every embedded image with the browser's own decoder
   (``naturalWidth > 0``), then clicks through the menu (category → subcategory → first result's
   view button) so the screenshot shows a figure, and writes its findings into the page title,
   which ``--dump-dom`` returns. A screenshot is taken of the same navigated state.

Exit status 0 when all checks pass, 1 otherwise (the failures are printed).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Flags that keep headless chromium offline, quiet and independent of any user profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
PROBE_TITLE = "CCFM-REPORT-CHECK"


@dataclass
class ReportCheck:
    """Outcome of :func:`check_report`; ``ok`` is False when anything failed."""

    path: Path
    n_results: int = 0
    n_images: int = 0
    categories: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    browser: str = "not run"
    browser_decoded_images: int | None = None
    browser_shown_image: bool | None = None
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [
            f"report {self.path}: {self.n_results} results, {self.n_images} images, "
            f"categories {', '.join(f'{c} ({len(s)} subcategories)' for c, s in self.categories.items())}",
            f"browser: {self.browser}"
            + (
                f"; decoded {self.browser_decoded_images}/{self.n_images} images"
                if self.browser_decoded_images is not None
                else ""
            )
            + (
                f"; figure shown after navigation: {self.browser_shown_image}"
                if self.browser_shown_image is not None
                else ""
            ),
        ]
        if self.screenshot:
            lines.append(f"screenshot: {self.screenshot}")
        lines.extend(f"FAIL: {failure}" for failure in self.failures)
        return "\n".join(lines)


def _embedded_json(html: str, script_id: str, variable: str) -> object:
    """The JSON literal assigned to ``var <variable>`` inside ``<script id="<script_id>">``."""
    match = re.search(
        rf'<script id="{re.escape(script_id)}">\s*var {re.escape(variable)} = (.*?);\s*</script>', html, flags=re.S
    )
    if match is None:
        raise ValueError(f"no <script id={script_id!r}> with 'var {variable} = ...' (not a Snakemake report?)")
    return json.loads(match.group(1))


def _image_payload(data_uri: str) -> bytes:
    header, _, payload = data_uri.partition(",")
    if ";base64" in header:
        return base64.b64decode(payload)
    return payload.encode()


def _is_image(entry: dict) -> bool:
    return str(entry.get("mime_type", "")).startswith("image/")


def _check_image(path: str, entry: dict) -> str | None:
    """A failure message when the embedded image does not decode as its type."""
    try:
        data = _image_payload(entry.get("data_uri", ""))
    except (ValueError, base64.binascii.Error) as error:
        return f"{path}: embedded image is not valid base64 ({error})"
    mime = entry["mime_type"]
    if mime == "image/png" and not data.startswith(PNG_SIGNATURE):
        return f"{path}: embedded data is not a PNG"
    if mime == "image/svg+xml" and b"<svg" not in data[:4096]:
        return f"{path}: embedded data is not an SVG"
    if len(data) < 200:
        return f"{path}: embedded image has only {len(data)} bytes"
    return None


def static_check(
    report_html: Path, expect_categories: Sequence[str] = (), expect_files: Sequence[str] = ()
) -> ReportCheck:
    """Parse the report's embedded results and check images, captions and expected entries."""
    check = ReportCheck(path=report_html)
    if not report_html.exists():
        check.failures.append(f"{report_html} does not exist; build it with `snakemake --report {report_html.name}`")
        return check
    html = report_html.read_text(errors="replace")
    try:
        results = _embedded_json(html, "results", "results")
        categories = _embedded_json(html, "categories", "categories")
    except (ValueError, json.JSONDecodeError) as error:
        check.failures.append(f"{report_html}: {error}")
        return check
    check.n_results = len(results)
    check.categories = {cat: sorted(subs) for cat, subs in categories.items()}
    for path, entry in results.items():
        if not str(entry.get("caption", "")).strip():
            check.failures.append(f"{path}: no caption")
        if _is_image(entry):
            check.n_images += 1
            problem = _check_image(path, entry)
            if problem:
                check.failures.append(problem)
    if check.n_images == 0:
        check.failures.append(f"{report_html}: no figures embedded")
    for category in expect_categories:
        if category not in categories:
            check.failures.append(f"category {category!r} missing (present: {sorted(categories)})")
    for expected in expect_files:
        if expected not in results:
            check.failures.append(f"{expected} is not in the report")
    return check


def find_chromium() -> str | None:
    """Path of a chromium binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _probe_script(category: str | None, subcategory: str | None) -> str:
    """JavaScript appended to a copy of the report; reports its findings through document.title."""
    steps = json.dumps([s for s in (category, subcategory) if s])
    return f"""
<script>
(function () {{
  const out = {{decoded: 0, failed: [], clicked: [], shown: false, app: false}};
  const finish = () => {{ document.title = "{PROBE_TITLE} " + JSON.stringify(out); }};
  const clickText = (text) => {{
    const link = Array.from(document.querySelectorAll("a")).find((a) => a.textContent.trim() === text);
    if (link) {{ link.click(); out.clicked.push(text); }}
    return Boolean(link);
  }};
  window.addEventListener("load", () => {{
    const images = Object.entries(results).filter(([p, r]) => String(r.mime_type).startsWith("image/"));
    const decodes = images.map(([path, r]) => new Promise((resolve) => {{
      const img = new Image();
      img.onload = () => {{ if (img.naturalWidth > 0) out.decoded += 1; else out.failed.push(path); resolve(); }};
      img.onerror = () => {{ out.failed.push(path); resolve(); }};
      img.src = r.data_uri;
    }}));
    setTimeout(() => {{
      out.app = Boolean(Array.from(document.querySelectorAll("a")).find((a) => a.textContent.trim() === "Workflow"));
      let delay = 0;
      // With a single category the menu calls it "Results" instead of its name; with a single
      // subcategory the category page lists the results directly (no subcategory link).
      {steps}.forEach((step, index) => {{
        delay += 400;
        setTimeout(() => clickText(step) || (index === 0 && clickText("Results")), delay);
      }});
      // Open results one by one (tables come first in some categories) until a figure shows.
      const figureUris = new Set(images.map(([p, r]) => r.data_uri));
      const figureShown = () => Array.from(document.querySelectorAll("img")).some(
        (img) => figureUris.has(img.getAttribute("src")) && img.naturalWidth > 0);
      const tryRow = (index) => {{
        const views = document.querySelectorAll("tbody tr td:last-child a:first-child");
        if (index >= views.length || index >= 40) {{ Promise.all(decodes).then(finish); return; }}
        views[index].click();
        setTimeout(() => {{
          if (figureShown()) {{
            out.shown = true;
            out.clicked.push("result " + (index + 1));
            Promise.all(decodes).then(finish);
          }} else {{
            tryRow(index + 1);
          }}
        }}, 400);
      }};
      setTimeout(() => tryRow(0), delay + 600);
    }}, 1000);
  }});
}})();
</script>
"""


def _chromium(binary: str, args: Sequence[str], timeout: int) -> subprocess.CompletedProcess[str]:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        command = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def browser_check(
    check: ReportCheck,
    screenshot: Path | None = None,
    category: str | None = None,
    subcategory: str | None = None,
    timeout: int = 120,
) -> ReportCheck:
    """Render the report in headless chromium; fill the browser fields of ``check``."""
    binary = find_chromium()
    if binary is None:
        check.browser = "skipped (no chromium on PATH; on Debian: apt-get install chromium)"
        return check
    if category is None and check.categories:
        category = sorted(check.categories)[0]
    if subcategory is None and category in check.categories and check.categories[category]:
        subcategory = check.categories[category][0]
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        probed = Path(tmp) / "report.html"
        html = check.path.read_text(errors="replace")
        # The last </body> is the document's: earlier ones sit inside embedded JavaScript strings.
        head, tag, tail = html.rpartition("</body>")
        if not tag:
            check.failures.append(f"{check.path}: no </body> tag; the report HTML is truncated")
            return check
        probed.write_text(head + _probe_script(category, subcategory) + tag + tail)
        url = probed.resolve().as_uri()
        budget = "--virtual-time-budget=15000"
        dom = _chromium(binary, [budget, "--dump-dom", url], timeout)
        match = re.search(rf"<title>{PROBE_TITLE} (.*?)</title>", dom.stdout, flags=re.S)
        if match is None:
            check.browser = f"chromium ({binary}) ran but the probe did not finish"
            check.failures.append(f"the report did not finish loading in chromium: {dom.stderr.strip()[-500:]}")
            return check
        found = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        check.browser = f"chromium ({binary}); clicked {found['clicked']}"
        check.browser_decoded_images = int(found["decoded"])
        check.browser_shown_image = bool(found["shown"])
        if not found["app"]:
            check.failures.append("the report's app did not render its menu in chromium")
        if found["failed"]:
            check.failures.append(f"chromium could not decode {len(found['failed'])} image(s): {found['failed'][:5]}")
        if check.n_images and not found["shown"]:
            check.failures.append(
                f"no figure was shown after opening {category!r}/{subcategory!r} and its first result"
            )
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = _chromium(
                binary, [budget, f"--screenshot={screenshot.resolve()}", "--window-size=1400,1000", url], timeout
            )
            if not screenshot.exists() or screenshot.stat().st_size < 5000:
                check.failures.append(f"chromium wrote no usable screenshot: {shot.stderr.strip()[-300:]}")
            else:
                check.screenshot = screenshot
    return check


def check_report(
    report_html: str | Path,
    screenshot: str | Path | None = None,
    expect_categories: Sequence[str] = (),
    expect_files: Sequence[str] = (),
    category: str | None = None,
    subcategory: str | None = None,
    browser: bool = True,
) -> ReportCheck:
    """Static check, then (if ``browser`` and chromium exists) the headless-browser check."""
    check = static_check(Path(report_html), expect_categories, expect_files)
    if browser and check.n_results:
        browser_check(check, Path(screenshot) if screenshot else None, category, subcategory)
    return check


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--expect-category", action="append", default=[])
    parser.add_argument("--expect-file", action="append", default=[])
    parser.add_argument("--category", default=None, help="category to open in the browser (default: first)")
    parser.add_argument("--subcategory", default=None)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    check = check_report(
        args.report,
        args.screenshot,
        args.expect_category,
        args.expect_file,
        args.category,
        args.subcategory,
        browser=not args.no_browser,
    )
    print(check.summary())
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
