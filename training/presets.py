"""The preset menu of ``train`` with no config: ``configs/*.yaml`` with their descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def preset_dirs() -> list[Path]:
    """``./configs`` first (a user's own presets), then the project's."""
    dirs = [Path.cwd() / "configs", PROJECT_ROOT / "configs"]
    return list(dict.fromkeys(d.resolve() for d in dirs if d.is_dir()))


def list_presets() -> list[tuple[Path, str]]:
    found: dict[str, tuple[Path, str]] = {}
    for directory in preset_dirs():
        for path in sorted(directory.glob("*.yaml")):
            if path.name in found:
                continue
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                continue
            found[path.name] = (path, str(data.get("description", "")) if isinstance(data, dict) else "")
    return list(found.values())


def find_preset(name: str) -> Path:
    """``configs/<name>.yaml`` from the preset directories; an unknown name lists the known ones."""
    presets = list_presets()
    for path, _ in presets:
        if path.stem == name:
            return path
    raise FileNotFoundError(f"no preset {name!r}; known: {', '.join(p.stem for p, _ in presets)}")


def choose_preset(ask: Callable[[str], str], show: Callable[[str], None]) -> Path:
    """Show a numbered menu and return the chosen preset path; re-asks on a bad answer."""
    presets = list_presets()
    if not presets:
        raise FileNotFoundError("no presets found in ./configs or the project's configs/")
    show("Choose a training preset:")
    for i, (path, desc) in enumerate(presets, 1):
        show(f"  {i}. {path.stem:<14} {desc}")
    while True:
        answer = ask(f"preset [1-{len(presets)}]: ").strip()
        if answer.isdigit() and 1 <= int(answer) <= len(presets):
            return presets[int(answer) - 1][0]
        by_name = [p for p, _ in presets if p.stem == answer]
        if by_name:
            return by_name[0]
        show(f"  '{answer}' is not a preset number or name")
