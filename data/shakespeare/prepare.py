"""Tiny Shakespeare in GPT-2 BPE tokens: about 300K training tokens, the vocab of GPT-2.

python data/shakespeare/prepare.py [--input input.txt] [--out_dir DIR]
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, so this runs from any folder

from data.preparation import shakespeare_main  # noqa: E402


def main(argv=None):
    return shakespeare_main(argv, tokenizer_kind="gpt2", script_dir=HERE)


if __name__ == "__main__":
    main()
