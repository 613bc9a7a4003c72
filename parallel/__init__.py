"""The parallelism chapter: one run spread over many processes, each page one way of spreading it,
and each proven to train the same model as one process (tests/test_tp.py, tests/test_fsdp.py).

Read in this order:
- mesh.py: the grid of processes (the device mesh), and which layouts can run.
- data_parallel.py: by the data. DDP keeps the whole model on every rank and averages the
  gradients; FSDP keeps 1/dp of the weights, gradients and optimizer state on each.
- tensor_parallel.py: by the model. The ranks of a row split every Block (Megatron's layout).
- state.py: a spread run's state gathered into the one checkpoint format, and spread back.

2-D is tensor parallel inside a row and FSDP down the columns (DDP cannot wrap DTensors). What
the training step itself does differently under each (gradients exchanged at the last
micro-step only, norms over shards) is in training/step.py.
"""
