"""Tiny Shakespeare as characters: a 65-symbol vocab and about a million training tokens.

python data/shakespeare_char/prepare.py [--input input.txt] [--out_dir DIR]
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, so this runs from any folder

from data.preparation import shakespeare_main  # noqa: E402


def main(argv=None):
    return shakespeare_main(argv, tokenizer_kind="char", script_dir=HERE)


if __name__ == "__main__":
    main()
