"""What a git ref holds, read from this repository's object store (no network, no checkout).

Why: a pod that clones RUN_REPO at RUN_REF runs the configs of that commit, not the ones in the
working tree `orchestrate pod create` runs from; a config that exists only locally would fail the
boot minutes (and dollars) later. Checking the committed tree catches it before anything is sent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


class GitRefError(ValueError):
    """The ref cannot be read here (not a repository, unknown ref); one line."""


def _git(project: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitRefError(f"cannot run git in {project} ({type(exc).__name__})") from None
    if done.returncode != 0:
        raise GitRefError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                          f"git {args[0]} failed in {project}")
    return done.stdout


def resolve(project: Path, ref: str) -> str:
    """The commit a ref names: a remote branch (origin/<ref>, as the pod resolves it), a tag or a
    commit; GitRefError when this repository does not have it."""
    for candidate in (f"origin/{ref}", ref):
        try:
            return _git(project, "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}").strip()
        except GitRefError:
            continue
    raise GitRefError(f"{ref!r} is not a commit, tag or branch of the git repository at {project} "
                      "(git fetch, or push the commit the pod should run)")


def files_at_ref(project: Path, ref: str, folder: str) -> set[str]:
    """Paths of the files under `folder` in the commit `ref` names."""
    commit = resolve(project, ref)
    listing = _git(project, "ls-tree", "-r", "--name-only", commit, "--", folder)
    return set(listing.splitlines())
