"""The parallelism chapter: one run spread over many processes, each page one way of spreading it,
and each proven to train the same model as one process (tests/test_tp.py, tests/test_fsdp.py,
tests/test_pp.py).

Read in this order:
- mesh.py: the grid of processes (the device mesh), and which layouts can run.
- data_parallel.py: by the data. DDP keeps the whole model on every rank and averages the
  gradients; FSDP keeps 1/dp of the weights, gradients and optimizer state on each.
- tensor_parallel.py: by the model's width. The ranks of a row split every Block (Megatron's
  layout).
- pipeline.py: by the model's depth. Each stage holds a slice of the Blocks; micro-batches flow
  through them on a schedule (1F1B, GPipe), which leaves a bubble of idle time.
- state.py: a spread run's state gathered into the one checkpoint format, and spread back.

2-D is tensor parallel inside a row and FSDP down the columns (DDP cannot wrap DTensors); 3-D
adds pipeline stages outermost. What the training step itself does differently under each
(gradients exchanged at the last micro-step only, norms over shards and stages, the schedule
in place of the micro-step loop) is in training/step.py.
"""
