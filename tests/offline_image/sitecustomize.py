"""Imported at interpreter start when this folder is on PYTHONPATH (tests/test_gpu_check.py): an import
of anything the offline CUDA image would not have raises ModuleNotFoundError, as it would there.

Allowed: the standard library, the checkout's own modules, names installed nowhere (their import fails anyway), the image's distributions
(bench/gpu_image_packages.txt) and the wheels bench/gpu_check.sh installs (bench/gpu_wheels.txt).
Each refused top-level name is appended to $PODTRAIN_BLOCKED_LOG, so a test also sees the
optional imports that were tried and survived their absence.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import re
import sys
import sysconfig
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_BASE = {key: sys.base_prefix for key in ("base", "platbase", "installed_base", "installed_platbase")}
_PLACES = [_ROOT, *{Path(sysconfig.get_paths(vars=_BASE)[k]).resolve() for k in ("stdlib", "platstdlib")}]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str]:
    names = (_ROOT / "bench" / "gpu_image_packages.txt").read_text().split("\n")
    image = {_normal(n) for line in names if not line.startswith("#") for n in line.split()}
    wheels = {_normal(re.split(r"[=<>!~ ]", line, maxsplit=1)[0])
              for line in (_ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    dropped = {_normal(n) for n in os.environ.get("PODTRAIN_OFFLINE_DROP", "").split(",") if n}  # a test's missing wheel
    return (image | wheels) - dropped


class OfflineImage(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.allowed = _allowed_distributions()
        self.owners = {top: {_normal(d) for d in dists} for top, dists in importlib.metadata.packages_distributions().items()}
        self.decided: dict[str, bool] = {}
        self.log = os.environ.get("PODTRAIN_BLOCKED_LOG")

    def _permitted(self, top: str) -> bool:
        if top in sys.stdlib_module_names or top.startswith("__editable__"):
            return True
        spec = importlib.machinery.PathFinder.find_spec(top)
        if spec is None:  # not installed here either: the import fails as it would anyway
            return True
        origin = Path(spec.origin or (list(spec.submodule_search_locations or []) or ["."])[0]).resolve()
        if "site-packages" not in origin.parts and any(origin.is_relative_to(place) for place in _PLACES):  # the checkout, the interpreter's own library
            return True
        return bool(self.owners.get(top, set()) & self.allowed)

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        top = name.partition(".")[0]
        if top not in self.decided:
            self.decided[top] = self._permitted(top)
        if self.decided[top]:
            return None
        if self.log:
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.write(f"{top}\n")
        raise ModuleNotFoundError(f"No module named {top!r} (not in the offline CUDA image: bench/gpu_image_packages.txt, "
                                  f"bench/gpu_wheels.txt)", name=top)


sys.meta_path.insert(0, OfflineImage())
