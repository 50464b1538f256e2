"""Headless Chromium as a test instrument for the HTML reports (issue 36, item 8).

No Python package: the page is copied with a small script appended that, after the load event (which
waits for every <img>), measures the page and writes the result as JSON into a <pre>; `--dump-dom`
prints the DOM after `--virtual-time-budget` has let the load finish, and the JSON is read back from it.
A second run takes a 1280 x 800 screenshot (the first screen). Offline: file:// pages only.
"""
import json
import os
import re
import shutil
import subprocess
from typing import Optional

VIEWPORT = (1280, 800)
_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) {
    return {src: i.getAttribute('src').slice(0, 60), complete: i.complete, naturalWidth: i.naturalWidth};
  });
  // Text whose box lies in the first screen (top 800 px at a 1280 px viewport).
  var first = [], walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    var node = walker.currentNode, range = document.createRange();
    range.selectNodeContents(node);
    var r = range.getBoundingClientRect();
    if (r.width > 0 && r.top < %(height)d && r.bottom > 0 && r.left < %(width)d) first.push(node.textContent.trim());
  }
  var wide = Array.from(document.body.querySelectorAll('*')).filter(function (e) {
    return e.getBoundingClientRect().right > %(width)d + 0.5;
  }).map(function (e) { return e.tagName; });
  var out = document.createElement('pre');
  out.id = 'medclf-probe';
  out.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth,
    bodyScrollWidth: document.body.scrollWidth, images: imgs, firstScreen: first.join(' '), wider: wide});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> Optional[str]:
    """The Chromium binary on PATH (Debian's `chromium`, or a Chrome), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: int = 120) -> str:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--hide-scrollbars", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--force-device-scale-factor=1"]
    done = subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def inspect(page: str, screenshot: str) -> dict:
    """Load `page` (an HTML file) at 1280 x 800; return the probe's measurements and save the first
    screen as the PNG `screenshot`. The probed copy sits beside the page so relative images resolve."""
    html = open(page, encoding="utf-8").read()
    probe = _PROBE % {"width": VIEWPORT[0], "height": VIEWPORT[1]}
    probed = os.path.join(os.path.dirname(os.path.abspath(page)), "_probe_" + os.path.basename(page))
    with open(probed, "w", encoding="utf-8") as f:
        f.write(html.replace("</body>", probe + "</body>", 1) if "</body>" in html else html + probe)
    url = "file://" + os.path.abspath(probed)
    dom = _run(["--virtual-time-budget=10000", "--dump-dom", url])
    found = re.search(r'<pre id="medclf-probe">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError(f"{page}: the probe did not run (no load event?); DOM starts {dom[:300]!r}")
    import html as html_lib

    result = json.loads(html_lib.unescape(found.group(1)))
    _run(["--virtual-time-budget=10000", f"--screenshot={os.path.abspath(screenshot)}",
          "file://" + os.path.abspath(page)])
    if not os.path.exists(screenshot):
        raise RuntimeError(f"chromium wrote no screenshot {screenshot}")
    os.remove(probed)
    return result
