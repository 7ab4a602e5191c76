"""Writes src/osworld_names.json: the metric, getter and setup step names of the installed
desktop-env (OSWorld's evaluators), which `osworld-coverage` and the `auto` backend read.

    PYTHONPATH=tests/support/pystub ../../.venv-osworld/bin/python python/osworld_names.py

A worker test checks the committed file against the live worker's `hello`.
"""

import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import osworld_worker  # noqa: E402

names = osworld_worker.hello(None)
out = os.path.join(here, "..", "src", "osworld_names.json")
with open(out, "w", encoding="utf-8") as f:
    json.dump(names, f, indent=1, sort_keys=True)
    f.write("\n")
print(f"wrote {out}: {len(names['metrics'])} metrics, {len(names['getters'])} getters, "
      f"{len(names['setup_steps'])} setup steps", file=sys.stderr)
