"""Shared fixtures: the shipped tiny tokenizer and a tiny model config."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_tokenizer():
    """A fresh copy of the shipped tiny tokenizer (vocabulary 1024, ChatML template)."""
    from instructkit.models.tiny import tiny_tokenizer as load

    return load()


@pytest.fixture
def tiny_model_cfg():
    """A ModelConfig for the ``tiny-llama`` preset on CPU (a fresh object: edit it freely)."""
    from instructkit.config import ModelConfig

    return ModelConfig(name_or_path="tiny-llama", device="cpu")
