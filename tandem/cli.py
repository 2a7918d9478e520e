"""The ``tandem`` command line: one subcommand per role or tool.

Each subcommand is a pydantic model whose fields are its flags (and, for services,
``TANDEM_<SERVICE>_*`` environment variables), so the CLI and the settings never drift apart.
"""

import logging
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, CliApp, CliSubCommand, SettingsConfigDict

from services.decode.settings import DecodeSettings
from services.kvstore.settings import KVStoreSettings
from services.prefill.settings import PrefillSettings
from services.router.settings import RouterSettings
from tandem.local_cluster import UpOptions
from tandem.model_fetch import ModelFetchOptions
from tandem.model_gen import ModelGenOptions

DEFAULT_MODEL_DIR = Path(".tandem/models/tiny-llama")


def ensure_default_model(path: Path = DEFAULT_MODEL_DIR) -> Path:
    """The generated tiny model used when no --model is given (created on first use).

    Written to a temporary directory and renamed into place, so two ``tandem up`` started side
    by side never load a half-written directory.
    """
    if not (path / "config.json").is_file():
        import shutil
        import tempfile

        from tandem.model_gen import generate_model_dir

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            generate_model_dir(
                ModelGenOptions(arch="llama", out=staging, layers=4, hidden=128, intermediate=256)
            )
            staging.rename(path)
        except OSError:
            if not (path / "config.json").is_file():
                raise  # not another process's complete directory in the way: a real failure
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already if the rename won
    return path


class Generate(BaseModel):
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

    def cli_cmd(self) -> None:
        from tandem.engine import LLM, SamplingParams

        model = self.model
        if model is None:
            model = ensure_default_model()
            print(f"no --model given: using the generated tiny random model at {model}")
        llm = LLM(model, device=self.device)
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)
        for out in llm.generate(self.prompt, params):
            comp = out.outputs[0]
            print(f"prompt ({len(out.prompt_token_ids)} tokens): {out.prompt!r}")
            print(
                f"  -> {comp.text!r} [{len(comp.token_ids)} tokens, finish_reason={comp.finish_reason}]"
            )


class Tandem(BaseSettings):
    """Tandem: disaggregated prefill/decode LLM serving."""

    model_config = SettingsConfigDict(
        cli_prog_name="tandem",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        use_attribute_docstrings=True,
    )

    up: CliSubCommand[UpOptions]
    """Start the whole system locally: router, prefill and decode workers."""
    router: CliSubCommand[RouterSettings]
    """Run the router (OpenAI HTTP API and gRPC RouterService)."""
    prefill: CliSubCommand[PrefillSettings]
    """Run a prefill pod."""
    decode: CliSubCommand[DecodeSettings]
    """Run a decode pod."""
    kvstore: CliSubCommand[KVStoreSettings]
    """Run the kvstore service (prefix-cache index over Redis)."""
    model_gen: CliSubCommand[ModelGenOptions]
    """Write a tiny model directory with random weights (no downloads)."""
    model_fetch: CliSubCommand[ModelFetchOptions]
    """Copy a model directory from an http(s)/file URI (the Helm chart's init step)."""
    generate: CliSubCommand[Generate]
    """Offline generation with the engine."""

    def cli_cmd(self) -> None:
        CliApp.run_subcommand(self)


def main(argv: list[str] | None = None) -> None:
    from tandem.errors import TandemError

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        CliApp.run(Tandem, cli_args=sys.argv[1:] if argv is None else argv)
    except TandemError as e:  # a bad model directory, ...: one line, not a traceback
        print(f"tandem: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
