"""The live page in a real headless Chromium (Debian's chromium and chromium-driver): it shows the answer as it
streams, through a watch link, and after its connection is cut it reconnects and resumes with nothing lost or
shown twice."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import load_jsonl
from tests.producer.gateway.conftest import KEYS, GatewayStack
from tests.proxy import CuttableProxy
from worker import assemble

pytestmark = pytest.mark.redis

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = "Chromium and ChromeDriver are not installed (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("STREAMFOLD_REQUIRE_REDIS") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(0.05)


def test_the_live_page_streams_through_a_watch_link_and_resumes_after_a_cut(stack: GatewayStack, browser: object) -> None:
    from selenium.webdriver.common.by import By
    driver = browser
    acme = {"Authorization": f"Bearer {KEYS['acme']}"}
    body = {"model": "slow/alibaba_qwen3max_reasoning", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.Client(base_url=stack.keyed.url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=acme) as response:
            request_id = response.headers["x-request-id"]  # the caller leaves at once; the call goes on
        link = http.get(f"/v1/requests/{request_id}/link", headers=acme).json()["url"]
    port = int(stack.keyed.url.rsplit(":", 1)[1])
    proxy = CuttableProxy(("127.0.0.1", port))
    try:
        driver.get(f"http://127.0.0.1:{proxy.port}{link}")  # type: ignore[attr-defined]
        text = lambda element: driver.find_element(By.ID, element).text  # type: ignore[attr-defined]  # noqa: E731
        _wait(lambda: len(text("reasoning-text")) > 20)
        proxy.cut()  # mid-stream: the page sees its connection drop
        time.sleep(0.5)
        proxy.restore()
        _wait(lambda: driver.find_element(By.ID, "status").get_attribute("data-state") == "completed")  # type: ignore
        accepted_after_cut = proxy.accepted
    finally:
        proxy.close()
    expected = assemble(load_jsonl(Path(__file__).resolve().parents[3] / "fixtures" / "recorded"
                                   / "alibaba_qwen3max_reasoning.jsonl"))["completion"]["choices"][0]["message"]
    assert text("content") == expected["content"].strip()
    assert text("reasoning-text") == expected["reasoning_content"].strip()
    assert "tokens" in text("usage-text")
    assert accepted_after_cut >= 2  # the page and its first stream, then the stream again after the cut
