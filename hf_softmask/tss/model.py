"""SubnetworkModel: a PEFT ``BaseTuner`` that injects scored layers and manages the per-task subnetworks."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from tqdm.auto import tqdm

from ..core.architectures import get_architecture, supported_model_types
from ..utils.io import HubUploadMixin, atomic_save_safetensors
from .config import SubnetworkConfig
from .layer import SUPPORTED_LAYER_TYPES, SubnetworkLayer, SubnetworkLinear

__all__ = ["SubnetworkModel", "get_subnetwork_model", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "TARGET_MODULES_MAPPING"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class _ArchitectureTargets(Mapping):
    """Default scored layers per model type, read from the architecture table (hf_softmask/core/architectures.py):
    every attention and FFN projection of each block, as PEFT suffix patterns. A registered architecture gets
    TSS/WSN defaults with no second table to keep in step."""

    def __getitem__(self, model_type: str) -> list[str]:
        if model_type not in supported_model_types():
            raise KeyError(model_type)
        return list(get_architecture(model_type).projections())

    def __iter__(self):
        return iter(supported_model_types())

    def __len__(self) -> int:
        return len(supported_model_types())


TARGET_MODULES_MAPPING: Mapping[str, list[str]] = _ArchitectureTargets()


class SubnetworkModel(HubUploadMixin, BaseTuner):
    """Per-task binary subnetworks of a pretrained model (TSS, WSN).

    ``set_task(t)`` selects the subnetwork every scored layer uses; ``finish_task(t)`` freezes the live scores'
    mask as task ``t``'s (bit-packed). ``save_pretrained`` writes ``adapter_config.json`` and
    ``adapter_model.safetensors`` like a LoRA adapter; ``from_pretrained(base_model, path)`` restores every task.
    """

    hub_commit_message = "Upload subnetwork adapter"

    prefix: str = "subnet_"
    tuner_layer_cls = SubnetworkLayer
    target_module_mapping = TARGET_MODULES_MAPPING

    def __init__(
        self,
        model: nn.Module,
        config: SubnetworkConfig,
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict=None,
    ):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self.task: int | None = None

    # -- peft tuner hooks ----------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SubnetworkConfig, model_config: dict) -> SubnetworkConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"no default target_modules for model type {model_type!r} "
                    f"(known: {', '.join(sorted(self.target_module_mapping))}); "
                    "pass SubnetworkConfig(target_modules=[...]) or target_modules='all-linear'"
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
        return peft_config

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        if isinstance(target, SubnetworkLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, SUPPORTED_LAYER_TYPES):
            raise TypeError(
                f"target module {current_key!r} is a {type(target).__name__}; "
                "subnetworks support nn.Linear and Conv1D. "
                "Narrow target_modules (or add it to exclude_modules)."
            )
        new_module = SubnetworkLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: SubnetworkConfig, adapter_name: str) -> None:
        if config.train_base_weights:
            for layer in self.subnetwork_layers().values():
                layer.get_base_layer().weight.requires_grad_(True)

    # -- layers and tasks ----------------------------------------------------------------------------
    @property
    def adapter_name(self) -> str:
        return self.active_adapters[0]

    @property
    def subnetwork_config(self) -> SubnetworkConfig:
        return self.peft_config[self.adapter_name]

    def subnetwork_layers(self) -> dict[str, SubnetworkLayer]:
        """Scored layers by module name (relative to the wrapped model)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SubnetworkLayer)}

    def set_task(self, task: int | None) -> None:
        """Use task ``task``'s subnetwork in every forward (its stored mask if finished, the live scores otherwise)."""
        self.task = task
        for layer in self.subnetwork_layers().values():
            layer.task = task

    def finished_tasks(self) -> list[int]:
        layers = list(self.subnetwork_layers().values())
        return layers[0].finished_tasks(self.adapter_name) if layers else []

    def finish_task(self, task: int) -> int:
        """Store the live scores' masks as task ``task``'s subnetwork; returns its storage in bytes."""
        return sum(layer.store_task_mask(self.adapter_name, task) for layer in self.subnetwork_layers().values())

    def storage_bytes(self, task: int) -> int:
        """Bytes of finished task ``task``'s bit-packed masks (1 bit per scored weight)."""
        return sum(layer.storage_bytes(self.adapter_name, task) for layer in self.subnetwork_layers().values())

    def num_scored_weights(self) -> int:
        return sum(layer.get_base_layer().weight.numel() for layer in self.subnetwork_layers().values())

    def score_parameters(self) -> dict[str, nn.Parameter]:
        return {name: layer.subnet_scores[self.adapter_name] for name, layer in self.subnetwork_layers().items()}

    def task_masks(self, task: int) -> dict[str, torch.Tensor]:
        """Bool mask of finished ``task`` per scored layer."""
        return {name: layer.task_mask(self.adapter_name, task) for name, layer in self.subnetwork_layers().items()}

    def mask_density(self, task: int | None = None) -> float:
        """Fraction of scored weights kept by ``task`` (a finished one) or by the live scores (``None``)."""
        kept = total = 0
        for layer in self.subnetwork_layers().values():
            m = layer.binary_mask(self.adapter_name) if task is None else layer.task_mask(self.adapter_name, task)
            kept += int(m.sum())
            total += m.numel()
        return kept / max(total, 1)

    # -- importance of the scores --------------------------------------------------------------------
    def importance(self) -> dict[str, torch.Tensor]:
        """Accumulated (EMax) importance of the scores per layer, in [0, 1] (empty before the first accumulation)."""
        a = self.adapter_name
        return {
            name: layer.subnet_importance[a]
            for name, layer in self.subnetwork_layers().items()
            if a in layer.subnet_importance
        }

    @torch.enable_grad()
    def compute_score_importance(
        self,
        loss_fn: Callable[[dict], torch.Tensor],
        batches: Iterable[dict],
        max_batches: int | None = None,
        desc: str = "score importance",
        zero_unused: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Importance of each weight of the current subnetwork: virtual ``alpha`` (ones) multiplies ``W ⊙ mask``;
        ``|d loss / d alpha|`` is summed over batches and normalized per output row (``|tanh(z)|``; with
        ``zero_unused`` over the subnetwork's weights only, the others get 0, see
        :meth:`SubnetworkLayer.finish_importance`). ``loss_fn(batch)`` returns the task loss. The gradient is taken
        with respect to alpha alone (``torch.autograd.grad``): no ``.grad`` is left on any parameter, task heads
        outside this model included.
        """
        layers = self.subnetwork_layers()
        grad_state = {p: p.requires_grad for p in self.model.parameters()}
        for p in grad_state:
            p.requires_grad_(False)  # no weight gradients are needed: a cheaper backward
        alphas = [layer.start_importance() for layer in layers.values()]
        n = 0
        try:
            for batch in tqdm(batches, desc=desc, leave=False, total=max_batches):
                if max_batches is not None and n >= max_batches:
                    break
                grads = torch.autograd.grad(loss_fn(batch), alphas, allow_unused=True)
                for layer, g in zip(layers.values(), grads):
                    layer.accumulate_importance(g)
                n += 1
        finally:
            for p, req in grad_state.items():
                p.requires_grad_(req)
        if n == 0:
            for layer in layers.values():
                layer.finish_importance()
            raise ValueError("compute_score_importance got no batches; pass the task's training data")
        return {name: layer.finish_importance(name, zero_unused=zero_unused) for name, layer in layers.items()}

    @torch.no_grad()
    def accumulate_importance(self, importance: dict[str, torch.Tensor]) -> None:
        """EMax: accumulated importance <- max(accumulated, ``importance``) (allocated by the first call)."""
        a = self.adapter_name
        for name, layer in self.subnetwork_layers().items():
            new = importance[name].to(layer.get_base_layer().weight.device, torch.float32)
            if a not in layer.subnet_importance:
                layer.subnet_importance[a] = new.clone()
            else:
                acc = layer.subnet_importance[a]
                acc.copy_(torch.maximum(acc, new))

    # -- persistence ---------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What ``save_pretrained`` writes: every finished task's packed masks (+ live scores, importance, trained
        base weights as configured)."""
        cfg = self.subnetwork_config
        a = self.adapter_name
        state = {}
        for name, layer in self.subnetwork_layers().items():
            for t in layer.finished_tasks(a):
                state[f"{name}.subnet_masks.{t}"] = layer.subnet_masks[a][str(t)]
            if cfg.save_training_state:
                state[f"{name}.subnet_scores"] = layer.subnet_scores[a]
                if a in layer.subnet_importance:
                    state[f"{name}.subnet_importance"] = layer.subnet_importance[a]
            if cfg.train_base_weights:
                state[f"{name}.base_layer.weight"] = layer.get_base_layer().weight
        return state

    def save_pretrained(self, save_directory: str | os.PathLike, **_) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically) into ``save_directory``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "finished_tasks": json.dumps(self.finished_tasks())}
        atomic_save_safetensors(self.adapter_state_dict(), save_directory / ADAPTER_WEIGHTS, metadata=meta)
        self.subnetwork_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path_or_repo: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        **hub_kwargs,
    ) -> SubnetworkModel:
        """Wrap ``model`` (the same base model the adapter was trained on) and restore every saved subnetwork."""
        from safetensors.torch import load_file

        path = Path(path_or_repo)
        if path.is_dir():
            weights, config_file = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
            if not weights.is_file() or not config_file.is_file():
                raise FileNotFoundError(
                    f"{path} holds no subnetwork adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)"
                )
        else:
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(str(path_or_repo), ADAPTER_WEIGHTS, revision=revision, **hub_kwargs)
            config_file = hf_hub_download(str(path_or_repo), ADAPTER_CONFIG, revision=revision, **hub_kwargs)
        config = SubnetworkConfig.from_peft_type(**json.loads(Path(config_file).read_text()))
        config.inference_mode = not is_trainable
        tuner = cls(model, config, adapter_name)
        tuner.load_adapter_state_dict(load_file(str(weights)))
        if not is_trainable:
            tuner.requires_grad_(False)
        return tuner

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        a = self.adapter_name
        layers = self.subnetwork_layers()
        unused = set(state)
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            prefix = f"{name}.subnet_masks."
            for key in [k for k in state if k.startswith(prefix)]:
                layer.subnet_masks[a][key[len(prefix) :]] = state[key].to(weight.device)
                unused.discard(key)
            imp_key = f"{name}.subnet_importance"
            if imp_key in state and a not in layer.subnet_importance:
                layer.subnet_importance[a] = torch.zeros_like(weight, dtype=torch.float32)
            for key, target in (
                (f"{name}.subnet_scores", layer.subnet_scores[a]),
                (f"{name}.base_layer.weight", weight),
                (imp_key, layer.subnet_importance[a] if a in layer.subnet_importance else None),
            ):
                if key in state:
                    if state[key].shape != target.shape:
                        raise ValueError(
                            f"{key}: saved shape {tuple(state[key].shape)} != model's {tuple(target.shape)}; "
                            "load the adapter on the base model it was trained on"
                        )
                    target.copy_(state[key])
                    unused.discard(key)
            layer._mask_cache = None
        if unused:
            raise ValueError(
                f"adapter holds entries for layers this model lacks: {sorted(unused)[:5]}...; "
                "is it the base model the adapter was trained on?"
            )


def get_subnetwork_model(model: nn.Module, config: SubnetworkConfig, adapter_name: str = "default") -> SubnetworkModel:
    """Wrap ``model`` so that the layers matched by ``config.target_modules`` carry per-task subnetworks.

    Everything but the scores (and, with ``train_base_weights``, the scored weights) is frozen.
    """
    if isinstance(model, BaseTunerLayer) or isinstance(model, BaseTuner):
        raise TypeError("model is already a PEFT tuner; pass the base transformers model")
    return SubnetworkModel(model, config, adapter_name)
