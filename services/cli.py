"""The ``tandem`` command line: one subcommand per role or tool, and the one place each is run.

A subcommand's flags are the fields of its settings model (and, for the services,
``TANDEM_<SERVICE>_*`` environment variables), so the CLI and the settings never drift apart.
The settings modules define only settings; what each subcommand starts is named here.

``tandem <command> ...`` imports only that command's settings: the router and kvstore parse
their flags without importing the engine (and torch) that the pods' settings carry.
``tandem --help`` loads every command to list them.
"""

import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_settings import (
    BaseSettings,
    CliApp,
    CliSettingsSource,
    CliSubCommand,
    SettingsConfigDict,
)

from tandem.api.errors import TandemError

_CLI = dict(cli_kebab_case=True, cli_implicit_flags=True)


class GenerateOptions(BaseModel):
    """Generate completions offline with one in-process engine (a quick demo of the engine)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    model: Path | None = None
    """Model directory; default: a generated tiny random model (its text is gibberish)."""
    prompt: list[str] = Field(
        default_factory=lambda: ["The prefill pod computes the prompt's KV cache"]
    )
    """Prompt(s) to complete."""
    max_tokens: int = Field(32, gt=0)
    """Tokens to generate per prompt."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    device: str = "cpu"
    """torch device."""


# ---- what each command runs -------------------------------------------------------------------


def _up(options) -> None:
    from services.local_cluster import run

    sys.exit(run(options))


def _router(settings) -> None:
    from services.router.server import serve

    serve(settings)


def _prefill(settings) -> None:
    from services.prefill.server import serve

    asyncio.run(serve(settings))


def _decode(settings) -> None:
    from services.decode.server import serve

    asyncio.run(serve(settings))


def _kvstore(settings) -> None:
    from services.kvstore.server import serve

    asyncio.run(serve(settings))


def _model_gen(options) -> None:
    from tandem.model_gen import generate_model_dir

    path = generate_model_dir(options)
    print(f"wrote a tiny {options.arch} model to {path}")


def _model_fetch(options) -> None:
    from tandem.model_fetch import fetch_model

    fetch_model(options)


def _generate(options: GenerateOptions) -> None:
    from tandem.engine import LLM, SamplingParams
    from tandem.model_gen import ensure_default_model

    model = options.model
    if model is None:
        model = ensure_default_model()
        print(f"no --model given: using the generated tiny random model at {model}")
    llm = LLM(model, device=options.device)
    params = SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature)
    for out in llm.generate(options.prompt, params):
        comp = out.outputs[0]
        print(f"prompt ({len(out.prompt_token_ids)} tokens): {out.prompt!r}")
        print(
            f"  -> {comp.text!r} [{len(comp.token_ids)} tokens, finish_reason={comp.finish_reason}]"
        )


# ---- where each command's settings live (imported only when that command runs) ----------------


def _up_options():
    from services.local_cluster import UpOptions

    return UpOptions


def _router_settings():
    from services.router.settings import RouterSettings

    return RouterSettings


def _prefill_settings():
    from services.prefill.settings import PrefillSettings

    return PrefillSettings


def _decode_settings():
    from services.decode.settings import DecodeSettings

    return DecodeSettings


def _kvstore_settings():
    from services.kvstore.settings import KVStoreSettings

    return KVStoreSettings


def _model_gen_options():
    from tandem.model_gen import ModelGenOptions

    return ModelGenOptions


def _model_fetch_options():
    from tandem.model_fetch import ModelFetchOptions

    return ModelFetchOptions


@dataclass(frozen=True, slots=True)
class Command:
    """One ``tandem`` subcommand: its help line, its settings model and what it runs."""

    help: str
    settings: Callable[[], type[BaseModel]]
    run: Callable[[Any], None]

    def model(self) -> type[BaseModel]:
        """The settings model with this command as its ``cli_cmd`` (what ``CliApp`` runs)."""
        settings = self.settings()
        run = self.run
        return type(
            settings.__name__,
            (settings,),
            {"__doc__": settings.__doc__, "__module__": __name__, "cli_cmd": lambda s: run(s)},
        )


COMMANDS: dict[str, Command] = {
    "up": Command(
        "Start the whole system locally: router, prefill and decode workers.", _up_options, _up
    ),
    "router": Command(
        "Run the router (OpenAI HTTP API and gRPC RouterService).", _router_settings, _router
    ),
    "prefill": Command("Run a prefill pod.", _prefill_settings, _prefill),
    "decode": Command("Run a decode pod.", _decode_settings, _decode),
    "kvstore": Command(
        "Run the kvstore service (prefix-cache index over Redis).", _kvstore_settings, _kvstore
    ),
    "model-gen": Command(
        "Write a tiny model directory with random weights (no downloads).",
        _model_gen_options,
        _model_gen,
    ),
    "model-fetch": Command(
        "Copy a model directory from an http(s)/file URI (the Helm chart's init step).",
        _model_fetch_options,
        _model_fetch,
    ),
    "generate": Command("Offline generation with the engine.", lambda: GenerateOptions, _generate),
}


def every_command() -> type[BaseSettings]:
    """The root model listing every subcommand (``tandem --help``, or an unknown command)."""
    fields = {
        name.replace("-", "_"): (CliSubCommand[cmd.model()], Field(description=cmd.help))
        for name, cmd in COMMANDS.items()
    }
    root = create_model(
        "Tandem",
        __base__=BaseSettings,
        __doc__="Tandem: disaggregated prefill/decode LLM serving.",
        **fields,
    )
    root.model_config.update(SettingsConfigDict(cli_prog_name="tandem", **_CLI))
    root.cli_cmd = lambda self: CliApp.run_subcommand(self)
    return root


def parse(args: list[str]) -> tuple[Command, BaseModel]:
    """The command ``args`` names and its settings, read exactly as ``tandem`` reads them (flags,
    then ``TANDEM_<SERVICE>_*`` variables); nothing runs. The chart's tests and the benchmarks
    parse workers' flags with it too.

    Raises:
        KeyError: no such command. SystemExit: bad flags (the message says which).
    """
    command = COMMANDS[args[0]]
    parsed: list[BaseModel] = []
    model = dataclasses.replace(command, run=parsed.append).model()
    source = CliSettingsSource(model, cli_prog_name=f"tandem {args[0]}", **_CLI)
    CliApp.run(model, cli_args=args[1:], cli_settings_source=source)
    return command, parsed[0]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args and args[0] in COMMANDS:
            command, settings = parse(args)
            command.run(settings)
        else:
            CliApp.run(every_command(), cli_args=args)
    except TandemError as e:  # a bad model directory, ...: one line, not a traceback
        print(f"tandem: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
