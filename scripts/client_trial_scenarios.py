"""The third-party client scenarios of ``scripts/client_trial.py``, run in the clients' venv.

Each scenario drives one client library (the official ``openai`` client, LangGraph/LangChain,
lm-eval, LiteLLM) against a running ``tandem up`` exactly as a user would, and either returns a
one-line summary or raises. The model has random weights, so texts are gibberish: a scenario
checks that the client runs end to end and that structured results parse and validate, never
what the text says. ``client_trial.py`` runs each one in its own process:

    CLIENTS_VENV/bin/python scripts/client_trial_scenarios.py SCENARIO --base-url URL \
        --model NAME --model-dir DIR --work-dir DIR

and reads the last line, ``TRIAL-RESULT {"ok": ..., "detail": ...}``. ``--list`` prints the
scenarios. The scenarios live in ``client_trial_openai.py`` and
``client_trial_frameworks.py``, what they share in ``client_trial_checks.py``; nothing here
imports Tandem: the clients' venv holds only the clients.
"""

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import client_trial_frameworks  # noqa: F401 - registers its scenarios
import client_trial_openai  # noqa: F401 - registers its scenarios
from client_trial_checks import SCENARIOS, Ctx

CLIENT_ORDER = ["openai", "httpx", "langgraph", "langchain", "lm-eval", "litellm"]
"""The order of the table: the official client first, then the others as the issue lists them."""


def describe_error(e: BaseException) -> str:
    """One line a reader can act on: the HTTP status and server message for API errors."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    if status is not None:
        message = body.get("message") if isinstance(body, dict) else str(e)
        param = body.get("param") if isinstance(body, dict) else None
        return f"HTTP {status}" + (f" (param {param})" if param else "") + f": {message}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="?")
    parser.add_argument("--list", action="store_true", help="print the scenarios as JSON")
    parser.add_argument("--base-url")
    parser.add_argument("--model")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args()
    if args.list:
        ordered = sorted(SCENARIOS.items(), key=lambda item: CLIENT_ORDER.index(item[1][0]))
        print(json.dumps({name: [client, what] for name, (client, what, _) in ordered}))
        return 0
    ctx = Ctx(args.base_url.rstrip("/"), args.model, args.model_dir, args.work_dir)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        detail, ok = SCENARIOS[args.scenario][2](ctx), True
    except Exception as e:  # noqa: BLE001 - the report names whatever the client raised
        traceback.print_exc()
        detail, ok = describe_error(e), False
    detail = detail if len(detail) <= 600 else detail[:600] + "..."
    print("TRIAL-RESULT " + json.dumps({"ok": ok, "detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
