"""The continual finetuning runner: a sequence of classification tasks, generic over strategies.

Contract between this runner and a strategy (any ``ContinualStrategy`` whose ``runners`` include "finetune"):

1. The runner builds ``model = MultiTaskClassifier(AutoModel.from_pretrained(...), num_labels per task)``
   (:mod:`hf_softmask.task_heads`): a shared ``model.backbone`` (the transformers base model, with ``.config``) and
   one linear head per task in ``model.heads``, all created up front from a seeded generator.
2. ``model = strategy.prepare_model(model)``, once. A strategy may replace ``model.backbone`` by a wrapper (TSS/WSN
   put a :class:`~hf_softmask.tss.SubnetworkModel` there) and freeze backbone parameters; it must return a model
   with the same ``forward(input_ids, attention_mask, labels, task_ids)``. Unit-based strategies build their
   ``UnitLayout`` from ``model.backbone``. A backbone that has ``set_task(t)`` is told which task every forward
   belongs to (``MultiTaskClassifier`` groups a mixed batch by task id).
3. Before training anything, every task is evaluated (row ``R``: the untrained model's scores, for FWT).
4. For each task ``t``: ``model.set_task(t)``; ``model.train_only_head(t)`` (heads of other tasks frozen; backbone
   flags are the strategy's); ``strategy.before_task(model, t, train_dataloader)``; a
   :class:`~hf_softmask.strategies.StrategyTrainer` over task ``t``'s training set (batches carry ``labels`` and
   ``task_ids``) calls ``on_train_begin(model, optimizer)``, ``extra_loss``, ``after_backward``,
   ``after_optimizer_step``, ``on_train_end``; then ``strategy.after_task(model, t, dataloader)`` with a
   deterministic dataloader over task ``t``'s training set (e.g. for importance).
5. After each task every task ``j`` is evaluated (upper triangle included, untrained heads where ``j > t``):
   ``strategy.set_task(j)`` is called first (``strategy.set_task(None)`` after; a no-op but for HAT), and
   the batches carry ``task_ids = j``.
6. At the end the heads are saved and ``strategy.save_model(model, dir)`` saves the backbone and the strategy's
   state (by default ``model.backbone.save_pretrained(dir)`` and ``strategy.save_pretrained(dir)``; TSS/WSN: the
   subnetwork adapter).

Outputs in ``output_dir``: ``results.json`` (``tasks``, ``accuracy_matrix``, ``f1_matrix``, ``acc``, ``bwt``,
``fwt``, ``forgetting``, ...), ``accuracy_matrix.png`` and ``final/`` (heads, tokenizer, strategy's files).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, TrainingArguments, set_seed

from ...core.compatibility import fsdp_version
from ...data import bbc_task_sequence, tokenize_classification
from ...metrics import load_metric
from ...strategies import StrategyTrainer, strategy_class
from ...task_heads import MultiTaskClassifier
from ...utils.assets import check_model_source
from ...utils.io import atomic_save_safetensors, atomic_write_json
from ..checkpointing import (
    DamagedRunError,
    RunState,
    domain_dir_name,
    file_digests,
    last_trainer_checkpoint,
    publish_dir,
    stage_dir,
    verify_readable,
    verify_stage,
)
from ..cli import check_process_group, register_architectures, user_errors
from ..console import Console
from ..distributed import ProcessInfo, describe_processes
from ..model_loading import load_backbone
from ..strategy_settings import build_strategy
from .config import ContinualFinetuningArguments
from .results import evaluate_all, finetuning_results

__all__ = ["run_continual_finetuning", "build_optimizer"]


def _with_task_ids(dataset, task_id: int):
    return dataset.add_column("task_ids", [task_id] * len(dataset))


def build_optimizer(
    model: MultiTaskClassifier,
    learning_rate: float,
    head_learning_rate: float | None,
    weight_decay: float,
    training_args: TrainingArguments | None = None,
):
    """The optimizer over the trainable parameters: heads at ``head_learning_rate``, the rest at ``learning_rate``.

    Its class and settings come from ``training_args.optim`` (the Trainer's own mapping, so ``--optim`` means what
    it means for the Trainer); without ``training_args``, torch's AdamW. Weight decay applies to matrices only,
    and never to subnetwork scores (it would pull every score to 0).
    """
    head_ids = {id(p) for p in model.heads.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in head_ids
        decay = p.dim() >= 2 and "subnet_scores" not in name
        groups.setdefault((is_head, decay), []).append(p)
    if not groups:
        raise ValueError("no trainable parameters: the strategy froze everything, including the task head")
    param_groups = [
        {
            "params": ps,
            "lr": (head_learning_rate or learning_rate) if is_head else learning_rate,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (is_head, decay), ps in groups.items()
    ]
    if training_args is None:
        return torch.optim.AdamW(param_groups, lr=learning_rate)
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    return cls(param_groups, **{**kwargs, "lr": learning_rate})


def _task_args(training_args: TrainingArguments, out_dir: Path, name: str) -> TrainingArguments:
    """The Trainer settings of one task: as given, with its own checkpoint directory and run name."""
    from dataclasses import replace

    return replace(
        training_args,
        output_dir=str(out_dir / ".trainer" / name),
        run_name=f"{training_args.run_name or 'continual_finetune'}/{name}",
    )


def _save_task(out_dir: Path, name: str, model, strategy, is_main: bool):
    """The resume point after a task: the whole classifier's weights and the strategy's state, published atomically."""
    if not is_main:
        return None
    staging = stage_dir(out_dir, name)
    atomic_save_safetensors(dict(model.state_dict()), staging / "model_state.safetensors")
    strategy.save_pretrained(staging)
    publish_dir(staging, out_dir / name)
    return file_digests(out_dir / name)


def _load_task(directory: Path, model, strategy) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(directory / "model_state.safetensors"))
        # Buffers a strategy adds as tasks finish (TSS/WSN: one bit-packed mask per finished task) do not exist in
        # the freshly built model: create them, then load everything strictly.
        have = set(model.state_dict())
        for key in [k for k in state if k not in have]:
            parent_name, _, leaf = key.rpartition(".")
            parent = model.get_submodule(parent_name)
            parent.register_buffer(leaf, state[key].to(next(model.parameters()).device))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        strategy.load_pretrained(directory)
    except Exception as e:
        raise DamagedRunError(
            f"{directory}: cannot load the finished task ({type(e).__name__}: {e}); restore it, or "
            "use a new --output_dir"
        ) from e


def run_continual_finetuning(args: ContinualFinetuningArguments, callbacks=None, events=None) -> dict:
    """Train ``args.tasks`` in order with ``args.strategy``; write and return the results (see module docstring).

    After every task the classifier and the strategy's state are saved (``output_dir/<k>_<task>/``, listed in
    ``state.json``); rerunning the same command skips finished tasks. ``callbacks``: extra ``TrainerCallback``
    objects for every task's Trainer. ``events(name, **info)``: called at task boundaries ("evaluated",
    "published", "state_saved"); the fault-injection tests install one.
    """
    from accelerate import PartialState

    start = time.time()
    with user_errors():  # start-up: a ValueError or missing file here is the user's (settings, paths, data)
        run = _FinetuneRun(args, callbacks, events)
        state = RunState(run.out_dir, args.fingerprint(), overwrite=args.overwrite_output_dir)
        if run.is_main:
            state.check_writable()
        set_seed(args.seed)
        run.load()
    if run.is_main:
        state.start()  # every setting checked, the model and data loaded: now the directory is this run's
    PartialState().wait_for_everyone()
    initial = run.evaluate_untrained(state) if state.base is None else run.resume(state)
    for t in range(len(state.done), len(run.tasks)):
        run.train_task(t, state)
    results = finetuning_results(args, run.tasks, run.strategy, state.done, initial)
    if not run.is_main:  # evaluation ran on every process; the main one writes
        return results
    run.save_final(results)
    results["total_seconds"] = time.time() - start
    atomic_write_json(run.out_dir / "results.json", results)
    run.say(f"done: ACC {results['acc']:.4f}, BWT {results['bwt']:+.4f}, results in {run.out_dir / 'results.json'}")
    return results


class _FinetuneRun:
    """The steps of :func:`run_continual_finetune`, sharing the run's settings, model, data and strategy."""

    def __init__(self, args: ContinualFinetuningArguments, callbacks, events):
        """Everything checked before the output directory is touched: settings, process group, strategy."""
        self.args = args
        self.callbacks = list(callbacks or [])
        self.event = events or (lambda *a, **k: None)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        _ = args.world_size  # sets up the device and, under a launcher, the process group
        check_process_group("finetuning")
        proc = ProcessInfo.current(cpu=args.device.type == "cpu")
        if proc.torch_only:
            # accelerate sees one process: each would train alone, both writing output_dir (pre-training
            # supports such a group through its model_hook; the finetuning runner has none)
            raise ValueError(
                "the finetuning runner was started in a process group joined by torch.distributed without "
                f"accelerate (world size {proc.world}, accelerate sees {args.world_size}): launch it with "
                "'accelerate launch --num_processes N' (or torchrun) and let the Trainer join the processes"
            )
        self.is_main = args.process_index == 0
        self.say = Console("continual_finetune")
        launch = (args.world_size, args.device, fsdp_version(args) is not None)
        self.say(describe_processes(*launch))  # what the launch gave
        register_architectures(args.register_architecture)
        check_model_source(args.model_name_or_path)
        self.strategy_class = strategy_class(args.strategy)
        if "finetune" not in self.strategy_class.runners:
            raise ValueError(
                f"--strategy {args.strategy}: it does not support continual finetuning "
                f"(its runners: {self.strategy_class.runners})"
            )
        self.out_dir = Path(args.output_dir)

    def load(self) -> None:
        """The task sequence, the classifier with the strategy's preparation, tokenized data and the metrics."""
        args = self.args
        try:
            tasks = bbc_task_sequence(
                args.task_topics(),
                max_train_per_class=args.max_train_per_class,
                max_test_per_class=args.max_test_per_class,
                test_fraction=args.test_fraction,
                seed=args.split_seed,
            )
        except ValueError as e:
            raise ValueError(f"--tasks: {e}") from None
        backbone, tokenizer = load_backbone(args.model_name_or_path)
        model = MultiTaskClassifier(
            backbone,
            [len(t.label_names) for t in tasks],
            [t.name for t in tasks],
            pooling=args.pooling,
            seed=args.seed,
            label_names=[t.label_names for t in tasks],
        )
        self.strategy = build_strategy(self.strategy_class, args.strategy, args.strategy_settings())
        self.model = self.strategy.prepare_model(model)
        self.model.to(args.device)
        self.tasks, self.tokenizer = tasks, tokenizer
        self.collator = DataCollatorWithPadding(tokenizer)
        self.train_sets = [
            _with_task_ids(tokenize_classification(t.train, tokenizer, args.max_length), k)
            for k, t in enumerate(tasks)
        ]
        self.test_loaders = [
            DataLoader(
                _with_task_ids(tokenize_classification(t.test, tokenizer, args.max_length), k),
                batch_size=args.per_device_eval_batch_size,
                collate_fn=self.collator,
            )
            for k, t in enumerate(tasks)
        ]
        self.metrics = {"accuracy": load_metric("accuracy"), "f1": load_metric("f1")}

    def evaluate(self, desc: str) -> list[dict]:
        return evaluate_all(self.model, self.strategy, self.test_loaders, self.metrics, desc)

    def evaluate_untrained(self, state: RunState) -> list[dict]:
        """Row ``R`` of the untrained model (for FWT), recorded as the run's base."""
        initial = self.evaluate("evaluate (untrained)")
        state.set_base({"dir": None, "initial": initial})
        if self.is_main:
            state.save()
        return initial

    def resume(self, state: RunState) -> list[dict]:
        """Skip the finished tasks: reload the newest one's classifier and strategy state; the base row."""
        for d in state.done:
            self.say(f"skipping finished: {d['task']}")
        if state.done:
            last = state.last_dir()
            verify_stage(last, state.done[-1].get("files"))
            _load_task(last, self.model, self.strategy)
            self.say(f"resuming after {last.name}")
        return state.base["initial"]

    def train_task(self, t: int, state: RunState) -> None:
        """Train task ``t`` (from its newest Trainer checkpoint if any), evaluate every task, save the resume point."""
        model, strategy, args, task = self.model, self.strategy, self.args, self.tasks[t]
        name = domain_dir_name(t + 1, task.name)
        self.say(f"task {t + 1}/{len(self.tasks)}: {task.name} ({len(self.train_sets[t])} training examples)")
        model.set_task(t)
        model.train_only_head(t)
        train_loader = DataLoader(
            self.train_sets[t],
            batch_size=args.per_device_train_batch_size,
            shuffle=False,
            collate_fn=self.collator,
        )
        strategy.before_task(model, t, train_loader)
        optimizer = build_optimizer(model, args.learning_rate, args.head_learning_rate, args.weight_decay, args)
        targs = _task_args(args, self.out_dir, name)
        trainer = StrategyTrainer(
            model=model,
            args=targs,
            train_dataset=self.train_sets[t],
            data_collator=self.collator,
            strategy=strategy,
            optimizers=(optimizer, None),
            callbacks=list(self.callbacks),
        )
        resume = last_trainer_checkpoint(targs.output_dir)
        if resume:
            verify_readable(Path(resume), f"delete {resume} and rerun: {task.name} then restarts from its beginning")
            self.say(f"resuming from {resume}")
        t0 = time.time()
        trainer.train(resume_from_checkpoint=resume)
        seconds = time.time() - t0
        after_loader = DataLoader(
            self.train_sets[t], batch_size=args.per_device_eval_batch_size, collate_fn=self.collator
        )
        strategy.after_task(model, t, after_loader)
        row = self.evaluate(f"evaluate after {task.name}")
        self.event("evaluated", name=name)
        self.say(f"after {task.name}: accuracy {[round(r['accuracy'], 4) for r in row]}")
        state.add_domain(
            {
                "dir": name,
                "task": task.name,
                "row": row,
                "train_seconds": seconds,
                "storage_bytes": strategy.storage_bytes.get(t),
                "steps": trainer.state.global_step,
                "resumed_from": Path(resume).name if resume else None,
            }
        )
        self.save_task(name, state, targs.output_dir)
        del trainer

    def save_task(self, name: str, state: RunState, trainer_dir: str) -> None:
        """Publish the task's resume point, record it in state.json, drop the older one and the Trainer checkpoints."""
        digests = _save_task(self.out_dir, name, self.model, self.strategy, self.is_main)
        self.event("published", name=name)
        if not self.is_main:
            return
        state.done[-1]["files"] = digests
        state.save()
        self.event("state_saved", name=name)
        # Only the newest task checkpoint is a resume point; older ones and the task's Trainer checkpoints go.
        for older in state.done[:-1]:  # a kill right after the state update may have left one behind
            shutil.rmtree(self.out_dir / older["dir"], ignore_errors=True)
        shutil.rmtree(trainer_dir, ignore_errors=True)

    def save_final(self, results: dict) -> None:
        """``final/`` (heads, tokenizer, the strategy's backbone and state) and (``plots``) the accuracy heatmap."""
        model, strategy, tasks = self.model, self.strategy, self.tasks
        final = self.out_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        model.save_heads(final)
        self.tokenizer.save_pretrained(final)
        strategy.save_model(model, final)
        if not self.args.plots:
            return
        from ...evaluation.plotting import plot_accuracy_matrix

        plot_accuracy_matrix(
            results["accuracy_matrix"],
            [t.name for t in tasks],
            [t.label_names for t in tasks],
            self.out_dir / "accuracy_matrix.png",
            title=f"{self.args.strategy}: accuracy (ACC {results['acc']:.3f}, BWT {results['bwt']:+.3f})",
        )
