"""What this machine offers plm_engine: versions, the compiled extension, GPUs, usable backends."""

from __future__ import annotations

import os
import platform

import torch

import plm_engine
from plm_engine.ops import backends, extension


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_info() -> dict:
    ok, why = backends.triton_installed()
    if not ok:
        return {"installed": False, "version": None, "mode": "unavailable", "note": why}
    import importlib.metadata

    version = importlib.metadata.version("triton")
    if torch.cuda.is_available():
        mode = "native"
    elif backends.triton_interpreted():
        mode = "interpreted"
    else:
        mode = "interpreter only (no GPU; set TRITON_INTERPRET=1, for tests)"
    return {"installed": True, "version": version, "mode": mode}


def _extension_info() -> dict:
    mod, why = extension.load()
    if mod is None:
        return {"built": False, "note": why}
    return {
        "built": True,
        "path": mod.__file__,
        "cpu_ops": extension.has_kernel("norm_fwd", "CPU"),
        "cuda_ops": mod.cuda_built(),
        "cuda_archs": mod.cuda_archs() or None,
        "openmp_threads": mod.openmp_threads(),
        "cpu_huge_pages": mod.cpu_huge_pages(),
        "cpu_isa": extension.cpu_isa(),
        "cpu_isa_supported": extension.cpu_isa_supported(),
        "cpu_family_isa": extension.cpu_family_isas(),
    }


def collect() -> dict:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                    "sms": p.multi_processor_count,
                }
            )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if gpus else [])
    return {
        "plm_engine": plm_engine.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {"name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        },
        "triton": _triton_info(),
        "extension": _extension_info(),
        "gpus": gpus,
        "backends": {
            d.type: {
                "usable": backends.usable_backends(d, "norm_fwd"),
                "default": backends.choose(d, "norm_fwd") if not os.environ.get("PLM_ENGINE_BACKEND") else None,
                "unavailable": {
                    b: why for b in backends.BACKENDS for ok, why in [backends.availability(b, d, "norm_fwd")] if not ok
                },
            }
            for d in devices
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith("PLM_ENGINE_") or k == "TRITON_INTERPRET"},
    }


def format_text(info: dict) -> str:
    ext, tri = info["extension"], info["triton"]
    lines = [
        f"plm_engine {info['plm_engine']}  (python {info['python']}, {info['platform']})",
        f"cpu         {info['cpu']['name']}, {info['cpu']['cores']} cores, torch threads {info['cpu']['torch_threads']}",
        f"torch       {info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none'},"
        f" GPU available: {info['torch']['cuda_available']})",
        f"triton      {tri['version'] or 'not installed'} ({tri['mode']})",
    ]
    if ext["built"]:
        cuda = f"yes (sm {ext['cuda_archs']})" if ext["cuda_ops"] else "no (built without nvcc)"
        lines.append(f"_C          {ext['path']}")
        lines.append(
            f"            CPU ops: {'yes' if ext['cpu_ops'] else 'no'}; CUDA ops: {cuda};"
            f" OpenMP threads {ext['openmp_threads']}; huge-page hint {ext['cpu_huge_pages']}"
        )
        lines.append(
            f"cpu kernels {ext['cpu_isa']} (best here: {ext['cpu_isa_supported']}; PLM_ENGINE_CPU_ISA caps it): "
            + ", ".join(f"{f} {isa}" for f, isa in ext["cpu_family_isa"].items())
        )
    else:
        lines.append(f"_C          not available: {ext['note']}")
    for g in info["gpus"]:
        lines.append(
            f"gpu {g['index']}       {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, {g['sms']} SMs)"
        )
    if not info["gpus"]:
        lines.append("gpu         none")
    for dev, b in info["backends"].items():
        default = f", automatic choice: {b['default']}" if b["default"] else ""
        lines.append(f"backends    {dev}: {', '.join(b['usable'])}{default}")
        for name, why in b["unavailable"].items():
            lines.append(f"              {name}: {why}")
    for k, v in info["env"].items():
        lines.append(f"env         {k}={v}")
    return "\n".join(lines)
