"""Turn any UTF-8 text file into a dataset folder that train.py can read.

python data/prepare.py --input my_book.txt --tokenizer char --out_dir data/my_book
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

from data.preparation import ArgumentParser, prepare_file  # noqa: E402
from data.dataset import DataError  # noqa: E402


def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, required=True, help="the UTF-8 text file to tokenize")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], default="char",
                   help="char: one token per distinct character; gpt2: GPT-2's BPE "
                        "(default: %(default)s)")
    p.add_argument("--out_dir", type=Path, required=True,
                   help="folder to write train.bin, val.bin and meta.json into")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="share of the text, taken from its end, kept for validation "
                        "(default: %(default)s)")
    args = p.parse_args(argv)
    try:
        return prepare_file(args.input, args.out_dir, args.tokenizer, args.val_fraction)
    except DataError as e:
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    main()
