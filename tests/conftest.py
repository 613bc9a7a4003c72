"""Shared fixtures: the offline files in ../shared and a tiny model configuration.

Tests must run without network. Everything they need lives in ../shared beside the project
root (or in the folder named by NANOGPT_SHARED); a missing file is an error, not a skip.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/helpers.py

SHARED = Path(os.environ.get("NANOGPT_SHARED", ROOT.parent / "shared"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
GPT2_ENCODER = SHARED / "data" / "gpt2" / "encoder.json"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"test data missing: {path} (set NANOGPT_SHARED to the folder holding data/)")
    return path


# The GPT-2 tokenizer reads its vocabulary from here when offline; see tokenizer.py.
os.environ.setdefault("GPT2_VOCAB", str(GPT2_ENCODER))


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return _require(SHAKESPEARE)


@pytest.fixture(scope="session")
def gpt2_vocab_path() -> Path:
    return _require(GPT2_ENCODER)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_path):
    """A character dataset of the first 100,000 characters of Tiny Shakespeare."""
    from data.preparation import prepare_text
    folder = tmp_path_factory.mktemp("shakespeare_char")
    prepare_text(shakespeare_path.read_text()[:100_000], folder, "char")
    return folder
