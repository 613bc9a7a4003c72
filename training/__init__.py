"""The training machinery: what train.py's loop calls, one concern a page. Read in this order:
- step.py: the pieces of one step: the optimizer, the learning rate, forward and backward
  over the micro-steps, gradient clipping (muon.py: the Muon optimizer, an option).
- startup.py: setup(), from the settings to the ready run the loop starts from.
- checkpoint.py: what a checkpoint holds, and how a resumed run continues exactly; the
  milestones at the head of each iteration (evaluate, checkpoint, stop, end).
- stopping.py: what a signal or a diverged loss does to a run.
Then the machinery they call, each a page to look up rather than read: settings.py (the typed
settings and their parser), runtime.py (device, precision, processes), metrics.py (the log),
accounting.py (parameters, FLOPs, memory), safe_load.py (files that may be damaged or hostile).
"""
