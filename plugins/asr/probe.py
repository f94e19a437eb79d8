"""What this node can run, as reported by ctranslate2 and (where present) nvidia-smi."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        memory_mib = int(parts[2]) if parts[2].isdigit() else 0
        gpus.append({"index": int(parts[0]), "name": parts[1], "memory_bytes": memory_mib * 1024 * 1024,
                     "uuid": parts[3] or None})
    return gpus


def probe() -> dict[str, Any]:
    import ctranslate2

    count = ctranslate2.get_cuda_device_count()
    facts: dict[str, Any] = {
        "ctranslate2": ctranslate2.__version__,
        "cuda_device_count": count,
        "compute_types": {"cpu": sorted(ctranslate2.get_supported_compute_types("cpu"))},
        "gpus": [],
    }
    if count:
        facts["compute_types"]["cuda"] = sorted(ctranslate2.get_supported_compute_types("cuda"))
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run(
                    [smi, "--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=10, check=True,
                ).stdout
                facts["gpus"] = parse_nvidia_smi(out)
            except (OSError, subprocess.SubprocessError):
                pass
        if not facts["gpus"]:
            facts["gpus"] = [{"index": i, "name": "cuda", "memory_bytes": 0, "uuid": None} for i in range(count)]
    return facts
