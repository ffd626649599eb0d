"""The `accelerate launch` command line the multi-process tests run ppomax under."""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int = 2, mode: str | list[str] = "--multi_gpu") -> list[str]:
    """CPU processes (gloo) on a fresh rendezvous port: back-to-back launches on the default port 29500 can meet
    the previous run's socket still closing. ``mode="--cpu"`` is the form that starts only one process (without
    mpirun), which ppomax warns about. A list is several arguments (``["--config_file", path]``)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
        str(accelerate),
        "launch",
        *([mode] if isinstance(mode, str) else mode),
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ppomax.cli",
    ]
