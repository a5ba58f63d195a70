"""A screenshot of `distill serve`'s page for a finished run: the server started on a free
port on 127.0.0.1 (with --teacher unless --student-only), a few turns said through the page in
headless Chromium, the page saved as a PNG and every turn's numbers printed (as the page shows
them: the tokens each turn read, the time to first token).

    python bench/page_screenshot.py runs/beethoven --out page.png
    python bench/page_screenshot.py runs/beethoven --turn "Who taught you?" --turn "And Haydn?"

Needs Debian's chromium and chromium-driver (`make test-browser` installs them). The run dir
is only read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from chat_page import READ_COLUMNS, say  # noqa: E402
from test_serve import start_server  # noqa: E402
from webdriver import headless_chromium  # noqa: E402

TURNS = ["What was it like to lose your hearing?", "And how did you keep composing after that?"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("page.png"))
    p.add_argument("--turn", action="append", help="what to say (repeatable; default: two questions to Beethoven)")
    p.add_argument("--seed", type=int, default=7, help="typed into the page's seed field (default: 7)")
    p.add_argument("--student-only", action="store_true", help="serve without --teacher")
    p.add_argument("--timeout", type=float, default=3600, help="seconds a turn may take in all columns (default: 3600)")
    args = p.parse_args()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="page-screenshot-") as work:
        work = Path(work)
        started = time.monotonic()
        server = start_server(args.run_dir.resolve(), work / "logs", *([] if args.student_only else ["--teacher"]),
                              env=env, timeout=600)
        print(f"server ready in {time.monotonic() - started:.1f} s at {server.url}/")
        try:
            with headless_chromium(work / "chromium", height=900) as browser:
                browser.open(f"{server.url}/")
                browser.wait_for("return document.querySelectorAll('.column').length", what="the page's columns")
                browser.type("#seed", str(args.seed))
                for text in args.turn or TURNS:
                    said = time.monotonic()
                    say(browser, text, timeout=args.timeout)
                    print(f"said {text!r}: answered in {time.monotonic() - said:.1f} s")
                for column in browser.run(READ_COLUMNS):
                    for n, turn in enumerate(column["turns"], start=1):
                        print(f"{column['model']} turn {n}: {turn['meta']}")
                browser.screenshot(args.out)
        finally:
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
