"""The soft-mask settings as ``--softmask_<name>`` flags: a dataclass mixin generated from :class:`SoftMaskConfig`.

:class:`~hf_softmask.core.masking.SoftMaskConfig` declares each setting once (type, default, help, choices,
validation).
:class:`SoftMaskArguments` has one ``softmask_<name>`` field per ``SoftMaskConfig`` field, with the same type,
default and metadata, so a setting added there becomes a flag of every ``TrainingArguments`` subclass that
inherits the mixin (``SoftMaskTrainingArguments``, the pre-training runner's arguments). Put the mixin before
``TrainingArguments`` in the bases, so that its ``__post_init__`` runs::

    @dataclass
    class MyArguments(SoftMaskArguments, TrainingArguments): ...
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .masking import SoftMaskConfig

__all__ = ["FLAG_PREFIX", "SoftMaskArguments", "choice_or_bool", "flag_name"]

FLAG_PREFIX = "softmask_"


def flag_name(setting: str) -> str:
    """The field (and flag) name of a :class:`SoftMaskConfig` field: ``mode`` -> ``softmask_mode``."""
    return FLAG_PREFIX + setting


class _BuildsSoftMaskConfig:
    """The methods of :class:`SoftMaskArguments` (its fields are generated below)."""

    def softmask_config(self) -> SoftMaskConfig:
        """The :class:`SoftMaskConfig` of the ``softmask_*`` fields (its ``__post_init__`` validates them)."""
        return SoftMaskConfig(**{f.name: getattr(self, flag_name(f.name)) for f in dataclasses.fields(SoftMaskConfig)})

    def __post_init__(self):
        # A value that argparse's choices did not see (YAML, Python) is refused here, not at the first masked step.
        self.softmask_config()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def choice_or_bool(choices: tuple) -> type:
    """The flag type of a ``Literal`` with ``True``/``False`` among its choices (``Literal["auto", True, False]``).

    HfArgumentParser maps a Literal's value only by ``str(choice)``, so ``true`` or ``1`` would be refused where
    every bool flag takes them; this type reads the bools as its ``string_to_bool`` does (yes/no, true/false,
    t/f, y/n, 1/0, any case) and the other choices by their exact text. Any other text comes back unchanged:
    argparse's ``choices`` refuse it on the command line, ``SoftMaskConfig`` where it came from YAML.
    """
    from transformers.hf_argparser import string_to_bool

    texts = {str(c): c for c in choices if not isinstance(c, bool)}

    class ChoiceOrBool:
        def __new__(cls, text):
            if not isinstance(text, str) or text in texts:
                return texts.get(text, text)
            try:
                return string_to_bool(text)
            except argparse.ArgumentTypeError:
                return text

    ChoiceOrBool.__name__ = ChoiceOrBool.__qualname__ = "|".join(str(c) for c in choices)
    return ChoiceOrBool


def _flag_annotation(annotation):
    """The flag's annotation: HfArgumentParser calls a non-Literal one on the text (see :func:`choice_or_bool`)."""
    choices = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal and any(isinstance(c, bool) for c in choices):
        return choice_or_bool(choices)
    return annotation


def _flag_field(setting: dataclasses.Field, annotation) -> tuple[str, object, dataclasses.Field]:
    if setting.default is not dataclasses.MISSING:
        default = {"default": setting.default}
    else:
        default = {"default_factory": setting.default_factory}
    return (
        flag_name(setting.name),
        _flag_annotation(annotation),
        dataclasses.field(metadata=dict(setting.metadata), **default),
    )


SoftMaskArguments = dataclasses.make_dataclass(
    "SoftMaskArguments",
    [_flag_field(f, typing.get_type_hints(SoftMaskConfig)[f.name]) for f in dataclasses.fields(SoftMaskConfig)],
    bases=(_BuildsSoftMaskConfig,),
)
SoftMaskArguments.__module__ = __name__  # make_dataclass's own ``module=`` needs Python 3.12
SoftMaskArguments.__doc__ = (
    "Dataclass mixin: one ``softmask_<name>`` field per :class:`SoftMaskConfig` field (same type, default, help and "
    "choices) and :meth:`softmask_config`, which builds and so validates the SoftMaskConfig."
)
