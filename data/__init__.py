"""The dataset folders, each with the prepare.py script that writes it, and the modules those
scripts share to write datasets: preparation.py (text files, downloads, and replacing a dataset
without ever leaving half of one) and corpus.py (web-scale corpora streamed into shards)."""
