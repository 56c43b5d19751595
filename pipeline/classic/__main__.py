"""python -m pipeline.classic NAME|all [--quick] [--out reports/classic]"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from pipeline.classic import MODULES
from pipeline.config import REPO_ROOT


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.classic", description=__doc__)
    parser.add_argument("name", choices=MODULES + ("all",))
    parser.add_argument("--quick", action="store_true", help="fewer epochs: every module in seconds")
    parser.add_argument("--out", default=str(REPO_ROOT / "reports" / "classic"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {}
    for name in MODULES if args.name == "all" else (args.name,):
        started = time.time()
        metrics = importlib.import_module(f"pipeline.classic.{name}").run(args.quick, out)
        results[name] = {**metrics, "seconds": round(time.time() - started, 1)}
        print(f"{name:<9} " + ", ".join(f"{k}={v}" for k, v in results[name].items()), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metrics{'_quick' if args.quick else ''}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
