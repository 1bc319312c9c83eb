"""Start the server as its own process, and a headless Chromium to look at the web chat.

Shared by the browser test (tests/test_server.py) and the README's screenshot
(scripts/make_figures.py), so both see the page exactly as a user does.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.lib.stages import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(stage: str, out_dir: Path, timeout: float = 240) -> Iterator[str]:
    """`python scripts/serve.py --stage STAGE --out_dir OUT_DIR` on a free port until the block ends;
    yields its base URL once /health answers. RuntimeError with the server's last output if it dies."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", "--stage", stage, "--out_dir", str(out_dir),
                             "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"the server did not answer /health in {timeout:.0f} s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def missing_chromium() -> str | None:
    """Why no headless browser can start here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not ((shutil.which("chromium") or shutil.which("chromium-browser")) and shutil.which("chromedriver")):
        return "no chromium + chromedriver (Debian: apt install chromium chromium-driver)"
    return None


def headless_chromium(width: int = 1000, height: int = 720):
    """A Selenium Chrome driver on the system's Chromium, headless (quit() it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    why = missing_chromium()
    if why:
        raise RuntimeError(why)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
