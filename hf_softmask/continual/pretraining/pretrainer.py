"""The domain loop of continual pre-training: a strategy over the domains, evaluation after every domain, resume.

Flow (docs/algorithms.md §2-4 for DAS)::

    0_base/      optional LM-head warm-up on general text, the strategy's starting state (DAS: general-knowledge
                 importance), the evaluation row "before training"
    1_<domain>/  train domain 1 with StrategyTrainer (Trainer checkpoints every save_steps), the strategy's
                 after-domain step (DAS: the domain's importance, EMax-accumulated), evaluation on every domain
                 and on general text; written into a staging directory, then renamed
    2_<domain>/  ...

``state.json`` lists the finished stages; a restarted run skips them, reloads the last one and resumes an
unfinished domain from its newest Trainer checkpoint.
"""

from __future__ import annotations

import inspect
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from transformers import set_seed

from ...baselines.domain_training import DomainTraining
from ...core.compatibility import fsdp_version
from ...core.importance import UnitImportance
from ...evaluation.bootstrap import block_losses
from ...strategies.base import StrategyTrainer
from ...strategies.registry import strategy_class
from ...utils.assets import check_model_source
from ...utils.io import atomic_write_json, atomic_write_text
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
from ..console import Console, summary_line
from ..distributed import ProcessInfo, full_state_dict, is_sharded
from ..model_loading import load_model_and_tokenizer, resolve_model_path
from ..strategy_settings import build_strategy, parse_strategy_kwargs
from .config import ADDED_SETTINGS, ContinualPretrainingArguments
from .data import PretrainingData
from .evaluation import perplexity
from .hub_push import HubPusher
from .lm_head_warmup import warm_up_lm_head
from .model_card import model_card
from .result_cache import cache_entry, content_key, publish_entry
from .results import results, write_results

__all__ = ["ContinualPretrainer"]


