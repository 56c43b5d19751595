"""The real server: OpenAI-compatible routes over HTTP, the Gradio API through gradio_client,
and the UI in a real headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.slow  # loads the real all-MiniLM-L6-v2 embedder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_artifacts, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    work = tmp_path_factory.mktemp("server-work")
    command = [sys.executable, "-m", "service", "--no-build", "--port", str(port), "--profile", "tiny",
               "--feedback-db", str(work / "feedback.sqlite"), f"paths.artifacts={served_artifacts}",
               f"paths.docs={served_artifacts.parent / 'docs'}"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"server did not start:\n{log.read_text()}")
    yield url
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_no_build_names_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "service", "--no-build", "--profile", "tiny",
                             f"paths.artifacts={tmp_path}"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "missing artifacts: base, index" in result.stderr and "python -m pipeline run" in result.stderr


def test_models_route_lists_built_variants(server):
    body = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["base", "sft"]


def test_chat_completion_with_sources(server):
    body = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "sft", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Who proposed Adam?"}]}).json()
    assert body["object"] == "chat.completion" and body["model"] == "sft"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] > 0
    assert body["sources"][0]["doc_id"] == "adam.md" and body["sources"][0]["number"] == 1
    off = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "retrieval": False, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).json()
    assert off["sources"] == []


def test_chat_completion_streams_server_sent_events(server):
    events = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60, json={
            "stream": True, "max_tokens": 10,
            "messages": [{"role": "user", "content": "Tell me about dropout"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["sources"][0]["doc_id"] == "dropout.md"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert [c["choices"][0]["finish_reason"] for c in chunks].count(None) == len(chunks) - 1
    assert len(chunks) >= 4, "tokens must arrive in several chunks"


def test_finish_reason_says_length_when_the_cap_was_reached(server):
    body = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "max_tokens": 3, "messages": [{"role": "user", "content": "Tell me about dropout"}]}).json()
    usage, choice = body["usage"], body["choices"][0]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] >= 3 else "stop")


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100_000}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "x" * 9000}] * 2}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}] * 65}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages.0.content"),
])
def test_invalid_fields_get_an_openai_shaped_400_naming_the_field(server, body, param):
    request = {"messages": [{"role": "user", "content": "hi"}], **body}
    response = httpx.post(f"{server}/v1/chat/completions", timeout=60, json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error
    assert param.split(".")[0] in error["message"]


def test_malformed_json_and_content_parts(server):
    broken = httpx.post(f"{server}/v1/chat/completions", content=b'{"messages": [', timeout=30,
                        headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    parts = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", "text": "Who proposed "},
                                                                    {"type": "text", "text": "Adam?"}]}]})
    assert parts.status_code == 200 and parts.json()["sources"][0]["doc_id"] == "adam.md"
    assert httpx.get(f"{server}/v1/models").status_code == 200


def test_bad_requests_get_clear_errors_and_the_server_survives(server):
    too_long = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "x" * 5000}]})
    assert too_long.status_code == 400 and "limit is 4000" in too_long.json()["error"]["message"]
    unknown = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 400 and "unknown variant" in unknown.json()["error"]["message"]
    assert httpx.post(f"{server}/v1/chat/completions", json={"messages": []}).status_code == 400
    assert httpx.get(f"{server}/v1/models").status_code == 200


def test_concurrent_requests_queue_and_all_complete(server):
    from concurrent.futures import ThreadPoolExecutor

    def ask(i):
        return httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "max_tokens": 6, "messages": [{"role": "user", "content": f"What is dropout? ({i})"}]})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(ask, range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in responses)


def test_remote_backend_streams_from_an_openai_compatible_server(server, served_artifacts):
    from pipeline.errors import UserError
    from service.engine import Engine, GenerationSettings

    remote = Engine(served_artifacts, remote_url=server, remote_model="sft")  # our own /v1 as the remote
    assert remote.variants() == ["remote"]
    replies = list(remote.stream("Who proposed Adam?", settings=GenerationSettings(max_new_tokens=10)))
    texts = [r.text for r in replies]
    assert len(replies) >= 3 and texts[-1] and all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert replies[-1].passages[0].doc_id == "adam.md"  # retrieval stays local
    dead = Engine(served_artifacts, remote_url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match="remote server http://127.0.0.1:.* failed"):
        dead.answer("Who proposed Adam?")


def test_gradio_api_through_gradio_client(server):
    from gradio_client import Client

    client = Client(server + "/", verbose=False)
    chat, sources, cleared = client.predict(  # gr.State inputs and outputs are not part of the API
        "Who proposed Adam?", [], "base", True, 0.0, 0.9, 16, 1.1, api_name="/chat")
    question = chat[-2]["content"]
    question = question if isinstance(question, str) else question[0]["text"]
    assert question == "Who proposed Adam?" and chat[-1]["role"] == "assistant"
    assert "[1] Adam" in sources and "adam.md" in sources and cleared == ""


def test_upload_through_the_ui_api_is_searchable(server, tmp_path):
    from gradio_client import Client, handle_file

    note = tmp_path / "lion notes.md"
    note.write_text("# Lion\n\nThe Lion optimizer was found by program search in 2023 and tracks only momentum.\n")
    client = Client(server + "/", verbose=False)
    listing, status = client.predict([handle_file(str(note))], api_name="/upload")
    assert "lion_notes.md" in listing and "added" in status
    body = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "max_tokens": 4, "messages": [{"role": "user", "content": "What did program search find in 2023?"}]}).json()
    assert body["sources"][0]["doc_id"] == "uploads/lion_notes.md"
    listing, status = client.predict("lion_notes.md", api_name="/remove_document")
    assert "removed" in status and "lion_notes.md" not in listing


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.browser
def test_chat_in_a_real_browser(server, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run installs it with apt-get")
        pytest.skip("Debian's chromium is not installed (make browser installs it)")
    from playwright.sync_api import sync_playwright

    screenshots = REPO_ROOT / "test-results"
    screenshots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server + "/", wait_until="load", timeout=60_000)
        page.locator("#message textarea").wait_for(timeout=60_000)
        page.locator("#message textarea").fill("Who proposed Adam?")
        page.locator("#send").click()
        page.locator("#chatbot").get_by_text("Who proposed Adam?").wait_for(timeout=60_000)
        page.locator("#sources").get_by_text("adam.md").first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        bubbles = page.locator("#chatbot .message").count()
        page.screenshot(path=str(screenshots / "chat.png"), full_page=True)
        browser.close()
    assert bubbles >= 2, "the question and the streamed answer must both show"
    assert (screenshots / "chat.png").stat().st_size > 10_000


def test_loadtest_quick_run_survives_load_and_faults(served_artifacts, tmp_path):
    """`python -m service.loadtest --quick` on a copy of the tiny artifacts: concurrent clients,
    a burst past the queue bound, dropped streams, fuzzing, answers during an upload, and both kills."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(served_artifacts, artifacts)
    docs = served_artifacts.parent / "docs"
    result = subprocess.run(
        [sys.executable, "-m", "service.loadtest", "--quick", "--out", str(tmp_path / "reports"), "--max-tokens", "6",
         "--", "--no-build", "--profile", "tiny", f"paths.artifacts={artifacts}", f"paths.docs={docs}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "reports" / "reliability.json").read_text())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["concurrent_clients"]["errors"] == 0 and report["concurrent_clients"]["requests"] == 8
    assert report["burst"]["rate_limited"] > 0 and report["burst"]["errors"] == 0, report["burst"]
    assert report["fuzz"]["server_errors"] == 0 and report["fuzz"]["client_errors"] > 0
    assert report["answers_during_upload"]["ok"] and report["answers_during_upload"]["answers_during"] > 0, \
        report["answers_during_upload"]
    assert report["kill_during_rebuild"]["ok"] and report["kill_stage"]["previous_artifact_intact"]
    assert 0 < report["rss_mb"] <= report["peak_rss_mb"], report
    assert "| server memory after the load (VmRSS)" in (tmp_path / "reports" / "reliability.md").read_text()


def test_auth_covers_the_api_and_the_ui(served_artifacts, tmp_path):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", ALIGNRAG_AUTH="ada:s3cret")
    command = [sys.executable, "-m", "service", "--no-build", "--port", str(port), "--profile", "tiny",
               "--feedback-db", str(tmp_path / "f.sqlite"), f"paths.artifacts={served_artifacts}",
               f"paths.docs={served_artifacts.parent / 'docs'}"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code in (200, 401):
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        anonymous = httpx.get(f"{url}/v1/models", timeout=10)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
        wrong = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer nope"}, timeout=10,
                           json={"messages": [{"role": "user", "content": "hi"}]})
        assert wrong.status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer s3cret"}, timeout=10).status_code == 200
        assert httpx.get(f"{url}/config", timeout=10).status_code == 401  # the Gradio app wants its login
    finally:
        process.terminate()
        process.wait(timeout=15)
