"""SoftMaskTrainer resumed from its own checkpoint keeps masking with the importance saved in it."""

from __future__ import annotations

import pytest
import torch

from hf_softmask import SoftMaskTrainer, SoftMaskTrainingArguments, UnitImportance, UnitLayout
from tests.testing_utils import ExampleDataset, random_lm_batches, tiny_llama


def _args(out, **kw):
    return SoftMaskTrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="steps",
        save_steps=2,
        max_steps=4,
        logging_steps=100,
        disable_tqdm=True,
        **kw,
    )


def _protected_rows(model):
    # head 2 of layer 1 (head_dim 8): rows 16:24 of q_proj; importance 1 there means mask 0 in update mode
    return model.model.layers[1].self_attn.q_proj.weight[16:24].detach().clone()


def test_resume_from_own_checkpoint_masks_with_saved_importance(tmp_path):
    model = tiny_llama(seed=0)
    layout = UnitLayout.from_model(model)
    imp = UnitImportance.zeros_like_layout(layout)
    imp.heads[1, 2] = 1.0
    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    SoftMaskTrainer(model=model, args=_args(tmp_path / "out"), train_dataset=data, importance=imp).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert UnitImportance.exists(ckpt)

    # A fresh process: same command, no --importance_path, resume from the Trainer's own checkpoint.
    fresh = tiny_llama(seed=1)
    before = _protected_rows(fresh)
    trainer = SoftMaskTrainer(model=fresh, args=_args(tmp_path / "out"), train_dataset=data)
    assert trainer.softmask_callback is None
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.softmask_callback is not None and trainer.importance.heads[1, 2] == 1.0
    # the checkpoint's weights were loaded, then the protected head did not move during the resumed steps
    loaded = tiny_llama(seed=1)
    from safetensors.torch import load_file

    loaded.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    assert not torch.equal(before, _protected_rows(loaded))  # the checkpoint differs from the fresh init
    assert torch.equal(_protected_rows(fresh), _protected_rows(loaded))
    other = fresh.model.layers[1].self_attn.q_proj.weight[0:8]
    assert not torch.equal(other, loaded.model.layers[1].self_attn.q_proj.weight[0:8])  # unprotected rows trained


@pytest.mark.parametrize("path, message", [("importanc", "no such directory"), ("./nowhere/imp", "no such directory")])
def test_bad_importance_path_names_the_flag(tmp_path, path, message):
    with pytest.raises(FileNotFoundError, match=f"--importance_path {path}: {message}"):
        SoftMaskTrainer(
            model=tiny_llama(), args=_args(tmp_path / "o", importance_path=path), train_dataset=ExampleDataset([])
        )


def test_truncated_importance_file_names_the_file(tmp_path):
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(tiny_llama()))
    imp.save_pretrained(tmp_path / "imp")
    f = tmp_path / "imp" / "importance.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match="importance.safetensors.*damaged"):
        SoftMaskTrainer(
            model=tiny_llama(),
            args=_args(tmp_path / "o", importance_path=str(tmp_path / "imp")),
            train_dataset=ExampleDataset([]),
        )