# -- the runner -------------------------------------------------------------------------------------------------
class ContinualPretrainer:
    """Runs one strategy over the domain sequence of ``args`` into ``args.output_dir`` (see module docstring).

    Args:
        args: the run's settings.
        callbacks: extra ``TrainerCallback`` objects given to every domain's Trainer.
        model_hook: ``model -> model`` applied after the strategy prepared the model (and after every reload on
            resume), e.g. torch's ``fully_shard`` for FSDP2 without accelerate's plugin. Evaluation and the
            gathering of weights for saving run on every process; only the main process writes files.
        events: ``name -> None`` called at each stage boundary ("importance", "evaluated", "staged", "published",
            "state_saved"); the fault-injection tests install one that stops the process there.
    """

    def __init__(self, args: ContinualPretrainingArguments, callbacks=None, model_hook=None, events=None):
        self.args = args
        self.callbacks = list(callbacks or [])
        self.model_hook = model_hook
        self.events = events
        self.proc = ProcessInfo.current(cpu=bool(args.use_cpu) or not torch.cuda.is_available())
        self.out = Path(args.output_dir)
        self.is_main = self.proc.is_main
        self.say = Console("continual_pretrain")  # a console line, from the main process only
        self.rank = self.proc.rank
        self.world = self.proc.world
        self.extras = DomainTraining(args.domain_training_options())
        self.hub = HubPusher(args, self.say)  # finished domains to <hub_model_id>-<k>-<domain>
        self.clock = StageClock()  # wall time of the current stage by kind (train / importance / evaluation / saving)

    # small helpers -----------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"runner": "continual_pretrain", **self.args.fingerprint()}

    def _event(self, event: str, **info) -> None:
        if self.events is not None:
            self.events(event, **info)

    def make_strategy(self):
        a = self.args
        cls = strategy_class(a.strategy)
        if "pretrain" not in cls.runners:
            raise ValueError(
                f"--strategy {a.strategy}: it does not declare 'pretrain' in its runners {cls.runners}; "
                "pick one made for continual pre-training (e.g. das, ncl)"
            )
        offered = dict(
            softmask=a.softmask_config(),
            **a.das_settings(),
            show_progress=self.is_main,
        )
        # Runner-level settings go to the strategies that name them; strategy_kwargs go through as given.
        params = inspect.signature(cls.__init__).parameters
        offered = {k: v for k, v in offered.items() if k in params}
        return build_strategy(cls, a.strategy, parse_strategy_kwargs(a.strategy_kwargs), offered)

    def _prepare(self, model, strategy):
        model = strategy.prepare_model(model).to(self.proc.device)
        return self.model_hook(model) if self.model_hook is not None else model

    def _eval_row(self, model) -> tuple[list[float], float, dict]:
        """Held-out loss on every domain and on general text, computed on EVERY process (a sharded model's
        forward needs all of them), and the per-block losses and label-token counts behind them (the bootstrap
        intervals of the frontier). A strategy with ``set_task`` (HAT) evaluates domain j under its own task
        mask, and general text with its task selection cleared."""
        causal = not self.data.mlm
        strategy = self.strategy
        blocks = {"eval_blocks": [], "eval_tokens": []}
        for j, ev in enumerate(self.data.eval):
            strategy.set_task(j)
            loss, tokens = block_losses(model, ev, causal)
            blocks["eval_blocks"].append(loss)
            blocks["eval_tokens"].append(tokens)
        strategy.set_task(None)
        blocks["general_blocks"], blocks["general_tokens"] = block_losses(model, self.data.general_eval, causal)
        losses = [
            _token_mean(b, t, ev.name)
            for b, t, ev in zip(blocks["eval_blocks"], blocks["eval_tokens"], self.data.eval)
        ]
        general = _token_mean(blocks["general_blocks"], blocks["general_tokens"], "general")
        return losses, general, blocks

    def _base_eval_row(self, model, strategy) -> tuple[list[float], float, dict]:
        """:meth:`_eval_row` before training, read from the cache when another run already evaluated the same
        weights, strategy state and evaluation batches (every rate and seed of a plain-training grid shares it)."""
        key = None
        if not is_sharded(model):  # a sharded model is not keyed
            batches = [
                (f"{ev.name}/{i}/{k}", v)
                for ev in [*self.data.eval, self.data.general_eval]
                for i, b in enumerate(ev.batches)
                for k, v in sorted(b.items())
                if torch.is_tensor(v)
            ]
            key = content_key(
                {
                    "kind": "base evaluation",
                    "version": 1,
                    "causal": not self.data.mlm,
                    "model": type(model).__name__,
                    "strategy": strategy.name,
                    "strategy_config": strategy.config(),
                    "device": next(model.parameters()).device.type,
                },
                [*sorted(model.state_dict().items()), *sorted(strategy.state_dict().items()), *batches],
            )
            entry = cache_entry("base_evaluation", key)
            if (entry / "row.json").is_file():
                row = json.loads((entry / "row.json").read_text())
                self.say(f"evaluation before training: read from the cache {entry} (same weights and data)")
                return row["losses"], row["general"], row["blocks"]
        losses, general, blocks = self._eval_row(model)
        if key is not None and self.is_main:
            row = json.dumps({"losses": losses, "general": general, "blocks": blocks})
            publish_entry(entry, lambda d: (d / "row.json").write_text(row))
        return losses, general, blocks

    def _load_stage_model(self, directory: Path):
        model, _, _ = load_model_and_tokenizer(
            str(directory), "mlm" if self.data.mlm else "clm", tokenizer_path=self.model_path
        )
        return model

    def _training_args(self, name: str, index: int, **overrides):
        """The Trainer settings of one domain: every Trainer field of ``args`` as given, except where the runner
        owns the meaning (its checkpoint directory, per-domain run name, Hub pushes, resume)."""
        from transformers import TrainingArguments

        a = self.args
        kw = {f.name: getattr(a, f.name) for f in fields(TrainingArguments) if f.init}
        kw = {k: getattr(v, "value", v) for k, v in kw.items()}  # enums back to the strings they were given as
        kw.update(
            output_dir=str(self.out / ".trainer" / name),
            push_to_hub=False,
            hub_model_id=None,
            resume_from_checkpoint=None,
            run_name=f"{a.run_name or a.strategy}/{name}",
            disable_tqdm=a.disable_tqdm if a.disable_tqdm is not None else not self.is_main,
            **overrides,
        )
        if self.proc.torch_only:
            # Processes joined by torch alone (fully_shard without accelerate): every Trainer thinks it is the
            # main process, so Trainer checkpoints would be written by all of them; refused in run().
            kw.update(save_strategy="no")
        return TrainingArguments(**kw)

    def _importance_of(self, strategy) -> UnitImportance | None:
        imp = strategy.importance
        return imp if isinstance(imp, UnitImportance) else None

    # stages ------------------------------------------------------------------------------------------------
    def _save_stage(self, name: str, model, tokenizer, strategy, state: RunState, with_weights: bool, title: str):
        """Write stage ``name`` into a staging directory, then rename it into place (main process writes; every
        process takes part in gathering sharded weights)."""
        weights = full_state_dict(model) if with_weights else None
        if not self.is_main:
            return None
        try:
            return self._write_stage(name, model, tokenizer, strategy, state, weights, with_weights, title)
        except OSError as e:
            raise OSError(
                e.errno,
                f"writing stage {name} into {self.out} failed ({e}); free space or fix permissions "
                "and rerun the same command: finished stages are kept and this one is redone",
            ) from e

    def _write_stage(self, name, model, tokenizer, strategy, state, weights, with_weights: bool, title: str):
        staging = stage_dir(self.out, name)
        if with_weights:
            model.save_pretrained(staging, state_dict=weights)
            tokenizer.save_pretrained(staging)
        strategy.save_pretrained(staging)
        imp = self._importance_of(strategy)
        if imp is not None:
            imp.save_pretrained(staging)
        rows = [("before", state.base["eval_loss"] if state.base else [])] + [
            (d["dir"], d["eval_loss"]) for d in state.done
        ]
        general = ([state.base["general_loss"]] if state.base else []) + [d["general_loss"] for d in state.done]
        rows = [(label, [perplexity(v) for v in losses]) for label, losses in rows if losses]
        card = model_card(
            base_model=self.args.model_name_or_path,
            strategy=strategy.config(),
            domains_done=[d["domain"] for d in state.done],
            all_domains=self.data.names,
            objective="mlm" if self.data.mlm else "clm",
            perplexity_rows=rows,
            general_perplexity=[perplexity(g) for g in general],
            settings=self.fingerprint(),
        )
        atomic_write_text(staging / "README.md", card)
        self._plot_importance(strategy, staging, title, name)
        self._event("staged", name=name, directory=staging)
        publish_dir(staging, self.out / name)
        self._event("published", name=name, directory=self.out / name)
        return file_digests(self.out / name)

    def _plot_importance(self, strategy, directory: Path, title: str, name: str) -> None:
        """The stage's own importance (0_base: the general-knowledge proxy) and, below it, the accumulated one that
        ``importance.safetensors`` beside the plot holds; into plots/ and the stage directory."""
        from ...evaluation.plotting import plot_importance

        imp = self._importance_of(strategy)
        if imp is None or not self.args.plots:
            return
        own = imp if name == "0_base" else (strategy.domain_importances or [None])[-1]
        if own is None:
            own_label, extra = "accumulated (= importance.safetensors)", None
            own = imp
        else:
            own_label = "own importance of this stage" if name != "0_base" else "general-knowledge proxy (own)"
            extra = (
                None
                if name == "0_base"
                else {"accumulated, max over all stages (= importance.safetensors)": (imp.heads, imp.ffn)}
            )
        path = plot_importance(
            own.heads,
            own.ffn,
            self.out / "plots" / f"importance_{name}.png",
            title=f"importance after {title}",
            label=own_label,
            extra=extra,
        )
        shutil.copyfile(path, directory / "importance.png")

    def _start(self):
        """Everything that can fail before a file is written: settings, architecture, model, data, strategy."""
        a = self.args
        if a.num_threads:
            torch.set_num_threads(a.num_threads)
        register_architectures(a.register_architecture)
        check_model_source(a.model_name_or_path)
        set_seed(a.seed)
        if self.is_main:  # the GGUF conversion of 'smollm2' is cached once, by the main process
            self.model_path = resolve_model_path(a.model_name_or_path)
        self.proc.barrier()
        self.model_path = resolve_model_path(a.model_name_or_path)
        model, tokenizer, mlm = load_model_and_tokenizer(self.model_path, a.objective, say=self.say)
        self.tokenizer = tokenizer
        self.data = PretrainingData(a, tokenizer, mlm)
        strategy = self.make_strategy()
        model = self._prepare(model, strategy)
        if self.proc.torch_only and str(getattr(a.save_strategy, "value", a.save_strategy)) != "no":
            raise ValueError(
                "processes joined by torch.distributed without accelerate (a model_hook sharding the "
                "model): every process's Trainer would write the same mid-domain checkpoints; pass "
                "--save_strategy no (stages are still saved and resumed) or launch with accelerate"
            )
        self.strategy = strategy
        return model, tokenizer, strategy

    def _stage0(self, model, tokenizer, strategy, state: RunState) -> None:
        a = self.args
        warm = []
        self.clock.start()
        if a.lm_head_warmup_steps > 0:
            with self.clock("train"):
                warm, _ = warm_up_lm_head(
                    model,
                    self.data.general_train,
                    self.data.collator,
                    a.lm_head_warmup_steps,
                    a.lm_head_warmup_lr,
                    a.per_device_train_batch_size,
                    a.seed,
                    say=self.say,
                )
        if strategy.uses_general_importance:
            self.say("general-knowledge importance")
            source = self.data.train[0] if a.general_importance_source == "domain" else self.data.general_train
            with self.clock("importance"):
                strategy.compute_general_importance(
                    model, self.data.importance_loader(source, 0, self.rank, self.world)
                )
            self._event("importance", name="0_base")
        with self.clock("evaluation"):
            losses, general, blocks = self._base_eval_row(model, strategy)
        self._event("evaluated", name="0_base")
        state.set_base(
            {
                "dir": "0_base",
                "eval_loss": losses,
                "general_loss": general,
                **blocks,
                "has_weights": bool(warm),
                "lm_head_warmup_loss": warm[-1] if warm else None,
            }
        )
        with self.clock("saving"):
            digests = self._save_stage(
                "0_base", model, tokenizer, strategy, state, bool(warm), "0_base (general-knowledge proxy)"
            )
        if self.is_main:
            state.base["files"] = digests
            state.base["seconds"] = self.clock.seconds()
            state.save()
            self._event("state_saved", name="0_base")

    def _domain(self, k: int, model, tokenizer, strategy, state: RunState) -> None:
        """Domain ``k``: the strategy's before step, training, its after step, evaluation, the published stage."""
        dom = self.data.domains[k]
        name = domain_dir_name(k + 1, dom.name)
        self.say(f"domain {k + 1}/{len(self.data.domains)}: {dom.name}")
        self.clock.start()
        loader = self.data.importance_loader(self.data.train[k], k + 1, self.rank, self.world)
        # The strategy's passes (importance with dropout views) draw from torch's RNG: seed them per stage so that
        # a rerun reaching this point by another path (resumed, Trainer checkpoint at the last step) draws the same.
        set_seed(self.args.seed + 7919 * (k + 1))
        self.extras.before_domain(model)  # the WiSE-FT snapshot: the weights before the strategy's hooks
        with self.clock("importance"):
            strategy.before_task(model, k, loader)
        with self.clock("train"):
            trainer, resume, seconds = self._train(k, name, model, strategy)
        set_seed(self.args.seed + 7919 * (k + 1) + 1)
        with self.clock("importance"):
            strategy.after_task(model, k, loader)
            merged = self.extras.after_domain(model)  # WiSE-FT, after the strategy's own step (e.g. the LoRA merge)
        self._event("importance", name=name)
        contrast = strategy.contrastive_losses
        with self.clock("evaluation"):
            losses, general, blocks = self._eval_row(model)
        self._event("evaluated", name=name)
        state.add_domain(
            {
                "dir": name,
                "domain": dom.name,
                "eval_loss": losses,
                "general_loss": general,
                **blocks,
                "merged_parameters": merged,
                "resumed_from": Path(resume).name if resume else None,
                "steps": trainer.state.global_step,
                "train_seconds": seconds,
                "final_train_loss": _last_train_loss(trainer),
                "mean_contrastive_loss": (sum(contrast) / len(contrast)) if contrast else None,
            }
        )
        self._publish_domain(name, model, tokenizer, strategy, state, trainer.args.output_dir)

    def _train(self, k: int, name: str, model, strategy):
        """Train domain ``k`` with a StrategyTrainer, from its newest Trainer checkpoint if there is one; returns
        ``(trainer, checkpoint resumed from or None, seconds)``."""
        a, extras = self.args, self.extras
        steps = a.max_steps
        # num_batches from the TrainingArguments' world size (what the Trainer shards by), see docs/baselines.md.
        train_set = extras.train_dataset(
            k,
            self.data.train,
            self.data.general_train,
            batch_size=a.per_device_train_batch_size,
            seed=a.seed + k,
            num_batches=steps * a.gradient_accumulation_steps * a.world_size if steps > 0 else None,
            names=self.data.names,
        )
        targs = self._training_args(name, k, **extras.training_overrides(train_set))
        trainer = StrategyTrainer(
            model=model,
            args=targs,
            train_dataset=train_set,
            data_collator=self.data.train_collator,
            strategy=strategy,
            # The EMA first: its state is written beside a checkpoint before any user callback sees the save.
            callbacks=extras.callbacks() + list(self.callbacks),
        )
        resume = last_trainer_checkpoint(targs.output_dir)
        if resume:
            domain = self.data.domains[k].name
            verify_readable(
                Path(resume),
                f"delete {resume} and rerun: {domain} then restarts from its previous checkpoint or its beginning",
            )
            self.say(f"resuming from {resume}")
        t0 = time.time()
        trainer.train(resume_from_checkpoint=resume)
        return trainer, resume, time.time() - t0

    def _publish_domain(self, name: str, model, tokenizer, strategy, state: RunState, trainer_dir: str) -> None:
        """Save the finished domain's stage and record it; drop what is no longer a resume point; push if asked."""
        with self.clock("saving"):
            digests = self._save_stage(name, model, tokenizer, strategy, state, True, name)
        if not self.is_main:
            return
        state.done[-1]["files"] = digests
        state.done[-1]["seconds"] = self.clock.seconds()
        state.save()
        self._event("state_saved", name=name)
        write_results(self.args, self.data, state)
        shutil.rmtree(trainer_dir, ignore_errors=True)
        if self.args.keep_domain_weights == "last" and len(state.done) > 1:
            _drop_weights(self.out / state.done[-2]["dir"])
        if self.args.push_to_hub:
            self.hub.push_pending(state)

    def run(self) -> dict:
        self.say(self.proc.describe(sharded=fsdp_version(self.args) is not None or self.proc.torch_only))  # the launch
        with user_errors():  # start-up: a ValueError or missing file here is the user's (settings, paths, data)
            check_process_group("pre-training")
            state = RunState(
                self.out, self.fingerprint(), overwrite=self.args.overwrite_output_dir, added_settings=ADDED_SETTINGS
            )
            if self.is_main:
                state.check_writable()
            model, tokenizer, strategy = self._start()
        self.proc.barrier()
        if self.is_main:
            state.start()
            atomic_write_json(self.out / "run_config.json", self.args.to_dict())
        if state.base is None:
            self._stage0(model, tokenizer, strategy, state)
        else:
            model = self._resume(model, strategy, state)
        self.proc.barrier()
        for k in range(len(state.done), len(self.data.domains)):
            self._domain(k, model, tokenizer, strategy, state)
            self.proc.barrier()
        self.model = model
        return self._finish(state)

    def _resume(self, model, strategy, state: RunState):
        """Skip the finished stages: check the last one's files, reload its weights and the strategy's state."""
        last = state.last_dir()
        record = state.done[-1] if state.done else state.base
        verify_stage(last, record.get("files"))
        for d in [state.base] + state.done:
            self.say(f"skipping finished: {d.get('domain', d['dir'])}")
        try:
            if state.done or state.base.get("has_weights"):
                model = self._prepare(self._load_stage_model(last), strategy)
            strategy.load_pretrained(last)
        except Exception as e:  # the checksums matched: a file written wrongly, or by another version
            raise DamagedRunError(
                f"{last}: cannot load the finished stage ({type(e).__name__}: {e}); "
                "restore it, or use a new --output_dir"
            ) from e
        if len(state.done) == len(self.data.domains):
            self.say(f"every domain is finished (last: {last.name}); nothing to train, the results are rewritten")
        else:
            self.say(f"resuming after {last.name}")
        return model

    def _finish(self, state: RunState) -> dict:
        """The results (written by the main process); a failed Hub push is an error once everything is saved."""
        res = write_results(self.args, self.data, state) if self.is_main else results(self.args, self.data, state)
        totals = res.get("stage_seconds_total") or {}
        if totals:
            self.say("wall time by stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items()))
        unpushed = self.hub.check(state) if self.is_main else []
        if self.is_main:
            # every domain's Trainer checkpoints went with its published stage: no resume point is left in there
            shutil.rmtree(self.out / ".trainer", ignore_errors=True)
            self.say(summary_line(res, self.out))
        self.proc.barrier()
        if unpushed:
            raise RuntimeError(
                f"not pushed to the Hub: {', '.join(unpushed)}. Everything is saved in {self.out}; "
                "see push_error in state.json and rerun the same command to retry"
            )
        return res


class StageClock:
    """Wall seconds of one stage by kind: ``with clock("train"): ...``; :meth:`seconds` reads them."""

    KINDS = ("train", "importance", "evaluation", "saving")

    def start(self) -> None:
        self._seconds = dict.fromkeys(self.KINDS, 0.0)

    @contextmanager
    def __call__(self, kind: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[kind] += time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._seconds.items()}


def _token_mean(losses: list[float], tokens: list[int], name: str) -> float:
    """The token-weighted mean of per-block losses: the held-out loss of the whole evaluation set."""
    total = sum(tokens)
    if total == 0:
        raise ValueError(f"evaluation set {name!r} has no label tokens (MLM probability too low or all padding)")
    return sum(v * n for v, n in zip(losses, tokens)) / total


def _last_train_loss(trainer) -> float | None:
    for entry in reversed(trainer.state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


def _drop_weights(directory: Path) -> None:
    for f in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        f.unlink()
