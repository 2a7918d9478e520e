"""A CUDA MPS control daemon private to one benchmark run.

Processes sharing a GPU without MPS time-slice it: the GPU runs one process's kernels at a
time, so a prefill pod's long kernels and a decode pod's short steps wait on each other. Under
MPS the processes' kernels run side by side on the SMs. The daemon gets its own pipe and log
directories (``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``, exported so the workers
this process starts join it), and is told to quit on exit. It changes no setting of the card
(compute mode, clocks): processes that do not see the pipe directory never use it.

On Kubernetes the NVIDIA device plugin's MPS sharing gives pods the same (docs/kubernetes.md).
"""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


class MPSDaemon:
    def __init__(self) -> None:
        self.exe = shutil.which("nvidia-cuda-mps-control")
        self.dir: Path | None = None
        self._saved: dict[str, str | None] = {}

    def _env(self) -> dict[str, str]:
        assert self.dir is not None
        return {**os.environ, _ENV[0]: str(self.dir / "pipe"), _ENV[1]: str(self.dir / "log")}

    def __enter__(self) -> "MPSDaemon":
        if self.exe is None:
            raise SystemExit("--mps: nvidia-cuda-mps-control is not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-mps-"))
        (self.dir / "pipe").mkdir()
        (self.dir / "log").mkdir()
        env = self._env()
        try:
            subprocess.run([self.exe, "-d"], env=env, check=True, timeout=30)
        except (subprocess.SubprocessError, OSError) as exc:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise SystemExit(f"--mps: the MPS control daemon did not start: {exc}") from None
        for name in _ENV:
            self._saved[name] = os.environ.get(name)
            os.environ[name] = env[name]
        print(f"MPS control daemon started (pipe {env[_ENV[0]]})", flush=True)
        return self

    def log_tail(self, lines: int = 20) -> str:
        """The daemon's control and server logs' last lines (they say whether clients joined)."""
        assert self.dir is not None
        out = []
        for name in ("control.log", "server.log"):
            path = self.dir / "log" / name
            if path.exists():
                out.append(f"-- {name}")
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out)

    def __exit__(self, *exc) -> None:
        assert self.exe is not None and self.dir is not None
        env = self._env()
        subprocess.run([self.exe], input="quit\n", text=True, env=env, timeout=30, check=False)
        deadline = time.monotonic() + 10
        while (self.dir / "pipe" / "control").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        print(self.log_tail(), flush=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
