"""The README's figures, regenerated from a pipeline run (`python scripts/run_pipeline.py` first).

    python scripts/make_figures.py                      # reads training/, writes images/
    python scripts/make_figures.py --from /tmp/run --to images

Writes `course_curves.png` (every stage's headline curve in one figure), copies each stage's
curves from `<from>/plots/` as `stage_<name>.png`, and takes `web_chat.png`: the SFT model served
by scripts/serve.py, asked a question and a follow-up at temperature 0 in headless Chromium, the probability
colours on and one token's alternatives showing (skipped with a message where Chromium is missing;
`--no_web_chat` skips it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainer.lib.curves import plot_course

# A question and a follow-up in the demo's own style (the model was taught to carry the answer on).
QUESTIONS = ("What is 47 + 25?", "Now take away 6.")


def web_chat_screenshot(source: Path, png: Path) -> Path:
    """Chat with `source`'s SFT model in the web page and save what the browser shows."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from server.browser import headless_chromium, running_server

    with running_server("sft", source) as base:
        browser = headless_chromium(width=1000, height=620)
        try:
            browser.get(base + "/")
            wait = WebDriverWait(browser, 120)
            browser.execute_script("const t = document.getElementById('temperature'); t.value = 0;"
                                   "t.dispatchEvent(new Event('input'));")
            for n, question in enumerate(QUESTIONS, 1):
                browser.find_element(By.ID, "input").send_keys(question)
                browser.find_element(By.ID, "send").click()
                wait.until(lambda b, n=n: b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == str(n))
            browser.find_element(By.ID, "showprobs").click()
            # Hover the least certain token of the last reply: its alternatives pop up.
            tokens = browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1].find_elements(By.CSS_SELECTOR, ".tok")
            unsure = min(tokens, key=lambda t: float(t.get_attribute("data-p")))
            ActionChains(browser).move_to_element(unsure).perform()
            png.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(png))
        finally:
            browser.quit()
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", default="training", help="a pipeline's --out_dir (default: training)")
    p.add_argument("--to", default="images", help="where the figures go (default: images)")
    p.add_argument("--no_web_chat", action="store_true", help="skip the web chat screenshot (it starts a server)")
    args = p.parse_args(argv)
    source, target = Path(args.source), Path(args.to)
    if not (source / "report.json").is_file():
        p.error(f"{source} has no report.json: run python scripts/run_pipeline.py --out_dir {source} first")
    made = [plot_course(source, target / "course_curves.png")]
    for png in sorted((source / "plots").glob("*.png")):
        made.append(Path(shutil.copyfile(png, target / f"stage_{png.name}")))
    if not args.no_web_chat:
        from server.browser import missing_chromium

        why = missing_chromium() or (None if (source / "sft").is_dir() else f"{source} has no sft stage")
        if why:
            print(f"skipped web_chat.png: {why}")
        else:
            made.append(web_chat_screenshot(source, target / "web_chat.png"))
    for path in filter(None, made):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
