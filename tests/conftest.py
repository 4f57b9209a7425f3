"""Fixtures shared by the test files; what they build on is in tests/helpers/."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.app import choice_rows, classification_rows, prompt_rows, write_jsonl


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def data_files(tmp_path):
    """One small JSONL file per data shape."""
    return {
        "classification": write_jsonl(tmp_path / "cls.jsonl", classification_rows()),
        "choice": write_jsonl(tmp_path / "mc.jsonl", choice_rows()),
        "prompt": write_jsonl(tmp_path / "pr.jsonl", prompt_rows()),
    }
