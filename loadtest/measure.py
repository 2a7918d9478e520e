"""Per-request measurements of a streamed generation, and their JSONL rows.

Definitions (as vLLM's benchmarks and ../shared/BENCHMARKS.md): TTFT is the time from sending
the request to the first chunk carrying generated content; ITL is each gap between consecutive
content chunks; TPOT is ``(E2E - TTFT) / (output_tokens - 1)``; E2E ends with the last byte.
"""

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field


class StreamError(Exception):
    """The server reported an error inside the stream, or the stream broke its protocol."""


def sse_payloads(lines: Iterable[str | bytes]) -> Iterator[dict]:
    """The JSON payloads of an OpenAI server-sent-event stream, up to ``data: [DONE]``.

    Raises:
        StreamError: an error payload, or the stream ended without ``[DONE]``.
    """
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if "error" in payload:
            err = payload["error"]
            raise StreamError(f"{err.get('type', 'error')}: {err.get('message', err)}")
        yield payload
    raise StreamError("the stream ended without data: [DONE]")


@dataclass
class RequestRecord:
    """One request's row in the JSONL output."""

    api: str
    workload: str
    request_id: str
    started_at: float = field(default_factory=time.time)
    ok: bool = False
    error: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)


class StreamTimer:
    """Timestamps of one streamed request: call ``content()`` for every chunk with new content."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []

    def content(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now

    def finish(self, record: RequestRecord, output_tokens: int) -> None:
        """Fill the record's timings (raises StreamError if nothing was generated)."""
        end = time.perf_counter()
        if self.first is None or output_tokens < 1:
            raise StreamError("no content was generated")
        record.e2e_s = end - self.start
        record.ttft_s = self.first - self.start
        record.itl_s = [round(g, 6) for g in self.gaps]
        record.tpot_s = (
            (record.e2e_s - record.ttft_s) / (output_tokens - 1) if output_tokens > 1 else 0.0
        )
        record.output_tokens = output_tokens


class JsonlWriter:
    """Appends one JSON object per line; safe to share between the users of one locust process."""

    def __init__(self, path: str | None) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        if self._file is not None:
            line = json.dumps(asdict(record))
            with self._lock:
                self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
