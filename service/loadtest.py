"""``python -m service.loadtest``: a bounded load and fault check against the real server.

Starts ``python -m service`` on 127.0.0.1 (a free port; no other address is ever contacted),
then, each phase bounded in requests and time:

1. ``clients`` concurrent chat clients, ``requests`` each (JSON and streamed);
2. a burst past the queue bound: the excess must get 429 with Retry-After, not errors;
3. clients that drop a stream after its first chunk: the next answer's latency is compared
   with an undisturbed one;
4. a fuzz pass over the request schema: every malformed request gets a 4xx, the server stays up;
   then chat answers while a large upload is indexed: they must not wait for the whole rebuild;
5. SIGKILL during an index rebuild (an upload), then a restart: the index loads and serves;
6. a pipeline stage killed mid-run: the previous artifact is intact and the rerun completes.

Writes reports/reliability.md (and .json). ``--quick`` shrinks every phase for `make test`.
    python -m service.loadtest [--quick] [--out reports] -- [server arguments ...]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from pipeline.config import REPO_ROOT

QUESTIONS = ["Who proposed Adam?", "What does dropout do?", "What is the KL penalty for?",
             "How does BM25 rank documents?", "What does LoRA train?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One `python -m service` process on 127.0.0.1, with its peak resident memory."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log, self.port = args, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 180) -> None:
        command = [sys.executable, "-m", "service", "--port", str(self.port), *self.args]
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"server did not start in {timeout:.0f} s")

    def memory_mb(self) -> dict:
        """The server's resident (VmRSS) and peak resident (VmHWM) memory now, in MB (NaN
        where /proc cannot be read)."""
        from pipeline.bench.memory import status_mb

        try:
            measured = status_mb(self.process.pid)
        except (OSError, KeyError):
            return {"rss_mb": float("nan"), "peak_rss_mb": float("nan")}
        return {"rss_mb": measured["rss_mb"], "peak_rss_mb": measured["peak_mb"]}

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def ask(url: str, question: str, max_tokens: int, stream: bool = False) -> tuple[int, float]:
    """(status, seconds) of one chat request; status 0 for a transport error."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": stream}
    started = time.perf_counter()
    try:
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
                for _ in response.iter_lines():
                    pass
                status = response.status_code
        else:
            status = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - started


def concurrent_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    jobs = [(QUESTIONS[i % len(QUESTIONS)], i % 2 == 1) for i in range(clients * requests)]
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda job: ask(url, job[0], max_tokens, job[1]), jobs))
    seconds = sorted(s for _, s in results)
    return {"requests": len(results), "errors": sum(status != 200 for status, _ in results),
            "p50_s": round(statistics.median(seconds), 2),
            "p95_s": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 2)}


def burst(url: str, size: int, max_tokens: int) -> dict:
    with ThreadPoolExecutor(size) as pool:
        statuses = [s for s, _ in pool.map(lambda i: ask(url, QUESTIONS[i % 5], max_tokens), range(size))]
    return {"requests": size, "ok": statuses.count(200), "rate_limited": statuses.count(429),
            "errors": sum(s not in (200, 429) for s in statuses)}


def dropped_streams(url: str, drops: int, long_tokens: int, probe_tokens: int) -> dict:
    before = [ask(url, "What does dropout do?", probe_tokens)[1] for _ in range(2)]
    body = {"messages": [{"role": "user", "content": "Tell me everything about PPO."}],
            "max_tokens": long_tokens, "stream": True}
    for _ in range(drops):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
            next(response.iter_lines())  # read the first chunk, then hang up
    after = [ask(url, "What does dropout do?", probe_tokens)[1] for _ in range(2)]
    return {"dropped": drops, "asked_tokens": long_tokens, "probe_before_s": round(min(before), 2),
            "probe_after_s": round(min(after), 2),
            "ok": min(after) < 2 * min(before) + 1.0}  # a still-running stream would cost seconds


