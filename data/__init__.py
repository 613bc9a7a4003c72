"""The data: dataset.py reads a prepared dataset (the token files and the one batch sampler that
training, evaluation and the tests share) and tokenizer.py turns text into token ids and back.
The dataset folders each hold the prepare.py script that writes them; the modules those scripts
share are preparation.py (text files, downloads, and replacing a dataset without ever leaving
half of one) and corpus.py (web-scale corpora streamed into shards)."""
