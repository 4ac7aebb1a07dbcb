"""What a computation ran on: the facts that explain why two machines give different bytes.

The same code, data and seed give byte-identical outputs on one machine (deterministic kernels),
but float sums are not associative: another CPU instruction set (AVX2 vs AVX-512 kernels), another
torch build or oneDNN/BLAS version, another thread count or device splits and orders them
differently, and the trained weights differ in their last bits. Every stage run records these
facts (tags `deep_repro.platform.*`) and `deep-repro reproduce` compares them with the machine
that reruns it, to tell "another platform" (a statistical comparison is then the fair one) from
"the same platform, different bytes" (not reproduced).

This file imports nothing of the package and only the standard library at import time: the
reproduction runs it as a script with *another* environment's interpreter
(`python machine.py` prints the JSON), whatever version of the package that environment's
checkout holds.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Mapping
from typing import Any

# The facts that can change a float result, in the order a report lists them; each one is a
# `deep_repro.platform.<key>` tag. `cpu_model` and `python` explain, they rarely decide.
KEYS = (
    "arch",
    "cpu_model",
    "cpu_capability",
    "torch",
    "torch_build",
    "onednn",
    "blas",
    "numpy",
    "numpy_blas",
    "threads",
    "device",
    "python",
)
# What each key means in a one-line explanation ("train: cpu_capability AVX2 vs AVX512").
LABELS = {
    "arch": "CPU architecture",
    "cpu_model": "CPU model",
    "cpu_capability": "CPU kernels torch dispatches to",
    "torch": "torch version",
    "torch_build": "torch build",
    "onednn": "oneDNN version",
    "blas": "torch's BLAS",
    "numpy": "numpy version",
    "numpy_blas": "numpy's BLAS",
    "threads": "CPU threads",
    "device": "device",
    "python": "Python version",
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _torch_facts(torch: Any) -> dict[str, str]:
    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN (v[\w.]+)", config)
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    cuda = torch.cuda.is_available()
    return {
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch": str(torch.__version__),
        "torch_build": str(torch.version.git_version)[:12],
        "onednn": onednn.group(1) if onednn else "none",
        "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
        "threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }


def platform_facts(*, load_torch: bool = False) -> dict[str, str]:
    """This process's platform. torch facts only where torch is loaded (or `load_torch`): a data
    stage neither imports it nor depends on it, so its record leaves them out."""
    facts = {
        "arch": platform.machine() or "unknown",
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
    }
    numpy = sys.modules.get("numpy")
    if numpy is None and load_torch:
        import numpy
    if numpy is not None:
        facts["numpy"] = str(numpy.__version__)
        try:
            blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
            facts["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '?')}"
        except Exception:  # the layout of show_config is not a stable API
            facts["numpy_blas"] = "unknown"
    torch = sys.modules.get("torch")
    if torch is None and load_torch:
        import torch
    if torch is not None:
        facts.update(_torch_facts(torch))
    return {k: facts[k] for k in KEYS if k in facts}


def differences(recorded: dict[str, str], here: dict[str, str]) -> list[str]:
    """`key recorded vs here` for every fact both sides know and that differs, in KEYS order."""
    return [
        f"{LABELS[k]} {recorded[k]} vs {here[k]}"
        for k in KEYS
        if k in recorded and k in here and recorded[k] != here[k]
    ]


# CPU features that multiply bf16 in hardware (x86: AVX512_BF16, AMX; Arm: BF16), as named by
# `torch.cpu.get_capabilities()`. Without one, bf16 is emulated: a step of the default CNN took
# 2.4x (AVX-512 without BF16) and 11x (AVX2) its fp32 time (oneDNN's ISA capped on an EPYC),
# the best_cpu net 2.5x and 12x.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16(capabilities: Mapping[str, object] | None = None) -> bool | None:
    """Whether this CPU (or the given capability map) multiplies bf16 in hardware; None where
    torch cannot tell (older torch has no `torch.cpu.get_capabilities`)."""
    if capabilities is None:
        import torch  # only here: this module imports the standard library alone

        get = getattr(torch.cpu, "get_capabilities", None)
        if get is None:
            return None
        capabilities = get()
    return any(capabilities.get(name) is True for name in NATIVE_BF16)


if __name__ == "__main__":  # probe another environment: `<venv>/bin/python machine.py`
    if len(sys.argv) > 1 and sys.argv[1].isdigit():
        import torch

        torch.set_num_threads(int(sys.argv[1]))  # the thread count the stage would use
    print(json.dumps(platform_facts(load_torch=True), sort_keys=True))
