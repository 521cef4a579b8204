"""report.html in a real browser: headless Chromium, no network, every plot renders.

The page marks each <img> with its decoded size after the load event and the body with
the number of plots drawn (`data-plots-rendered`); Chromium's --dump-dom shows those
marks. A screenshot checks the same from the pixels: the plots' line colours appear.
`scripts/dev.sh test` installs Chromium where it is missing and apt-get exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from silotune.server.report import PLOT_NAMES, write_report
from tests.unit.server.test_report import make_metrics, write_metrics

pytestmark = pytest.mark.integration
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(BROWSER is None, reason="chromium is not installed "
                                   "(scripts/dev.sh test installs it with apt-get)")


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    offline = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=10000", *offline, *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _many_silo_metrics() -> dict:
    """40 silos (the epsilon plot switches to its min/median/max view) and two causes."""
    metrics = make_metrics()
    for row in metrics["rounds"]:
        r = row["round"]
        row["epsilon"] = {f"silo-{i:03d}": 0.1 * r + 0.01 * i for i in range(40)}
        row["epsilon_limit"] = {f"silo-{i:03d}": 8.0 for i in range(40)}
    metrics["rounds"][2]["excluded"] = [
        {"silo": "silo-007", "reason": "BudgetExhausted: round would exceed epsilon 8"},
        {"silo": "silo-009", "reason": "no reply before the round timeout"}]
    return metrics


@needs_browser
def test_every_plot_renders_offline(tmp_path: Path) -> None:
    page = write_report(write_metrics(tmp_path / "run", _many_silo_metrics()))
    proc = _chromium(page, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = proc.stdout
    assert re.search(r'<body[^>]*data-plots-rendered="4"', dom), dom[:2000]
    sizes = re.findall(r'<img [^>]*data-rendered="([^"]+)"', dom)
    assert len(sizes) == len(PLOT_NAMES)
    for size in sizes:
        width, height = (int(v) for v in size.split("x"))
        assert width >= 300 and height >= 200


@needs_browser
def test_screenshot_shows_the_plots(tmp_path: Path) -> None:
    from matplotlib.image import imread

    page = write_report(write_metrics(tmp_path / "run", make_metrics()))
    shot = tmp_path / "page.png"
    proc = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,4000",
                     "--hide-scrollbars")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-3000:]
    pixels = (imread(shot)[:, :, :3] * 255).round().astype(int)  # (H, W, 3)
    assert pixels.shape[:2] == (4000, 1200)

    def share(rgb: tuple[int, int, int]) -> float:
        return float(np.mean(np.all(np.abs(pixels - np.array(rgb)) <= 12, axis=-1)))

    # matplotlib's first three colours: accuracy/loss lines (C0), the down bars (C1),
    # silo-b's epsilon line (C1) and the exclusion bars (C3): each drawn, not blank
    for colour in ((31, 119, 180), (255, 127, 14), (214, 39, 40)):
        assert share(colour) > 1e-4, colour
    assert share((255, 255, 255)) < 0.99  # the page is not blank
