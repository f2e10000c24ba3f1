"""Architecture registry: where attention heads and FFN neurons live, per model family.

Everything here is data. Adding a family means calling :func:`register_architecture`
with module paths; no code elsewhere branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "ArchitectureSpec",
    "UnsupportedModelError",
    "register_architecture",
    "get_architecture",
    "supported_model_types",
    "is_encoder_type",
]


class UnsupportedModelError(ValueError):
    """Raised for a model type that no :class:`ArchitectureSpec` describes."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one model family, relative to ``model.base_model`` (for a PEFT-wrapped model: the base model
    of the transformers model under the wrapper; the module found at a path may then be an adapter layer).

    Attributes:
        layers: path of the ``ModuleList`` of transformer blocks.
        query, key, value: projections whose OUTPUT features are split by head.
            For a fused projection (GPT-2 ``c_attn``) give the same path three times
            and set ``fused_qkv``.
        attn_out: projection whose INPUT features are split by head (gated by a pre-hook).
        ffn_in: projections whose OUTPUT features are the FFN neurons (up/gate).
        ffn_out: projection whose INPUT features are the FFN neurons (gated by a pre-hook).
        ffn_act: the activation module applied to the one ``ffn_in`` projection's output, for FFN gates before the
            activation (``ffn_gate="before_activation"``); None where there is none to gate (gated MLPs).
        num_heads_attr / num_kv_heads_attr / ffn_size_attr: config attribute names.
        conv1d: weights are stored ``[in, out]`` (transformers ``Conv1D``).
        fused_qkv: q, k and v live in one projection, in thirds of its output.
        encoder: a bidirectional encoder family pre-trained as a masked LM; its checkpoints are masked LMs even when
            saved as the bare model (e.g. "BertModel").
    """

    layers: str
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str | None = None
    ffn_size_attr: str = "intermediate_size"
    conv1d: bool = False
    fused_qkv: bool = False
    encoder: bool = False
    ffn_act: str | None = None
    extra: dict = field(default_factory=dict)

    def projections(self, which: str = "all") -> tuple[str, ...]:
        """Paths (relative to a block) of the attention and/or FFN projections, each once: what TSS/WSN score and
        LoRA adapts by default. ``which``: ``all``, ``attention`` or ``ffn``."""
        if which not in ("all", "attention", "ffn"):
            raise ValueError(f"which must be 'all', 'attention' or 'ffn', got {which!r}")
        paths = []
        if which in ("all", "attention"):
            paths += [self.query, self.key, self.value, self.attn_out]
        if which in ("all", "ffn"):
            paths += [*self.ffn_in, self.ffn_out]
        return tuple(dict.fromkeys(paths))  # a fused q/k/v projection (GPT-2 c_attn) is named three times


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(
    model_types: str | list[str] | tuple[str, ...], spec: ArchitectureSpec, *, overwrite: bool = False
) -> None:
    """Register ``spec`` for one or more ``config.model_type`` values.

    Example::

        register_architecture("my-bert", ArchitectureSpec(
            layers="encoder.layer", query="attention.self.query", key="attention.self.key",
            value="attention.self.value", attn_out="attention.output.dense",
            ffn_in=("intermediate.dense",), ffn_out="output.dense"))
    """
    if isinstance(model_types, str):
        model_types = [model_types]
    for model_type in model_types:
        if model_type in _REGISTRY and not overwrite:
            raise ValueError(f"model_type {model_type!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def is_encoder_type(model_type: str | None) -> bool:
    """True for a registered model type whose spec is an ``encoder`` (a masked-LM family)."""
    spec = _REGISTRY.get(model_type)
    return spec is not None and spec.encoder


def get_architecture(model_type: str) -> ArchitectureSpec:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"hf_softmask has no unit layout for model_type {model_type!r}. "
            f"Supported: {', '.join(supported_model_types())}. "
            "Register one with hf_softmask.register_architecture(model_type, ArchitectureSpec(layers=..., query=..., "
            "key=..., value=..., attn_out=..., ffn_in=(...), ffn_out=...)), giving module paths relative to "
            "model.base_model."
        ) from None


_BERT = ArchitectureSpec(
    layers="encoder.layer",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    encoder=True,
    ffn_act="intermediate.intermediate_act_fn",
)
_DISTILBERT = ArchitectureSpec(
    layers="transformer.layer",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attn_out="attention.out_lin",
    ffn_in=("ffn.lin1",),
    ffn_out="ffn.lin2",
    num_heads_attr="n_heads",
    ffn_size_attr="hidden_dim",
    encoder=True,
    ffn_act="ffn.activation",
)
_GPT2 = ArchitectureSpec(
    layers="h",
    query="attn.c_attn",
    key="attn.c_attn",
    value="attn.c_attn",
    attn_out="attn.c_proj",
    ffn_in=("mlp.c_fc",),
    ffn_out="mlp.c_proj",
    num_heads_attr="n_head",
    ffn_size_attr="n_inner",
    conv1d=True,
    fused_qkv=True,
    ffn_act="mlp.act",
)
_LLAMA = ArchitectureSpec(
    layers="layers",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    num_kv_heads_attr="num_key_value_heads",
)

register_architecture(["bert", "roberta", "xlm-roberta", "electra"], _BERT)
register_architecture("distilbert", _DISTILBERT)
register_architecture("gpt2", _GPT2)
register_architecture(["llama", "mistral", "qwen2", "qwen3"], _LLAMA)
