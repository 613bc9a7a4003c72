"""OpenWebText, the open copy of GPT-2's WebText that nanoGPT trains on, in GPT-2 tokens.

    python data/openwebtext/prepare.py                         # download with `datasets`
    python data/openwebtext/prepare.py --input owt/ --num_proc 8  # or your own local files

About 8M documents and 9B tokens: train_000000.bin, ... of 100M tokens (200 MB) each, and
val_000000.bin, the first 5M tokens (nanoGPT's val.bin, a random 0.05% of the documents, has
4.4M). The download (Skylion007/openwebtext on the Hugging Face hub) takes tens of GB of disk
in the `datasets` cache; memory stays about one shard.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, so this runs from any folder

from data.corpus import corpus_main  # noqa: E402


def main(argv=None):
    return corpus_main(argv, __doc__, HERE, hub=("Skylion007/openwebtext", None),
                       val_tokens=5_000_000)


if __name__ == "__main__":
    main()
