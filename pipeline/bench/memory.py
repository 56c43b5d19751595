"""Resident memory of the service's engine serving one variant, per numeric path.

Each path is measured in a fresh process (``python -m pipeline.bench.memory``), so one path's
freed-but-kept pages never count against another: the process builds the service's `Engine`
as `python -m service` does, answers held-out questions by copy decoding and one freely
(which loads the numeric path), and reports its `/proc/self/status` VmRSS and peak VmHWM.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def status_mb(pid: int | str = "self") -> dict:
    """A process's resident (VmRSS) and peak resident (VmHWM) memory, in MB (this process's by
    default); OSError where /proc cannot read it."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[name].split()[0]) / 1024, 1) for key, name in (("rss_mb", "VmRSS"),
                                                                                  ("peak_mb", "VmHWM"))}


def serve_and_measure(profile: str, numeric: str, variant: str, questions: list[str]) -> dict:
    """Answer ``questions`` by copy decoding, then the first freely, through the service's engine."""
    from pipeline.config import load_config
    from service.engine import Engine, GenerationSettings

    cfg = load_config(profile)
    engine = Engine(cfg.paths.resolve("artifacts"), None, cfg.retrieval, numeric=numeric)
    for question in questions:
        engine.answer(question, variant=variant)
    engine.answer(questions[0], variant=variant, settings=GenerationSettings(copy_decoding=False, max_new_tokens=40))
    measured = status_mb()
    engine.close()
    return {"numeric": numeric, "variant": variant, **measured}


def measure(profile: str, numeric: str, variant: str, questions: list[str]) -> dict:
    """``serve_and_measure`` in a fresh Python process."""
    command = [sys.executable, "-m", "pipeline.bench.memory", "--profile", profile, "--numeric", numeric,
               "--variant", variant, "--questions", *questions]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the memory probe for {numeric} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--numeric", default="fp32")
    parser.add_argument("--variant", default="sft")
    parser.add_argument("--questions", nargs="+", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(serve_and_measure(args.profile, args.numeric, args.variant, args.questions)))


if __name__ == "__main__":
    main()
