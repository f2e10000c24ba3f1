"""SoftMaskTrainer resumed from its own checkpoint keeps masking with the importance saved in it."""

from __future__ import annotations

import json

import pytest
import torch

from hf_softmask import SoftMaskCallback, SoftMaskTrainer, SoftMaskTrainingArguments, UnitImportance, UnitLayout
from tests.testing_utils import ExampleDataset, random_lm_batches, tiny_llama


def _args(out, **kw):
    settings = dict(
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
    )
    return SoftMaskTrainingArguments(**{**settings, **kw})


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


# -- soft-mask settings at resume --------------------------------------------------------------------------------
# Before: the resumed steps silently used the new command line's settings (embeddings frozen for the first steps
# moved after the resume).


def _embeddings(model):
    return model.model.embed_tokens.weight.detach().clone()


def _checkpoint_run(out, data):
    """Steps 1-2 with the embeddings frozen; checkpoint-2 holds the settings they were trained with."""
    model = tiny_llama(seed=0)
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(model))
    imp.heads[1, 2] = 1.0
    args = _args(out, max_steps=2, softmask_embeddings="freeze")
    SoftMaskTrainer(model=model, args=args, train_dataset=data, importance=imp).train()
    return out / "checkpoint-2"


def test_resume_with_changed_softmask_settings_is_refused_naming_them(tmp_path):
    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    ckpt = _checkpoint_run(tmp_path / "out", data)
    trainer = SoftMaskTrainer(
        model=tiny_llama(seed=1),
        args=_args(tmp_path / "out", softmask_embeddings="train", softmask_mask_power=2.0),
        train_dataset=data,
    )
    with pytest.raises(ValueError, match=r"embeddings: 'freeze' -> 'train'; mask_power: 1.0 -> 2.0") as info:
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert str(ckpt) in str(info.value) and "--allow_softmask_settings_change" in str(info.value)
    assert not (tmp_path / "out" / "checkpoint-4").exists()  # refused before any step


def test_resume_with_changed_settings_and_the_opt_in_warns_and_uses_them(tmp_path):
    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    ckpt = _checkpoint_run(tmp_path / "out", data)
    model = tiny_llama(seed=1)
    args = _args(tmp_path / "out", softmask_embeddings="train", allow_softmask_settings_change=True)
    trainer = SoftMaskTrainer(model=model, args=args, train_dataset=data)
    with pytest.warns(UserWarning, match=r"other soft-mask settings .*embeddings: 'freeze' -> 'train'"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.softmask_callback.config.embeddings == "train"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(saved, _embeddings(model))  # trained after the resume, as asked
    assert (
        json.loads((tmp_path / "out" / "checkpoint-4" / "softmask_config.json").read_text())["embeddings"] == "train"
    )


def test_resume_with_unchanged_settings_keeps_masking_as_before(tmp_path, recwarn):
    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    ckpt = _checkpoint_run(tmp_path / "out", data)
    assert json.loads((ckpt / "softmask_config.json").read_text())["embeddings"] == "freeze"
    model = tiny_llama(seed=1)
    # compile_update changes only the speed: a resume may change it
    args = _args(tmp_path / "out", softmask_embeddings="freeze", softmask_compile_update=False)
    SoftMaskTrainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=str(ckpt))
    assert not [w for w in recwarn if "soft-mask settings" in str(w.message)]
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(saved, _embeddings(model))  # still frozen
    assert (tmp_path / "out" / "checkpoint-4").is_dir()


def test_plain_trainer_with_the_callback_checks_its_checkpoint(tmp_path):
    from transformers import Trainer

    data = ExampleDataset(random_lm_batches(4, seq_len=12))
    imp = UnitImportance.zeros_like_layout(UnitLayout.from_model(tiny_llama()))
    out = tmp_path / "out"

    def trainer(max_steps, **settings):
        cb = SoftMaskCallback(imp, **settings)
        return Trainer(
            model=tiny_llama(seed=0), args=_args(out, max_steps=max_steps), train_dataset=data, callbacks=[cb]
        )

    trainer(2, embeddings="freeze").train()
    assert json.loads((out / "checkpoint-2" / "softmask_config.json").read_text())["embeddings"] == "freeze"
    with pytest.raises(ValueError, match=r"embeddings: 'freeze' -> 'mean'.*allow_settings_change=True"):
        trainer(4, embeddings="mean").train(resume_from_checkpoint=True)
    with pytest.warns(UserWarning, match=r"embeddings: 'freeze' -> 'mean'"):
        trainer(4, embeddings="mean", allow_settings_change=True).train(resume_from_checkpoint=True)
    assert json.loads((out / "checkpoint-4" / "softmask_config.json").read_text())["embeddings"] == "mean"
