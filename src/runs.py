"""The run folder's one home: provenance (package versions, git commit) first; paths, atomic
writes, locks and digests join it as the modules that spell them by hand move here."""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

# The packages whose version every result file records: the ones our numbers depend on.
TRACKED_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "accelerate")


def package_versions(*names: str) -> dict[str, str | None]:
    """{name: installed version, or None when absent} (peft is a test dependency only)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def versions() -> dict[str, str | None]:
    """python and every TRACKED_PACKAGES version: what a result records about its software."""
    return {"python": sys.version.split()[0], **package_versions(*TRACKED_PACKAGES)}
