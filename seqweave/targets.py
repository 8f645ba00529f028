"""Resolve a CLI TARGET: a built-in sample name or `package.module:function` -> (model, inputs)."""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import Any

import torch

from seqweave.errors import TargetError
from seqweave.testing.models import BUILDERS, SampleSpec, build_sample


def load_target(target: str, sample: SampleSpec) -> tuple[torch.nn.Module, dict[str, Any] | tuple]:
    """Built-in samples take their sizes from `sample`; a `module:function` target is called with no arguments."""
    if target in BUILDERS:
        return build_sample(replace(sample, name=target))
    if ":" not in target:
        raise TargetError(f"unknown target {target!r}",
                          hint=f"use a built-in sample ({', '.join(sorted(BUILDERS))}) or package.module:function")
    module_name, function_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TargetError(f"cannot import {module_name!r}: {error}", hint="check the module path and PYTHONPATH") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise TargetError(f"{module_name} has no function {function_name!r}",
                          hint="the function must return (model, example_inputs)")
    return _checked(target, function())


def _checked(target: str, result: Any) -> tuple[torch.nn.Module, dict[str, Any] | tuple]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TargetError(f"{target} returned {type(result).__name__}, not (model, example_inputs)",
                          hint="return a (torch.nn.Module, dict-of-kwargs or tuple-of-args) pair")
    if not isinstance(result[1], (dict, tuple, list)):
        raise TargetError(f"{target}: example_inputs is a {type(result[1]).__name__}",
                          hint="pass a dict of keyword inputs or a tuple of positional inputs")
    return result


def call_model(model: Any, inputs: dict[str, Any] | tuple) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)
