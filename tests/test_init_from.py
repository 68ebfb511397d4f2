"""``init_from`` a podtrain checkpoint: weights only, a fresh run, the model config taken from the checkpoint."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from training.config import validate_config
from training.init import InitError
from training.trainer import train


@pytest.fixture(scope="module")
def pretrained(byte_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    result = train(validate_config(tiny_config(byte_corpus, out, num_steps=20)))
    return out / "ckpt", result


def finetune_config(byte_corpus, out, source: str, **overrides) -> dict:
    cfg = tiny_config(byte_corpus, out, init_from=source, **overrides)
    del cfg["model"]  # taken from the checkpoint
    return cfg


def test_a_new_run_starts_from_the_checkpoint_weights_with_a_fresh_schedule(byte_corpus, tmp_path, pretrained) -> None:
    ckpt_dir, first = pretrained
    result = train(validate_config(finetune_config(byte_corpus, tmp_path, str(ckpt_dir / "final"), num_steps=4, eval_every=4)))
    assert result.exit_code == 0 and result.step == 4 and sorted(result.losses) == [1, 2, 3, 4]
    # same weights, same validation batches: the new run's step-0 loss is the old run's last one
    assert result.val_losses[0] == pytest.approx(first.val_losses[20], abs=1e-6)
    assert first.val_losses[20] < 0.9 * first.val_losses[0]  # a trained model, not the untrained one


def test_a_checkpoint_directory_means_its_newest_tag_and_dropout_may_change(byte_corpus, tmp_path, pretrained) -> None:
    ckpt_dir, first = pretrained
    cfg = finetune_config(byte_corpus, tmp_path, str(ckpt_dir), num_steps=1, eval_only=True)
    cfg["model"] = {"dropout": 0.1}
    result = train(validate_config(cfg))
    assert result.val_losses[0] == pytest.approx(first.val_losses[20], abs=1e-6)


def test_a_vocabulary_that_does_not_fit_names_the_tensor(byte_corpus, tmp_path, pretrained) -> None:
    ckpt_dir, _ = pretrained
    cfg = finetune_config(byte_corpus, tmp_path, str(ckpt_dir / "final.safetensors"), num_steps=1)
    cfg["model"] = {"vocab_size": 300}
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \[257, 64\] in the checkpoint but \[300, 64\]"):
        train(validate_config(cfg))


def test_a_missing_checkpoint_is_one_line(byte_corpus, tmp_path) -> None:
    with pytest.raises(InitError, match=r"^init_from .*/nowhere/best: no such checkpoint or folder$"):
        train(validate_config(finetune_config(byte_corpus, tmp_path, str(tmp_path / "nowhere" / "best"))))


def test_init_from_resume_is_resume_auto(byte_corpus, tmp_path, pretrained) -> None:
    import shutil

    shutil.copytree(pretrained[0], tmp_path / "ckpt")
    result = train(validate_config(tiny_config(byte_corpus, tmp_path, init_from="resume", num_steps=22)))
    assert sorted(result.losses) == [21, 22]
