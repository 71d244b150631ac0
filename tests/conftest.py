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
