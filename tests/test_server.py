"""scripts/serve.py: the OpenAI-compatible server, started on 127.0.0.1 by the test and driven with
the official `openai` client (streamed and not, multi-turn, logprobs, max_tokens, stop, bad
requests, a client that leaves mid-stream), and the web chat page it serves."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from server.browser import headless_chromium, missing_chromium, running_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(plumb_pretrain, tmp_path_factory):
    """A server on the 8-step plumbing model posing as an sft checkpoint: (base_url, model_dir)."""
    out = tmp_path_factory.mktemp("serve")
    src, _ = plumb_pretrain
    shutil.copytree(src / "pretrain" / "checkpoint-8", out / "sft" / "checkpoint-8")
    with running_server("sft", out) as base:
        yield base, out / "sft" / "checkpoint-8"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


def ours_greedy(model_dir, messages, n: int) -> str:
    from trainer.lib.generation import generate
    from trainer.lib.metrics import load_model

    lm, tok = load_model(model_dir)
    return generate(lm, tok, [messages], n).texts[0]


def test_models_lists_the_stage(client):
    assert [m.id for m in client.models.list().data] == ["sft"]


def test_greedy_reply_equals_ours_streamed_or_not(client, server):
    reply = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=12)
    text = reply.choices[0].message.content
    assert text == ours_greedy(server[1], QUESTION, 12)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_multi_turn_and_sampling(client):
    messages = [*QUESTION, {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]
    a = client.chat.completions.create(model="sft", messages=messages, temperature=1.2, top_p=0.9, max_tokens=8, seed=1)
    b = client.chat.completions.create(model="sft", messages=messages, temperature=1.2, top_p=0.9, max_tokens=8, seed=1)
    assert a.choices[0].message.content == b.choices[0].message.content  # seeded sampling repeats


def test_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)  # greedy took the top token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob


def test_max_tokens_and_stop(client):
    short = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    full = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=12).choices[0].message.content
    if len(full) < 2:
        pytest.skip("the reply is too short to cut")
    stop = full[len(full) // 2:][:2]  # a string from the middle of the greedy reply
    cut = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(stop)]


@pytest.mark.parametrize("body, status, words", [
    ({"messages": [{"role": "user", "content": 5}]}, 422, "content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ({"messages": []}, 422, "messages"),
    ({"messages": QUESTION, "temperature": 5}, 422, "temperature"),
    ({"messages": QUESTION, "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": QUESTION, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": QUESTION, "logit_bias": {"99999": -100}}, 400, "logit_bias"),
])
def test_bad_requests_are_4xx_naming_the_field(server, body, status, words):
    res = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    assert res.status_code == status
    assert words in res.text


def test_a_client_that_leaves_mid_stream_frees_the_generation(server, client):
    base = server[0]
    health = lambda: httpx.get(f"{base}/health", timeout=10).json()
    from transformers import AutoTokenizer

    # <|im_end|> banned with logit_bias: unless the client's leaving stops it, this reply runs 1500 tokens.
    eos = AutoTokenizer.from_pretrained(server[1]).eos_token_id
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                      json={"messages": QUESTION, "stream": True, "temperature": 1.0, "max_tokens": 1500,
                            "logit_bias": {str(eos): -100}}) as res:
        assert res.status_code == 200
        lines = res.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))
        assert health()["active_generations"] == 1
    deadline = time.time() + 10
    while health()["active_generations"] and time.time() < deadline:
        time.sleep(0.1)
    first = health()
    time.sleep(1.0)
    assert first["active_generations"] == 0 and health()["tokens_generated"] == first["tokens_generated"]
    assert first["tokens_generated"] < 1000  # stopped long before max_tokens
    assert client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=3).choices


def test_logit_bias_bans_a_token(client, server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server[1])
    free = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True)
    top = free.choices[0].logprobs.content[0].token
    banned = tok.convert_tokens_to_ids(tok.tokenize(top))[0]
    biased = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=6,
                                            logprobs=True, logit_bias={str(banned): -100})
    assert biased.choices[0].logprobs.content[0].token != top


def test_web_chat_page_is_served(server):
    page = httpx.get(server[0] + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for needed in ("/v1/chat/completions", "stream: true", "top_logprobs", "regenerate", "edit", "temperature"):
        assert needed in page.text


def test_web_chat_in_a_headless_browser(server):
    """Type, send, watch the streamed reply; colour tokens by probability; regenerate; a second turn."""
    if missing_chromium():
        pytest.skip(missing_chromium())
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_chromium()
    wait = WebDriverWait(browser, 90)
    done = lambda n: wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-done") == str(n))
    try:
        browser.get(server[0] + "/")
        browser.find_element(By.ID, "input").send_keys("What is 2 + 3?")
        browser.find_element(By.ID, "send").click()
        done(1)
        msgs = browser.find_elements(By.CSS_SELECTOR, "#log .msg")
        assert [m.get_attribute("class") for m in msgs] == ["msg user", "msg assistant"]
        assert "What is 2 + 3?" in msgs[0].text
        tokens = msgs[1].find_elements(By.CSS_SELECTOR, ".tok")
        assert tokens and all(0.0 <= float(t.get_attribute("data-p")) <= 1.0 for t in tokens)

        browser.find_element(By.ID, "showprobs").click()  # the colours and hover alternatives switch on
        assert "probs" in browser.find_element(By.ID, "log").get_attribute("class")
        assert "p = " in tokens[0].find_element(By.CSS_SELECTOR, ".alts").get_attribute("textContent")

        msgs[1].find_element(By.TAG_NAME, "button").click()  # regenerate: the reply is replaced, not added
        done(2)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2
        browser.find_element(By.ID, "input").send_keys("And 4 + 4?")
        browser.find_element(By.ID, "send").click()
        done(3)
        assert [m.get_attribute("class") for m in browser.find_elements(By.CSS_SELECTOR, "#log .msg")] == [
            "msg user", "msg assistant", "msg user", "msg assistant"]
    finally:
        browser.quit()
