"""Which tests prove each cell of the compatibility matrix (``hf_softmask.core.compatibility.MATRIX``).

The matrix (shipped) says what works; this table (tests only) names the pytest node ids that show it.
``scripts/make_compatibility_page.py`` writes both into docs/compatibility.md; ``tests/test_compatibility.py`` checks
that the table covers every cell and that every test it names exists.

``EVIDENCE[row][column]``: for a tested cell, the tests that show it; for a GPU-only cell, the CPU tests of the same
code path; for a refused cell, the test that sees it refuse (:func:`evidence` gives refused cells not listed here
their case of :data:`REFUSAL_TEST`).
"""

from __future__ import annotations

from hf_softmask.core.compatibility import MATRIX

__all__ = ["DDP_TEST", "EVIDENCE", "REFUSAL_TEST", "evidence"]

#: every refused cell outside the DDP column refuses at train begin in this test (one case per cell)
REFUSAL_TEST = "tests/test_compatibility.py::test_refused_cell_refuses_at_train_begin"
#: the DDP column, trained (or refused) in one launch of 2 gloo processes
DDP_TEST = "tests/test_compat_matrix.py::test_rows_under_two_ddp_processes"
_M = "tests/test_compat_matrix.py::test_cell"
#: the runner passes its Trainer flags (bf16, checkpointing, accumulation, ...) to every domain's Trainer
_RUNNER_FLAGS = "tests/test_runner_args.py::test_trainer_flags_reach_every_domain_trainer"

EVIDENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "SoftMaskCallback": {
        "fp32": ("tests/test_core_masking.py::test_importance_one_freezes_exactly_the_owned_slices_under_adamw",),
        "bf16": (f"{_M}[SoftMaskCallback-bf16]",),
        "fp16": (
            "tests/test_amp_masking.py::test_trainer_with_grad_scaler_keeps_protected_units",
            f"{_M}[SoftMaskCallback-fp16]",
        ),
        "checkpointing": (f"{_M}[SoftMaskCallback-checkpointing]",),
        "accumulation": (
            "tests/test_core_masking.py::test_grad_mode_is_applied_once_per_step_under_accumulation",
            f"{_M}[SoftMaskCallback-accumulation]",
        ),
        "ddp": (
            "tests/test_distributed_masking.py::test_ddp_trainer_matches_single_process",
            "tests/test_distributed_masking.py::test_update_masking_protects_important_heads_under_ddp",
        ),
        "fsdp2": (
            "tests/test_fsdp2_masking.py::test_masks_built_before_fully_shard_protect_after_it",
            "tests/test_distributed_masking.py::test_fsdp2_dtensor_masking_matches_single_process",
        ),
        "peft": (
            "tests/test_peft.py::test_trainer_with_softmask_callback_keeps_protected_lora_slices",
            f"{_M}[SoftMaskCallback-peft]",
        ),
        "compile": (f"{_M}[SoftMaskCallback-compile]",),
    },
    "SoftMaskTrainer": {
        "fp32": (
            "tests/test_core_masking.py::test_softmask_trainer_reads_importance_from_args_and_saves_it_with_checkpoints",
        ),
        "bf16": (f"{_M}[SoftMaskTrainer-bf16]",),
        "fp16": (f"{_M}[SoftMaskTrainer-fp16]",),
        "checkpointing": (f"{_M}[SoftMaskTrainer-checkpointing]",),
        "accumulation": (f"{_M}[SoftMaskTrainer-accumulation]",),
        "ddp": (DDP_TEST,),
        "fsdp2": ("tests/test_fsdp2_masking.py::test_masks_built_before_fully_shard_protect_after_it",),
        "peft": (
            "tests/test_peft.py::test_softmask_trainer_on_a_lora_model_saves_adapter_and_importance",
            f"{_M}[SoftMaskTrainer-peft]",
        ),
        "compile": (f"{_M}[SoftMaskTrainer-compile]",),
    },
    "DAS runner": {
        "fp32": (
            "tests/test_continual_pretrain.py::test_sweep_writes_checkpoints_results_and_frontier",
            "tests/test_peft.py::test_das_strategy_on_a_lora_model_keeps_protected_lora_slices",
        ),
        "bf16": (
            f"{_M}[DAS runner-bf16]",
            _RUNNER_FLAGS,
            "tests/test_das_amp.py::test_smollm2_das_bf16_with_gradient_checkpointing_keeps_protected_slices",
        ),
        "fp16": (f"{_M}[DAS runner-fp16]",),
        "checkpointing": (
            f"{_M}[DAS runner-checkpointing]",
            _RUNNER_FLAGS,
            "tests/test_das_amp.py::test_smollm2_das_bf16_with_gradient_checkpointing_keeps_protected_slices",
            "tests/test_das_checkpointing.py::test_das_loss_gradients_equal_with_and_without_checkpointing",
        ),
        "accumulation": (
            f"{_M}[DAS runner-accumulation]",
            _RUNNER_FLAGS,
        ),
        "ddp": (
            DDP_TEST,
            "tests/test_distributed_importance.py::test_two_processes_get_identical_importance",
            "tests/test_runner_ddp.py::test_logged_loss_and_results_do_not_depend_on_world_size",
        ),
        "fsdp2": (
            "tests/test_runner_fsdp.py::test_fully_shard_das_domain_trains_evaluates_saves_and_resumes",
            "tests/test_distributed_masking.py::test_fsdp2_dtensor_masking_matches_single_process",
        ),
        "peft": (
            f"{_M}[DAS runner-peft]",
            "tests/test_peft.py::test_das_strategy_on_a_lora_model_keeps_protected_lora_slices",
        ),
        "compile": (f"{_M}[DAS runner-compile]",),
    },
    "TSS/WSN runner": {
        "fp32": (
            "tests/test_continual_finetune.py::test_tss_run_has_zero_forgetting_and_saves_its_subnetworks",
            "tests/test_tss.py::test_task1_outputs_bit_identical_after_task2",
            "tests/test_wsn.py::test_earlier_task_outputs_identical_after_later_tasks",
        ),
        "bf16": (f"{_M}[TSS/WSN runner-bf16]",),
        "fp16": (f"{_M}[TSS/WSN runner-fp16]",),
        "checkpointing": (f"{_M}[TSS/WSN runner-checkpointing]",),
        "accumulation": (f"{_M}[TSS/WSN runner-accumulation]",),
        "ddp": (DDP_TEST,),
        "compile": (f"{_M}[TSS/WSN runner-compile]",),
    },
    "HAT": {
        "fp32": ("tests/test_hat.py::test_earlier_task_units_and_outputs_unchanged",),
        "bf16": (f"{_M}[HAT-bf16]",),
        "checkpointing": (f"{_M}[HAT-checkpointing]",),
        "accumulation": (
            f"{_M}[HAT-accumulation]",
            "tests/test_strategy_defects.py::test_hat_compensation_uses_each_micro_batchs_s",
        ),
        "ddp": (DDP_TEST,),
        "peft": (f"{_M}[HAT-peft]",),
        "compile": (f"{_M}[HAT-compile]",),
    },
    "CBP": {
        "fp32": ("tests/test_cbp.py::test_replacement_preserves_output_inside_trainer_run",),
        "bf16": (f"{_M}[CBP-bf16]",),
        "fp16": (f"{_M}[CBP-fp16]",),
        "checkpointing": (f"{_M}[CBP-checkpointing]",),
        "accumulation": (f"{_M}[CBP-accumulation]",),
        "ddp": (DDP_TEST,),
        "peft": (f"{_M}[CBP-peft]",),
        "compile": (f"{_M}[CBP-compile]",),
    },
    "TaLoS": {
        "fp32": ("tests/test_talos.py::test_frozen_entries_bit_identical_with_weight_decay",),
        "bf16": (f"{_M}[TaLoS-bf16]",),
        "fp16": (f"{_M}[TaLoS-fp16]",),
        "checkpointing": (f"{_M}[TaLoS-checkpointing]",),
        "accumulation": (f"{_M}[TaLoS-accumulation]",),
        "ddp": (DDP_TEST,),
        "peft": (f"{_M}[TaLoS-peft]",),
        "compile": (f"{_M}[TaLoS-compile]",),
    },
    "EWC/KD": {
        "fp32": (
            "tests/test_baselines.py::test_ewc_penalty_matches_formula_and_holds_weights",
            "tests/test_baselines.py::test_kd_keeps_previous_outputs_closer_and_resumes",
        ),
        "bf16": (f"{_M}[EWC/KD-bf16]",),
        "fp16": (f"{_M}[EWC/KD-fp16]",),
        "checkpointing": (f"{_M}[EWC/KD-checkpointing]",),
        "accumulation": (f"{_M}[EWC/KD-accumulation]",),
        "ddp": (DDP_TEST,),
        "peft": (f"{_M}[EWC/KD-peft]",),
        "compile": (f"{_M}[EWC/KD-compile]",),
    },
}


def evidence(row: str, column: str) -> tuple[str, ...]:
    """The tests that show ``MATRIX[row][column]``; a refused cell not listed here: its case of REFUSAL_TEST."""
    if column in EVIDENCE[row]:
        return EVIDENCE[row][column]
    if MATRIX[row][column].status == "refused":
        return (f"{REFUSAL_TEST}[{row}-{column}]",)
    raise KeyError(f"{row} / {column}: a {MATRIX[row][column].status} cell with no tests in tests/compat_evidence.py")
