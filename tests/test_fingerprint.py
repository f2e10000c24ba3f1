"""A run's fingerprint is an allowlist: the Trainer fields that change results and the runner's own fields. A field
a new transformers release adds to TrainingArguments changes no fingerprint, and a run saved with the older, larger
fingerprint (Trainer keys no longer fingerprinted) still resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from transformers import TrainingArguments

from hf_softmask.continual import fingerprint as fingerprint_module
from hf_softmask.continual import parse_config, run_continual_pretraining
from hf_softmask.continual.checkpointing import RunMismatchError
from hf_softmask.continual.finetuning import ContinualFinetuningArguments, parse_finetuning_config
from hf_softmask.continual.fingerprint import TRAINER_FIELDS
from hf_softmask.continual.pretraining.config import ContinualPretrainingArguments
from tests.testing_utils import tiny_runner_flags


@dataclass
class _NextTrainingArguments(TrainingArguments):
    """TrainingArguments of a future transformers release: one more field."""

    brand_new_trainer_field: int = field(default=3, metadata={"help": "added by a future release"})


def test_a_new_trainer_field_changes_no_fingerprint(tmp_path, monkeypatch):
    before = ContinualPretrainingArguments(output_dir=str(tmp_path), plots=False).fingerprint()
    ft_before = ContinualFinetuningArguments(plots=False).fingerprint()

    @dataclass
    class NextPretrainingArguments(ContinualPretrainingArguments, _NextTrainingArguments):
        pass

    @dataclass
    class NextFinetuningArguments(ContinualFinetuningArguments, _NextTrainingArguments):
        pass

    monkeypatch.setattr(fingerprint_module, "TrainingArguments", _NextTrainingArguments)  # the release installed
    args = NextPretrainingArguments(output_dir=str(tmp_path), plots=False)
    assert args.to_dict()["brand_new_trainer_field"] == 3  # the runner reads it like any Trainer field
    assert args.fingerprint() == before
    assert NextFinetuningArguments(plots=False).fingerprint() == ft_before


def test_fingerprint_keys_are_the_trainer_allowlist_and_the_runners_fields(tmp_path):
    fp = parse_config(["--output_dir", str(tmp_path), "--no_plots"]).fingerprint()
    trainer = {f for f in fp if f in ContinualPretrainingArguments.__dataclass_fields__} & set(
        TrainingArguments.__dataclass_fields__
    )
    assert trainer == set(TRAINER_FIELDS) & set(TrainingArguments.__dataclass_fields__)
    for kept in ("learning_rate", "max_steps", "seed", "bf16", "optim", "strategy", "block_size", "domains"):
        assert kept in fp
    for dropped in ("output_dir", "logging_steps", "save_steps", "plots", "seeds", "bootstrap_resamples"):
        assert dropped not in fp
    assert not set(OLD_TRAINER_KEYS) & set(fp)
    ft = parse_finetuning_config(["--output_dir", str(tmp_path / "f"), "--no_plots"]).fingerprint()
    # The keys runs saved when the runner had two argument classes (its own fields beside the Trainer's): one class
    # now, the same fingerprint, so those runs resume.
    assert set(ft) - {"runner"} - set(TRAINER_FIELDS) == {
        "model_name_or_path",
        "strategy",
        "strategy_kwargs",
        "tasks",
        "max_train_per_class",
        "max_test_per_class",
        "test_fraction",
        "split_seed",
        "max_length",
        "pooling",
        "head_learning_rate",
    }
    assert ft["runner"] == "continual_finetune"
    assert set(TRAINER_FIELDS) & set(TrainingArguments.__dataclass_fields__) <= set(ft)


#: Trainer settings that the old fingerprint (every field but a denylist) saved and the allowlist leaves out.
OLD_TRAINER_KEYS = (
    "eval_steps",
    "do_train",
    "fsdp",
    "label_names",
    "bf16_full_eval",
    "use_cache",
    "prediction_loss_only",
)


def test_a_run_saved_with_the_old_larger_fingerprint_resumes(tiny_mlm_dir, tmp_path):
    out = tmp_path / "run"
    flags = tiny_runner_flags(tiny_mlm_dir, out, strategy="ncl", max_steps=2, domains="business")
    first = run_continual_pretraining(parse_config(flags))
    state = json.loads((out / "state.json").read_text())
    saved = parse_config(flags).to_dict()
    state["fingerprint"].update({k: saved[k] for k in OLD_TRAINER_KEYS})  # as the old code saved them
    state["fingerprint"]["plots"] = False  # and a runner field that does not change results
    (out / "state.json").write_text(json.dumps(state))
    again = run_continual_pretraining(parse_config(flags))
    assert again["complete"] and again["loss_matrix"] == first["loss_matrix"]
    # a setting that does change results is still compared
    with pytest.raises(RunMismatchError, match="learning_rate"):
        run_continual_pretraining(parse_config([*flags, "--learning_rate", "2e-3"]))
