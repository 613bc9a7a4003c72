"""Commands beside the run, each `python -m tools.NAME` from the repository's root: bench (speed
of training, sampling and serving), estimate (a run's time, cost and memory before running it),
export (a checkpoint as a transformers folder), plot (loss curves), hellaswag (the evaluation),
load (a serving.http server's latency against throughput, under Poisson arrivals).
"""
from training import process

process.limit_openmp_spin()  # before any tool imports torch: OpenMP reads it once
