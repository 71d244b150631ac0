"""Shared fixtures; the builders they call live in helpers.py."""

from __future__ import annotations

import pytest
from helpers import build_tiny_model
from transformers import AutoTokenizer

from epee_core.engine.backbones import minilm_path
from epee_core.engine.model import EarlyExitModel


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture
def tiny_model(tokenizer) -> EarlyExitModel:
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    """A tiny text model saved as a model directory (one per test module)."""
    directory = tmp_path_factory.mktemp("tiny-model") / "model"
    build_tiny_model(tokenizer).save_pretrained(directory)
    return directory