def fuzz(url: str, cases: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    values = [None, -1, 0, 10**9, 1.5, "x", "", [], {}, [1, 2], {"a": 1}, True, "💥" * 3]
    fields = ["model", "messages", "stream", "temperature", "top_p", "max_tokens", "retrieval"]
    statuses = []
    for i in range(cases):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(values)
        if i % 7 == 0:
            raw, headers = b'{"messages": [{"role": "us', {"content-type": "application/json"}
            statuses.append(httpx.post(f"{url}/v1/chat/completions", content=raw, headers=headers, timeout=120).status_code)
            continue
        statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).status_code)
    alive = httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
    return {"requests": cases, "server_errors": sum(s >= 500 for s in statuses),
            "client_errors": sum(400 <= s < 500 for s in statuses), "ok": statuses.count(200),
            "alive_after": alive}


def answers_during_upload(url: str, work: Path, probe_tokens: int) -> dict:
    """Chat answers while a large upload (about 130 chunks) is indexed. Its embedding batches
    are model calls the chat's take turns with (service/library.py), so an answer must not
    wait for the whole rebuild: the slowest must take under half the upload's time."""
    from gradio_client import Client, handle_file

    before = min(ask(url, "What does dropout do?", probe_tokens)[1] for _ in range(2))
    note = work / "large-upload.md"
    note.write_text("# Large upload\n\n" + "\n\n".join(
        f"## Part {p}\n\n" + " ".join(f"Sentence {i} of part {p} is about indexing while chatting." for i in range(40))
        for p in range(40)))
    client = Client(url + "/", verbose=False)
    started = time.perf_counter()
    job = client.submit([handle_file(str(note))], api_name="/upload")
    during = []
    while not job.done():
        during.append(ask(url, "What does dropout do?", probe_tokens))
    upload_s = time.perf_counter() - started
    listing, status = job.result()
    Client(url + "/", verbose=False).predict(note.name, api_name="/remove_document")
    slowest = max((s for _, s in during), default=0.0)
    return {"upload_s": round(upload_s, 2), "upload_status": status, "probe_before_s": round(before, 2),
            "answers_during": len(during), "slowest_during_s": round(slowest, 2),
            "errors": sum(code != 200 for code, _ in during),
            "ok": note.name in listing and bool(during) and slowest < upload_s / 2
            and all(code == 200 for code, _ in during)}


def kill_during_rebuild(server: Server, work: Path) -> dict:
    """Upload a document (its index rebuild takes seconds), SIGKILL the server mid-rebuild,
    restart it: it must serve, from an index that loads."""
    from gradio_client import Client, handle_file

    note = work / "killed-upload.md"
    note.write_text("# Killed\n\n" + " ".join(f"Sentence {i} about rebuild safety." for i in range(400)))
    client = Client(server.url + "/", verbose=False)
    job = client.submit([handle_file(str(note))], api_name="/upload")
    time.sleep(1.0)
    server.kill()
    del job
    server.start()
    status, _ = ask(server.url, "Who proposed Adam?", 4)
    body = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "max_tokens": 4, "messages": [{"role": "user", "content": "Who proposed Adam?"}]}).json()
    listing, _ = Client(server.url + "/", verbose=False).predict(note.name, api_name="/remove_document")
    return {"restarted": True, "status_after": status, "sources_after": len(body.get("sources", [])),
            "upload_survived_and_removed": note.name not in listing,
            "ok": status == 200 and len(body.get("sources", [])) > 0}


