"""The standard workspace layout (seed "Cloud Pipeline Entrypoint") and its Hugging Face cache rules.

```
<root>/datasets/train/<experiment>     text shards (sharder)
<root>/datasets/val/<experiment>
<root>/artifacts/tokenizer/<experiment>  tokenizer bundle
<root>/cache/<experiment>/tokens/{train,val}  token shards
<root>/runs/<experiment>               training.yaml/.toml, checkpoints/, tensorboard/, stages/
<root>/hf_cache                        HF_HOME (datasets cache under hf_cache/datasets)
```
``/workspace`` in cloud mode (the RunPod volume), ``./workspace`` in local mode.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CLOUD_ROOT = Path("/workspace")
LOCAL_ROOT = Path("workspace")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
HF_CACHE_VARIABLES = ("HF_HOME", "HF_DATASETS_CACHE")


class LayoutError(ValueError):
    """A bad experiment name or workspace; one line naming the flag."""


@dataclass(frozen=True)
class Layout:
    root: Path
    experiment: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.experiment):
            raise LayoutError(f"--experiment {self.experiment!r}: use letters, digits, '.', '_' or '-' (it names directories)")

    @classmethod
    def for_mode(cls, mode: str, experiment: str, workspace: Path | None) -> "Layout":
        root = workspace if workspace is not None else (CLOUD_ROOT if mode == "cloud" else LOCAL_ROOT)
        return cls(Path(root).absolute(), experiment)

    @property
    def train_text(self) -> Path:
        return self.root / "datasets" / "train" / self.experiment

    @property
    def val_text(self) -> Path:
        return self.root / "datasets" / "val" / self.experiment

    @property
    def tokenizer(self) -> Path:
        return self.root / "artifacts" / "tokenizer" / self.experiment

    @property
    def cache(self) -> Path:
        return self.root / "cache" / self.experiment

    @property
    def train_tokens(self) -> Path:
        return self.cache / "tokens" / "train"

    @property
    def val_tokens(self) -> Path:
        return self.cache / "tokens" / "val"

    @property
    def run(self) -> Path:
        return self.root / "runs" / self.experiment

    @property
    def hf_cache(self) -> Path:
        return self.root / "hf_cache"

    @property
    def stages(self) -> Path:
        return self.run / "stages"

    def directories(self) -> list[Path]:
        return [self.train_text, self.val_text, self.tokenizer, self.run, self.cache, self.hf_cache]

    def create(self) -> list[Path]:
        """Create every directory; returns the ones that were missing."""
        made = [d for d in self.directories() if not d.is_dir()]
        for d in self.directories():
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LayoutError(self.unwritable(exc, flag=True)) from None
        return made

    def unwritable(self, exc: OSError, flag: bool) -> str:
        """One line for a workspace that cannot be written (under /proc, a file, a read-only mount)."""
        where = f"--workspace {self.root}" if flag else f"workspace {self.root}"
        blocker = next((p for p in [self.root, *self.root.parents] if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            return f"{where}: not writable: {blocker} is a file, not a directory"
        return f"{where}: not writable: cannot create {exc.filename or self.root}: {exc.strerror or exc}"

    def apply_hf_environment(self, enforce: bool) -> dict[str, str]:
        """Point the Hugging Face caches into the workspace.

        Cloud mode enforces it (the container disk is lost on a pod stop; the volume is not);
        local mode only fills in what the user has not set.
        """
        wanted = dict(zip(HF_CACHE_VARIABLES, (str(self.hf_cache), str(self.hf_cache / "datasets"))))
        for key, value in wanted.items():
            if enforce:
                os.environ[key] = value
            else:
                os.environ.setdefault(key, value)
        return {k: os.environ[k] for k in wanted}
