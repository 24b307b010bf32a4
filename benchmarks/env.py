"""Where a benchmark runs: the device, its name, versions, the git commit and the CPU.

Shared by every benchmark script and by gpu_report.py; torch is imported only inside the
functions that need it (gpu_report reads the environment before it knows torch works).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def git_commit() -> str:
    """The short commit of the repository, "-dirty" with uncommitted changes to tracked files,
    or "unknown" where there is no git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(package: str) -> Optional[str]:
    """The installed version of ``package``, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def slug(text: str) -> str:
    """``text`` as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def pick_device(name: Optional[str]):
    """``--device``: cuda or cpu, default cuda when available; exits where cuda is asked for
    but absent."""
    import torch

    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to this PyTorch")
    return device


def device_name(device) -> str:
    """The GPU's name, or "CPU <model name>"."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()}"


# The GPUs the issues' performance targets are set for; elsewhere they are shown for
# information only.
TARGET_GPUS = ("H100", "H200")


def targets_apply(device_name: Optional[str]) -> bool:
    """Whether the issues' targets hold on the GPU named ``device_name`` (None: the CPU)."""
    return bool(device_name) and any(gpu in device_name for gpu in TARGET_GPUS)


def run_info(device) -> dict:
    """The fields every benchmark report starts with, in this order: date, git_commit, device,
    device_type, torch, triton, cuda, cudnn, python, cpu."""
    import torch

    return {
        "date": now(), "git_commit": git_commit(), "device": device_name(device),
        "device_type": device.type, "torch": torch.__version__,
        "triton": package_version("triton"), "cuda": torch.version.cuda,
        "cudnn": (torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                  else None),
        "python": platform.python_version(), "cpu": cpu_name(),
    }


@contextlib.contextmanager
def cpu_threads(device, threads: int):
    """On the CPU, torch runs ``threads`` threads inside; the previous count is restored."""
    import torch

    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_model_arguments(parser, argv):
    """The command line of the per-model CPU scripts (``cpu_conv_speed``, ``cpu_choice_speed``):
    ``parser``'s own options and --models, --batch, --size, --threads, --json, parsed from
    ``argv`` (a --size under 32 refused)."""
    parser.add_argument("--models", default="patnet_t2,fasternet_t2",
                        help="comma list (default patnet_t2,fasternet_t2)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    parser.add_argument("--size", type=int, default=224,
                        help="input height and width, >= 32 (default 224)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    if args.size < 32:
        parser.error(f"--size must be at least 32 (the networks downsample by 32), got "
                     f"{args.size}")
    return args


def run_cpu_models(args, measure, table, settings: dict) -> int:
    """The model loop of the per-model CPU scripts: each model of ``args.models`` measured
    (``measure(name)``, a report) on ``args.threads`` torch threads from seed 0, its
    ``table(report)`` printed, and with --json every report written after the run's info and
    ``settings``. Exit status 0."""
    import torch

    from .report import split_list, write_json

    torch.manual_seed(0)
    reports = []
    with cpu_threads(torch.device("cpu"), args.threads):
        for name in split_list(args.models):
            reports.append(measure(name))
            print(table(reports[-1]) + "\n", flush=True)
    if args.json:
        write_json(args.json, {**run_info(torch.device("cpu")), "threads": args.threads,
                               **settings, "reports": reports})
    return 0


def use_cpu_emulation(triton: bool = True, cuda: bool = True) -> None:
    """Without a GPU, the Triton kernels reach CPU tensors only through Triton's interpreter
    (chosen before triton is first imported) and the CUDA kernels through their CPU emulation:
    set TRITON_INTERPRET=1 / PATNET_CUDA_EMULATE=1 where not set."""
    if triton:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if cuda:
        os.environ.setdefault("PATNET_CUDA_EMULATE", "1")