def kill_stage_mid_run(pipeline_args: list[str], artifacts: Path) -> dict:
    """Start a forced rebuild of the `index` stage, SIGKILL it, check the old artifact, rerun."""
    meta = artifacts / "index" / "meta.json"
    before = meta.read_text() if meta.exists() else None
    command = [sys.executable, "-m", "pipeline", "run", "--only", "index", "--force", *pipeline_args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    intact = before is not None and meta.exists() and meta.read_text() == before
    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    return {"killed_after_s": 4.0, "previous_artifact_intact": intact, "rerun_exit_code": rerun.returncode,
            "ok": intact and rerun.returncode == 0}


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(results, indent=2))
    load, spike = results["concurrent_clients"], results["burst"]
    lines = ["# Reliability: load and faults against the real server", "",
             f"Made by `{results['command']}` on {results['cpu']}; server on 127.0.0.1 only.", "",
             "| check | outcome |", "|---|---|",
             f"| {load['requests']} requests from {results['clients']} concurrent clients | {load['errors']} errors, "
             f"p50 {load['p50_s']} s, p95 {load['p95_s']} s |",
             f"| burst of {spike['requests']} past a queue bound of {results['max_waiting']} | {spike['ok']} answered, "
             f"{spike['rate_limited']} got 429, {spike['errors']} errors |"]
    drop = results["dropped_streams"]
    lines.append(f"| {drop['dropped']} streams of {drop['asked_tokens']} tokens dropped after one chunk | "
                 f"next answer {drop['probe_after_s']} s (undisturbed {drop['probe_before_s']} s): "
                 f"{'ok' if drop['ok'] else 'SLOWER'} |")
    fz = results["fuzz"]
    lines.append(f"| fuzz: {fz['requests']} malformed requests | {fz['client_errors']} 4xx, {fz['ok']} 200, "
                 f"{fz['server_errors']} 5xx; server {'up' if fz['alive_after'] else 'DOWN'} |")
    during = results["answers_during_upload"]
    lines.append(f"| {during['answers_during']} answers while a {during['upload_s']} s upload was indexed | "
                 f"slowest {during['slowest_during_s']} s (undisturbed {during['probe_before_s']} s), "
                 f"{during['errors']} errors: {'ok' if during['ok'] else 'WAITED'} |")
    for key, label in (("kill_during_rebuild", "SIGKILL during an index rebuild, restart"),
                       ("kill_stage", "pipeline stage SIGKILLed mid-run, rerun")):
        if key in results:
            lines.append(f"| {label} | {'ok' if results[key]['ok'] else 'FAILED'}: {json.dumps(results[key])} |")
    lines += [f"| server memory after the load (VmRSS) | {results['rss_mb']} MB |",
              f"| peak server memory (VmHWM) | {results['peak_rss_mb']} MB |", ""]
    (out / "reliability.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small phases (the test suite's run)")
    parser.add_argument("--out", default=str(REPO_ROOT / "reports"))
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--no-faults", action="store_true", help="skip the kill-and-restart phases")
    parser.add_argument("server_args", nargs="*", help="passed to python -m service (after --)")
    args = parser.parse_args(argv)
    clients, requests = (4, 2) if args.quick else (20, 3)
    max_waiting, burst_size = clients, 3 * clients  # the clients all fit the queue; the burst does not
    from pipeline.cpu import describe

    work = Path(tempfile.mkdtemp(prefix="alignrag-loadtest-"))
    server_args = [*args.server_args, "--max-waiting", str(max_waiting), "--queue-timeout", "300",
                   "--feedback-db", str(work / "feedback.sqlite")]
    server = Server(server_args, work / "server.log")
    results = {"command": "python -m service.loadtest " + " ".join(argv if argv is not None else sys.argv[1:]),
               "cpu": describe(), "clients": clients, "max_waiting": max_waiting}
    try:
        server.start()
        results["concurrent_clients"] = concurrent_clients(server.url, clients, requests, args.max_tokens)
        results["burst"] = burst(server.url, burst_size, args.max_tokens)
        results["dropped_streams"] = dropped_streams(server.url, 2 if args.quick else 5, 400, 8)
        results["fuzz"] = fuzz(server.url, 30 if args.quick else 200)
        results["answers_during_upload"] = answers_during_upload(server.url, work, 8)
        results.update(server.memory_mb())  # before the kill phases restart it
        if not args.no_faults:
            results["kill_during_rebuild"] = kill_during_rebuild(server, work)
            overrides = [a for a in args.server_args if "=" in a and not a.startswith("-")]
            profile = args.server_args[args.server_args.index("--profile") + 1] if "--profile" in args.server_args else "quick"
            from pipeline.config import load_config

            artifacts = load_config(profile, overrides).paths.resolve("artifacts")
            results["kill_stage"] = kill_stage_mid_run(["--profile", profile, *overrides], artifacts)
    finally:
        server.stop()
    write_report(results, Path(args.out))
    print((Path(args.out) / "reliability.md").read_text())
    failed = (results["concurrent_clients"]["errors"] or results["burst"]["errors"] or not results["dropped_streams"]["ok"]
              or results["fuzz"]["server_errors"] or not results["fuzz"]["alive_after"]
              or not results["answers_during_upload"]["ok"]
              or any(not results[k]["ok"] for k in ("kill_during_rebuild", "kill_stage") if k in results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
