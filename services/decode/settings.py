"""Settings of the decode service (``tandem decode``, ``TANDEM_DECODE_*``)."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from tandem.serving.settings import PodSettings


class DecodeSettings(PodSettings):
    """Run a decode pod."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_DECODE_")

    port: int = Field(50052, ge=0, le=65535)
    """gRPC port (0 picks a free one)."""
    kv_timeout_s: float = Field(60.0, gt=0)
    """How long an admitted request waits for its KV pages before it is failed and freed."""

    def cli_cmd(self) -> None:
        import asyncio

        from services.decode.server import serve

        asyncio.run(serve(self))
