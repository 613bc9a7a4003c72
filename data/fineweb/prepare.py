"""FineWeb-Edu's 10B-token sample, educational web pages that train a GPT-2 faster, in GPT-2
tokens, sharded as llm.c shards them.

    python data/fineweb/prepare.py                                # download with `datasets`
    python data/fineweb/prepare.py --input fineweb/*.parquet --num_proc 8  # or local files

About 10B tokens in shards of 100M (200 MB). As in llm.c's fineweb.py, the first 100M tokens
are the validation shard and <|endoftext|> precedes each document, so val_000000.bin holds
the tokens of llm.c's shard 0 and train_{k}.bin those of its shard k + 1 (llm.c's files add a
1 KB header). The download (HuggingFaceFW/fineweb-edu, sample-10BT) takes tens of GB of
disk in the `datasets` cache; memory stays about one shard.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, so this runs from any folder

from data.corpus import corpus_main  # noqa: E402


def main(argv=None):
    return corpus_main(argv, __doc__, HERE, hub=("HuggingFaceFW/fineweb-edu", "sample-10BT"),
                       val_tokens=100_000_000)


if __name__ == "__main__":
    main()
