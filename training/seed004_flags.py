"""Seed 004's ``scripts/pretrain.py`` flags, accepted by ``train`` as aliases.

A seed 004 user types ``--preset mac_mini --tokenizer checkpoints/tokenizer --processed-dir
data/processed/pretrain --output-dir checkpoints/pretrain --batch-size 1 --grad-accum 32 --seq-len
4096 --run-name mac_mini_pretrain``. Before the command line is parsed, each such flag becomes the
config it names (``--preset``) or the ``key=value`` override it stands for, so the rest of ``train``
(validation, one-line errors, the printed notes) is the same as for podtrain's own spelling. The
overrides come before the user's own ``key=value`` items, which therefore win.
"""

from __future__ import annotations

from pathlib import PurePosixPath

# flag -> the canonical keys its value sets
VALUE_FLAGS: dict[str, tuple[str, ...]] = {
    "--tokenizer": ("tokenizer_path",),
    "--processed-dir": ("train_data",),
    "--batch-size": ("batch_size",),
    "--grad-accum": ("gradient_accumulation_steps",),
    "--learning-rate": ("optimizer.lr",),
    "--seq-len": ("seq_len", "model.max_seq_len"),
    "--save-steps": ("save_every",),
    "--save-total-limit": ("keep_last_n",),
    "--active-expert": ("active_expert",),
    "--expert-checkpoint-dir": ("expert_checkpoint_dir",),
}
OWN_VALUE_FLAGS = ("--resume", "--config")  # train's own flags that take a value (not a positional config)
DEFAULT_OUTPUT_DIR = "checkpoints"  # where --run-name puts its folder without --output-dir (the schema's checkpoint_dir)


class FlagError(ValueError):
    """A seed 004 flag without its value, or one podtrain's train cannot honour; one line."""


def _split(args: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    """(the arguments that are not seed 004 flags, the seed 004 flags with their values)."""
    rest: list[str] = []
    found: dict[str, str | bool] = {}
    takes_value = {*VALUE_FLAGS, "--preset", "--output-dir", "--run-name", "--dataset-limit"}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, inline = arg.partition("=")
        if name == "--disable-eval" and not eq:
            found[name] = True
        elif name in takes_value:
            if eq:
                found[name] = inline
            elif i + 1 < len(args):
                found[name] = args[i + 1]
                i += 1
            else:
                raise FlagError(f"{name}: needs a value (seed 004's pretrain.py flag)")
        else:
            rest.append(arg)
        i += 1
    return rest, found


def _has_config(rest: list[str]) -> bool:
    """Whether ``rest`` names a config: ``--config FILE``, or a positional (neither a flag, its value, nor key=value)."""
    skip = False
    for arg in rest:
        if skip:
            skip = False
        elif arg == "--config" or arg.startswith("--config="):
            return True
        elif arg in OWN_VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-") and "=" not in arg:
            return True
    return False


def translate(args: list[str]) -> list[str]:
    """``train``'s arguments with seed 004's flags turned into a config path and ``key=value`` items."""
    rest, found = _split(args)
    if not found:
        return args
    if "--dataset-limit" in found:
        raise FlagError("--dataset-limit: budgets the sources of a data recipe; give it to `orchestrate --data RECIPE "
                        "--dataset-limit ...` (or fineweb-sharder), which shards them before training")
    overrides: list[str] = []
    for flag, keys in VALUE_FLAGS.items():
        if flag in found:
            overrides += [f"{key}={found[flag]}" for key in keys]
    if "--run-name" in found:
        output = found.get("--output-dir", DEFAULT_OUTPUT_DIR)
        overrides += [f"checkpoint_dir={PurePosixPath(str(output)) / str(found['--run-name'])}", f"wandb_run_name={found['--run-name']}"]
    elif "--output-dir" in found:
        overrides.append(f"checkpoint_dir={found['--output-dir']}")
    if found.get("--disable-eval"):
        overrides.append("val_data=null")
    head: list[str] = []
    if "--preset" in found:
        if _has_config(rest):
            raise FlagError(f"--preset {found['--preset']}: a config file is given too; keep one")
        from training.presets import find_preset

        try:
            head = [str(find_preset(str(found["--preset"])))]
        except FileNotFoundError as exc:
            raise FlagError(f"--preset: {exc}") from None
    keyvalues = [a for a in rest if "=" in a and not a.startswith("-")]
    others = [a for a in rest if a not in keyvalues]
    return head + others + overrides + keyvalues
