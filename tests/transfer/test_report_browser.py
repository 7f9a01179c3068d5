"""report.html in a real browser (headless Chromium, as a new user opens it): no horizontal overflow at
1280 px, and a screenshot that shows something. Skips, saying why, where no Chromium is installed
(Debian: ``apt-get install chromium``; ``CHROMIUM=/path/to/chrome`` picks another binary)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import numpy as np
from PIL import Image
from test_report import write_trial  # noqa: E402  (tests/transfer is on sys.path under pytest)
from test_report_html import make_tree  # noqa: E402

from transfer.report import write_tables

WIDTH, HEIGHT = 1280, 2000


def _browser():
    for name in filter(None, (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                              "google-chrome-stable")):
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = _browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium found (chromium, chromium-browser, google-chrome "
                                "or $CHROMIUM): install it (Debian: apt-get install chromium) to run the browser test")

# measured after the page (and its embedded figures) loaded: the document's scroll width against the
# viewport, and the worst overflow inside any table block (blocks scroll on their own, so the document
# alone would not show a table that is too wide)
PROBE = """<script>window.addEventListener('load', function () {
  var worst = 0;
  document.querySelectorAll('.block, table, figure').forEach(function (e) {
    worst = Math.max(worst, e.scrollWidth - e.clientWidth); });
  var d = document.documentElement;
  d.setAttribute('data-probe', d.scrollWidth + ' ' + d.clientWidth + ' ' + worst);
});</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={WIDTH},{HEIGHT}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_without_horizontal_overflow(tmp_path: Path):
    root = make_tree(tmp_path / "results", preset="smoke", arch="resnet18")
    # the widest block a report can hold today: an old result of an unregistered task shows every metric it
    # reported, here Table 5's box and mask APs with their size breakdowns (twelve columns)
    coco = [f"AP{kind}{suffix}" for kind in ("bb", "mk") for suffix in ("", "50", "75", "s", "m", "l")]
    for weights, base in (("supervised", 38.0), ("moco", 38.6)):
        for k in range(2):
            write_trial(root, weights, "coco_old_recipe", k, {m: base + i + 0.1 * k for i, m in enumerate(coco)},
                        family="instance_segmentation", iters=90000, preset="smoke",
                        arch="resnet18", sha=f"{len(weights):02d}" * 32)
    html = write_tables(root)["html"]
    probe = html.with_name("report_probe.html")
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    m = re.search(r'data-probe="(\d+) (\d+) (-?\d+)"', r.stdout)
    assert m, f"no measurement from Chromium (rc {r.returncode}): {r.stderr[-2000:]}"
    scroll, client, worst = map(int, m.groups())
    assert client == WIDTH and scroll <= client, f"horizontal overflow: page {scroll} px wide in a {client} px window"
    assert worst <= 0, f"a table or figure overflows its block by {worst} px"

    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", html.as_uri())
    assert shot.is_file(), f"no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    with Image.open(shot) as im:
        assert im.size == (WIDTH, HEIGHT)
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32)
    gray = rgb.mean(axis=2)
    inked = float((gray < 200).mean())  # share of pixels clearly darker than the white background
    assert 0.01 < inked < 0.6, f"screenshot looks blank or broken: {inked:.3f} of the pixels are dark"
    assert (gray > 250).mean() > 0.3 and gray.min() < 60  # a white page with dark text on it
    # the smoke banner (amber background) is on screen at the top, not only written somewhere
    top = rgb[:200]
    amber = (top[..., 0] > 240) & (top[..., 1] > 200) & (top[..., 1] < 250) & (top[..., 2] < 220)
    assert amber.mean() > 0.05, "no banner colour at the top of the screenshot"
