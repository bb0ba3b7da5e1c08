"""Template thumbnails: ``example_workflows/<name>.jpg`` for every ``example_workflows/<name>.json``.

ComfyUI's template browser shows ``<name>.jpg`` beside each custom-node template, and the template's
file name as its title and one-line description (the frontend offers custom templates nothing else),
so the names are sentences and the pictures are the workflows themselves: each is loaded in the real
UI (Chromium + Playwright, as the browser tests run it), queued, and photographed once it ran, with
the reports and the loss chart on its nodes.

    .venv/bin/python scripts/thumbnails.py            # all example workflows
    .venv/bin/python scripts/thumbnails.py NAME.json  # some

Needs what the browser tests need (``make test`` bootstraps it): Debian's chromium and Playwright.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from demo import tiny_checkpoint  # noqa: E402
from loralab_testkit import server  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SIZE = (640, 640)           # what is saved: the template cards are square
VIEWPORT = (1400, 1100)


def photograph(page, srv, path: str) -> bytes:
    with open(path) as fh:
        workflow = json.load(fh)
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.evaluate("() => app.queuePrompt(0)")
    page.wait_for_timeout(1000)
    srv.wait_idle(600)
    page.wait_for_timeout(1500)
    # a square around LoRA Lab's nodes (the cards are square), at full size; the rest is context
    clip = page.evaluate("""() => {
      const focus = app.graph.nodes.filter(n => n.type.startsWith('LoraLab') && n.type !== 'LoraLabLoraModelLoader');
      const title = LiteGraph.NODE_TITLE_HEIGHT;
      const x0 = Math.min(...focus.map(n => n.pos[0])), y0 = Math.min(...focus.map(n => n.pos[1] - title));
      const x1 = Math.max(...focus.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...focus.map(n => n.pos[1] + n.size[1]));
      const rect = app.canvas.canvas.getBoundingClientRect();
      const side = Math.max(x1 - x0, y1 - y0) + 60;
      const scale = Math.min(1.2, (Math.min(rect.width, rect.height) - 20) / side);
      const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
      app.canvas.deselectAll();
      app.canvas.ds.scale = scale;
      app.canvas.ds.offset = [rect.width / 2 / scale - cx, rect.height / 2 / scale - cy];
      app.canvas.setDirty(true, true);
      const s = side * scale;
      return {x: rect.left + rect.width / 2 - s / 2, y: rect.top + rect.height / 2 - s / 2, width: s, height: s};
    }""")
    page.wait_for_timeout(1500)
    return page.screenshot(type="png", clip=clip)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="*", help="example workflow files (default: all)")
    args = ap.parse_args(argv)

    paths = args.workflows or sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))
    with tempfile.TemporaryDirectory(prefix="loralab-thumbs-") as tmp:
        return photograph_all(paths, server.prepare_base(tmp, tiny_checkpoint()))


def photograph_all(paths: list[str], base: str) -> int:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    settings = os.path.join(base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(settings), exist_ok=True)
    with open(settings, "w") as fh:   # a returning user: no first-run dialog, no minimap, focus on the graph
        json.dump({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                   "Comfy.Graph.CanvasMenu": False,
                   "LiteGraph.Canvas.MinFontSizeForLOD": 0}, fh)   # full detail at any zoom
    with server.ComfyServer(base, threads=1) as srv, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]})
        page.goto(srv.url, wait_until="domcontentloaded")
        page.wait_for_function("() => window.app?.graph && app.extensions?.some(e => e.name === 'LoraLab.Report')",
                               timeout=90_000)
        page.evaluate("() => app.extensionManager.toggleFocusMode()")
        for path in paths:
            png = photograph(page, srv, path)
            out = os.path.splitext(path)[0] + ".jpg"
            img = Image.open(io.BytesIO(png)).convert("RGB")
            img.thumbnail(SIZE, Image.LANCZOS)
            img.save(out, "JPEG", quality=82, optimize=True)
            print(f"{os.path.relpath(out, ROOT)}: {img.size[0]}x{img.size[1]}, {os.path.getsize(out) // 1024} KB")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
