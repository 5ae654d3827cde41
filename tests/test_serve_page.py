"""The web page of `tunesmith serve` in a real headless browser (Debian's chromium driven by playwright, offline): the
page loads the served models, a chat answer streams in piece by piece, and a blind side-by-side vote is recorded in
the judge's judgements.jsonl format. A screenshot is kept (its path is printed)."""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM and sync_playwright:
        return sync_playwright
    reason = "needs Debian's chromium (apt-get install chromium) and playwright (pip install playwright)"
    if os.environ.get("CI"):
        pytest.fail(f"browser test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.mark.slow
def test_page_chat_streams_and_a_blind_vote_is_recorded(tiny_model_dir, tmp_path):
    sync_playwright = _browser_or_skip()
    from test_serve import make_judge_model

    from tunesmith.data.templates import get_template, save_template
    from tunesmith.serve.engine import load_served
    from tunesmith.serve.run import Background, ServeConfig, build_server

    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    save_template(get_template("alpaca"), plain)
    judge = make_judge_model(tiny_model_dir, tmp_path / "talker")  # answers "tie.tie.…": visible streamed text
    prefs = tmp_path / "prefs"
    cfg = ServeConfig(model_name_or_path=[judge, str(plain)], served_model_name=["talker", "plain"],
                      preferences_dir=str(prefs))
    server = Background(build_server(cfg, served=[load_served(judge, "talker", dtype="float32"),
                                                  load_served(str(plain), "plain", dtype="float32")]))
    shots = Path(tempfile.mkdtemp(prefix="tunesmith-page-"))
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(prefix="tunesmith-chromium-"), executable_path=CHROMIUM, headless=True, args=FLAGS)
            try:
                page = context.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(server.url + "/")
                page.wait_for_function("document.querySelectorAll('#model option').length === 2")
                assert page.inner_text("#status") == "2 model(s) served"
                # chat: the answer streams in (the bubble changes many times), and equals the API's answer
                page.select_option("#model", "talker")
                page.fill("#max-tokens", "600")
                page.fill("#prompt", "what is the color of sky")
                page.click("#send")
                # part of the answer is on the page while the rest is still being generated
                partial = page.wait_for_function(
                    "(() => { const a = document.querySelector('.assistant');"
                    " return a && a.textContent.length > 0 && document.getElementById('send').disabled"
                    " && a.textContent.length; })()", polling=10).json_value()
                page.wait_for_function("!document.getElementById('send').disabled")
                answer = page.inner_text(".assistant")
                assert answer == "tie." * 600 and 0 < partial < len(answer)
                page.screenshot(path=str(shots / "chat.png"), full_page=True)
                # side by side: two models, a blind vote
                page.click("#mode-compare")
                page.select_option("#model-a", "talker")
                page.select_option("#model-b", "plain")
                page.fill("#cmp-max-tokens", "6")
                page.fill("#cmp-prompt", "name a color")
                page.click("#cmp-send")
                page.wait_for_function("!document.getElementById('vote-1').disabled")
                assert page.inner_text("#label-1") == "Answer 1"  # blind until the vote
                shown_first = page.inner_text("#answer-1")
                page.click("#vote-1")
                page.wait_for_function("document.getElementById('recorded').textContent.startsWith('recorded')")
                page.screenshot(path=str(shots / "compare.png"), full_page=True)
                first_model = page.inner_text("#label-1").split("— ")[1]
                assert errors == []
            finally:
                context.close()
    finally:
        server.stop()
    rows = [json.loads(line) for line in (prefs / "talker_vs_plain" / "judgements.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["verdict"] == "1" and row["instruction"] == "name a color"
    assert row["outcome"] == row["answer_1"] == ("A" if first_model == "talker" else "B")
    assert (row["output_a"] if row["answer_1"] == "A" else row["output_b"]).strip() == shown_first.strip()
    assert row["output_a"] == "tie." * 6
    print(f"\nscreenshots: {shots / 'chat.png'} {shots / 'compare.png'}")
