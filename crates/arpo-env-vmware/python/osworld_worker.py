"""OSWorld's own evaluator as a long-lived worker for arpo-env-vmware.

JSON lines over stdin/stdout, one request per line, one answer per line:

  {"id": 1, "op": "hello"}
      -> {"id": 1, "ok": true, "desktop_env": "1.0.2", "metrics": [...], "getters": [...],
          "setup_steps": [...]}
  {"id": 2, "op": "evaluate", "env": ENV, "evaluator": {...}, "last_action": "FAIL" | null}
      -> {"id": 2, "ok": true, "score": 0.5}
  {"id": 3, "op": "setup", "env": ENV, "step": {"type": ..., "parameters": {...}}}
      -> {"id": 3, "ok": true, "done": true}
  failures: {"id": n, "ok": false, "error": "...", "kind": "import" | "request" | "evaluator"}

ENV is what OSWorld's DesktopEnv hands its getters and SetupController: vm_ip, server_port,
chromium_port, vlc_port, cache_dir (this environment's own task cache), client_password,
screen_width, screen_height.

`evaluate` runs OSWorld's own DesktopEnv._set_evaluator_info and DesktopEnv.evaluate on an object
that carries those attributes (postconfig, infeasible, conj and the FileNotFoundError rule
included), so the score is OSWorld's. Everything the evaluators print goes to stderr, which the
Rust side forwards to its log; stdout carries only the answers.
"""

import json
import logging
import os
import sys
import traceback

# Answers go to the real stdout; anything else printed (OSWorld's metrics print) goes to stderr.
_answers = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr

logging.basicConfig(
    stream=sys.stderr,
    level=os.environ.get("ARPO_OSWORLD_LOG", "INFO"),
    format="%(levelname)s %(name)s: %(message)s",
)
log = logging.getLogger("osworld_worker")

_loaded = None


def load():
    """Imports desktop_env once (about 1.5 s)."""
    global _loaded
    if _loaded is None:
        import importlib.metadata

        from desktop_env.controllers.python import PythonController
        from desktop_env.controllers.setup import SetupController
        from desktop_env.desktop_env import DesktopEnv
        from desktop_env.evaluators import getters, metrics

        try:
            version = importlib.metadata.version("desktop-env")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        _loaded = {
            "PythonController": PythonController,
            "SetupController": SetupController,
            "DesktopEnv": DesktopEnv,
            "getters": getters,
            "metrics": metrics,
            "version": version,
        }
    return _loaded


class GuestEnv:
    """The attributes of OSWorld's DesktopEnv that getters, metrics and setup read."""

    def __init__(self, spec, last_action):
        mods = load()
        self.vm_ip = spec["vm_ip"]
        self.server_port = int(spec.get("server_port", 5000))
        self.chromium_port = int(spec.get("chromium_port", 9222))
        self.vlc_port = int(spec.get("vlc_port", 8080))
        self.cache_dir = spec["cache_dir"]
        self.cache_dir_base = spec.get("cache_dir_base", self.cache_dir)
        self.client_password = spec.get("client_password", "password")
        self.screen_width = int(spec.get("screen_width", 1920))
        self.screen_height = int(spec.get("screen_height", 1080))
        self.enable_proxy = False
        self.current_use_proxy = False
        self.is_environment_used = True
        self.action_history = [last_action] if last_action else []
        os.makedirs(self.cache_dir, exist_ok=True)
        self.controller = mods["PythonController"](vm_ip=self.vm_ip, server_port=self.server_port)
        self.setup_controller = mods["SetupController"](
            vm_ip=self.vm_ip,
            server_port=self.server_port,
            chromium_port=self.chromium_port,
            vlc_port=self.vlc_port,
            cache_dir=self.cache_dir,
            client_password=self.client_password,
            screen_width=self.screen_width,
            screen_height=self.screen_height,
        )

    @property
    def vm_platform(self):
        return self.controller.get_vm_platform()

    @property
    def vm_screen_size(self):
        return self.controller.get_vm_screen_size()


def hello(_request):
    mods = load()
    public = lambda m: sorted(n for n in dir(m) if not n.startswith("_") and callable(getattr(m, n)))
    steps = sorted(
        n[1 : -len("_setup")]
        for n in dir(mods["SetupController"])
        if n.startswith("_") and n.endswith("_setup") and not n.startswith("__")
    )
    return {
        "desktop_env": mods["version"],
        "metrics": public(mods["metrics"]),
        "getters": [n[len("get_") :] for n in public(mods["getters"]) if n.startswith("get_")],
        "setup_steps": steps,
    }


def evaluate(request):
    mods = load()
    env = GuestEnv(request["env"], request.get("last_action"))
    desktop_env = mods["DesktopEnv"]
    desktop_env._set_evaluator_info(env, {"evaluator": request["evaluator"]})
    score = desktop_env.evaluate(env)
    return {"score": float(score)}


def setup(request):
    env = GuestEnv(request["env"], None)
    done = env.setup_controller.setup([request["step"]], False)
    return {"done": bool(done) if done is not None else True}


OPS = {"hello": hello, "evaluate": evaluate, "setup": setup}


def answer(message):
    _answers.write(json.dumps(message) + "\n")
    _answers.flush()


def main():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError as e:
            answer({"id": None, "ok": False, "kind": "request", "error": f"not JSON: {e}"})
            continue
        rid = request.get("id")
        op = OPS.get(request.get("op"))
        if op is None:
            answer({"id": rid, "ok": False, "kind": "request", "error": f"unknown op {request.get('op')!r}"})
            continue
        try:
            result = op(request)
        except ImportError as e:
            log.error("import failed: %s", traceback.format_exc())
            answer({"id": rid, "ok": False, "kind": "import", "error": f"{type(e).__name__}: {e}"})
            continue
        except BaseException as e:  # an evaluator's failure must not end the worker
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            log.error("%s failed: %s", request.get("op"), traceback.format_exc())
            answer({"id": rid, "ok": False, "kind": "evaluator", "error": f"{type(e).__name__}: {e}"})
            continue
        result.update({"id": rid, "ok": True})
        answer(result)


if __name__ == "__main__":
    main()
