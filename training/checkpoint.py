"""Checkpoints: what one holds, how it is written, and how a resumed run continues exactly
where the uninterrupted one would be.

What is saved (save): the weights and the optimizer's state, whole tensors in one process's
layout whatever the run's (parallel/state.py gathers the shards); the gradient scaler's state;
every setting of the run; the dataset's meta.json; the iteration reached, whether its
evaluation is done, the best validation loss, and the seconds trained so far. No random state:
- each batch is a pure function of (seed, iteration, micro-step) (train.py, train_batches), so
  the resumed run draws the batches the uninterrupted one would, on any number of processes;
- dropout's generator is seeded afresh at every micro-step (train.py, train_batches).
So a resumed run repeats the uninterrupted one bit for bit (tests/test_train.py).

When it is saved (Milestones, called at the head of every iteration): at each evaluation (on a
new best validation loss, or always with always_save_checkpoint), and when a signal asks the
run to stop. Each write goes to a file beside the old one, renamed over it once complete, so a
crash at any moment leaves a whole checkpoint (save_checkpoint).

How a run resumes (--init_from=resume, training/startup.py calls these): resolve_init picks
the checkpoint (latest_checkpoint: ckpt.pt, or a newer last.pt), resumed_settings takes the
run's saved settings unless this command names them, and resume_state puts the optimizer and
scaler back and says where the loop goes on. Reading a file that may be damaged or hostile (a
checkpoint, OpenAI's weights) is training/safe_load.py's concern.
"""
import contextlib
import glob
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, fields

import torch

from model import GPT, config_from_dict
from parallel.state import load_optimizer_state, training_state
from training.safe_load import CheckpointError, check_finite, checkpoint_iteration
from training.settings import TrainConfig
from training.stopping import diverged_error


# ----------------------------------------------------------------------------- saving

# A checkpoint's "evaluated" when a stop came during the run's final, whole-split evaluation:
# the estimate at max_iters is done (and true), the whole split is left for the resumed run.
WHOLE_SPLIT_LEFT = "all but the whole split"


def save(run, iter_num, log, evaluated, name="ckpt.pt"):
    """Rank 0 writes a checkpoint into out_dir: everything needed to continue exactly, and
    whether iteration iter_num's evaluation is done (True, False or WHOLE_SPLIT_LEFT). Every
    rank calls this (FSDP and TP gather the shards of every rank)."""
    model_state, optimizer_state = training_state(run.raw_model, run.optimizer, run.layout)
    state = None  # the other ranks only learn whether rank 0's write succeeded
    if run.rank == 0:
        state = {
            "model": model_state, "optimizer": optimizer_state,
            "scaler": run.scaler.state_dict(), "config": asdict(run.cfg),
            "model_args": asdict(run.raw_model.config), "meta": run.meta, "origin": run.origin,
            "iter_num": iter_num, "best_val_loss": run.best_val_loss,
            "elapsed_s": log.elapsed(), "evaluated": evaluated}
    save_checkpoint(state, os.path.join(run.cfg.out_dir, name), run.world_size)


def save_checkpoint(state, path, world_size=1):
    """Write state to path so that a crash at any moment leaves the old file intact: written
    beside it, flushed, then renamed over it (atomic on one filesystem). A failed write (a full
    disk) is a CheckpointError, the old file still there; so are weights that are not finite,
    never written over the last good state. Every rank calls this, rank 0 alone with a state:
    its failure is raised on all, which then stop with the same one line instead of a
    traceback in their next collective once rank 0 has exited."""
    error = None
    if state is not None:
        try:
            if not all(t.isfinite().all() for t in state["model"].values()):
                raise CheckpointError(f"the weights are not finite (NaN or inf): nothing is "
                                      f"written to {path}, which keeps the last good state. "
                                      "Try a lower learning_rate or a longer warmup_iters")
            _write(state, path)
        except CheckpointError as e:
            error = str(e)
    if world_size > 1:
        shared = [error]
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise CheckpointError(error)


def _write(state, path):
    """save_checkpoint's write: a temporary file beside path, then renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    for stale in glob.glob(os.path.join(folder, ".ckpt-*.tmp")):
        os.unlink(stale)  # left by a save that was killed midway; only rank 0 writes here
    tmp = os.path.join(folder, f".ckpt-{uuid.uuid4().hex}.tmp")
    try:
        # Mode 0o666 lets the umask decide, as for any file a program writes (0644 under the
        # usual umask 022, as nanoGPT's are); tempfile.mkstemp would make it 0600.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch.save turns the writer's OSError (ENOSPC) into a RuntimeError ("unexpected
        # pos ...") raised while handling it: the OSError is its __context__.
        error = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
        if error is not None:
            raise CheckpointError(f"cannot write the checkpoint {path}: "
                                  f"{error.strerror or error}; the previous checkpoint there "
                                  "is intact") from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable, where the OS allows it
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ------------------------------------------------------------------------ the loop's milestones

class Milestones:
    """What happens at the head of each iteration, before its learning rate is set: evaluate
    and checkpoint when due, end the run at max_iters with the loss over the whole validation
    split, or end it on a stop signal with a checkpoint. The bookkeeping of a stop and of a
    resume lives here, so that the loop reads as the step does:
    - which iteration's evaluation is done: a resumed run does every evaluation the
      uninterrupted one does, once, whether it stopped before, during or after one;
    - a stop (StopCheck.stopping) ends the run at the next head, with a checkpoint, and never
      with an evaluation first: torchrun kills its workers 30 s after its own SIGTERM;
    - the last step's flags are read (StopCheck.settle) before anything is evaluated or saved,
      so a diverged step never reaches a checkpoint."""

    def __init__(self, run, log, stop, estimate_loss):
        self.run, self.log, self.stop = run, log, stop
        self.estimate_loss = estimate_loss  # train.py's, passed in: train.py imports this page
        # the iteration whose evaluation is done; --eval_only evaluates whatever it says
        self.evaluated = run.iter_num if run.evaluated and not run.cfg.eval_only else None
        self.whole_split_left = run.evaluated == WHOLE_SPLIT_LEFT  # a stop came during it

    def end_here(self, iter_num):
        """Evaluate and checkpoint if due; return whether the run ends at iter_num."""
        run, cfg, stop = self.run, self.run.cfg, self.stop
        if self.evaluated == iter_num >= cfg.max_iters and not self.whole_split_left:
            if run.rank == 0:
                print(f"the run in {cfg.out_dir} is complete: it has done its {cfg.max_iters} "
                      f"iterations. To train it longer: python train.py --init_from=resume "
                      f"--out_dir={cfg.out_dir} --max_iters={2 * cfg.max_iters}", flush=True)
            return True
        due = iter_num % cfg.eval_interval == 0 or iter_num >= cfg.max_iters or cfg.eval_only
        if due or stop.stopping:
            stop.settle()  # raises TrainingError if the last step diverged
        if due and self.evaluated != iter_num and not stop.stopping:
            self.evaluate_and_checkpoint(iter_num)
            self.evaluated = None if stop.stopping else iter_num
        if stop.stopping:
            save_on_stop(run, iter_num, self.log, self.evaluated == iter_num)
            return True
        if iter_num < cfg.max_iters and not cfg.eval_only:
            return False
        if not cfg.eval_only and cfg.eval_iters:  # the figure the README quotes
            whole = self.estimate_loss(run, stop, ("val",), eval_iters=0)
            if whole is None:  # stopped: the resumed run computes it
                save_on_stop(run, iter_num, self.log, WHOLE_SPLIT_LEFT)
            else:
                self.log.whole_split(iter_num, whole)
                if self.whole_split_left:  # made up: the stop's checkpoint says it no longer
                    save(run, iter_num, self.log, True, stop_checkpoint_name(cfg))
        return True

    def evaluate_and_checkpoint(self, iter_num):
        """Estimate and log both losses; save on a new best validation loss (or always, with
        always_save_checkpoint). A stop during it leaves both undone."""
        run, started = self.run, time.time()
        losses = self.estimate_loss(run, self.stop)
        if losses is None:
            return
        if not all(math.isfinite(loss) for loss in losses.values()):
            # AdamW can write finite but ruinous weights, whose NaN shows only at the next
            # forward: here, when an evaluation comes first. They are not saved.
            self.log.evaluation(iter_num, losses, seconds=time.time() - started)
            raise diverged_error(f"eval {iter_num}: train loss {losses['train']:.4g}, val loss "
                                 f"{losses['val']:.4g}: the updates before it diverged",
                                 run.cfg.out_dir)
        improved = losses["val"] < run.best_val_loss
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        if (improved or run.cfg.always_save_checkpoint) and not run.cfg.eval_only:
            save(run, iter_num, self.log, evaluated=True)
        self.log.evaluation(iter_num, losses, seconds=time.time() - started)


def save_on_stop(run, iter_num, log, evaluated):
    """A stopped run's checkpoint: ckpt.pt, or last.pt where ckpt.pt keeps only the best model
    (resuming takes the newer: latest_checkpoint). --eval_only saves nothing."""
    if run.cfg.eval_only:
        if run.rank == 0:
            print("stopped by a signal: the evaluation is abandoned", flush=True)
        return
    name = stop_checkpoint_name(run.cfg)
    save(run, iter_num, log, evaluated, name)
    if run.rank == 0:
        print(f"stopped by a signal at iteration {iter_num}; checkpoint saved to "
              f"{os.path.join(run.cfg.out_dir, name)}: resume with --init_from=resume",
              flush=True)


def stop_checkpoint_name(cfg):
    """ckpt.pt, or last.pt beside a ckpt.pt that keeps only the best model."""
    return "ckpt.pt" if cfg.always_save_checkpoint else "last.pt"


# ----------------------------------------------------------------------------- resuming

def latest_checkpoint(out_dir):
    """The checkpoint to resume from: ckpt.pt, or last.pt where a stop wrote one later (beside
    a best-only ckpt.pt). One that cannot be read is passed over, with a note, for the other."""
    best, last = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "last.pt")
    if not os.path.isfile(last):
        return best
    if not os.path.isfile(best):
        return last
    iters = {}
    for path in (best, last):
        try:
            iters[path] = checkpoint_iteration(path)
        except CheckpointError as e:
            print(f"note: passed over {e}", file=sys.stderr)
    # On a tie ckpt.pt, the first, wins; where neither reads, loading ckpt.pt says why.
    return max(iters, key=iters.get) if iters else best


def resolve_init(cfg, rank, world_size):
    """(init_from, checkpoint path) as this run takes them: auto is resume if out_dir holds a
    checkpoint, else scratch; --eval_only evaluates the run's checkpoint unless it names
    pretrained weights. A fresh run refuses to overwrite a checkpoint; --overwrite=true deletes
    ckpt.pt and last.pt, so that nothing of the old run is resumed or sampled from later.
    Rank 0 decides and tells the others (a node without the checkpoint must not start afresh
    while the rest resume); all fail together if one of them cannot read the checkpoint."""
    decision = [cfg.init_from, None, None]  # init_from, path, or the error all ranks raise
    if rank == 0:
        decision[1] = path = latest_checkpoint(cfg.out_dir)
        exists = os.path.exists(path)
        if cfg.init_from == "auto" or (cfg.eval_only and cfg.init_from == "scratch"):
            decision[0] = "resume" if exists else "scratch"
        if decision[0] == "resume" and not exists:
            decision[2] = f"init_from=resume but there is no checkpoint at {path}"
        elif cfg.eval_only and decision[0] == "scratch":
            decision[2] = (f"--eval_only evaluates a trained model, and {cfg.out_dir} holds no "
                           "checkpoint: give the right --out_dir, or --init_from=gpt2 (or a "
                           "folder of GPT-2 weights)")
        elif os.path.isfile(cfg.init_from) and os.path.dirname(os.path.abspath(
                cfg.init_from)) == os.path.abspath(cfg.out_dir):
            decision[2] = (f"--init_from={cfg.init_from} is in out_dir {cfg.out_dir}, where "
                           "this run writes its own checkpoints: give another --out_dir")
        elif decision[0] != "resume" and exists and not cfg.overwrite:
            decision[2] = (f"{path} already exists: pass --init_from=resume to continue it, "
                           "or --overwrite=true to start afresh over it")
        elif decision[0] != "resume" and not cfg.eval_only:
            for name in ("ckpt.pt", "last.pt"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(cfg.out_dir, name))
    if world_size > 1:
        torch.distributed.broadcast_object_list(decision, src=0)
    init_from, path, error = decision
    if not error and init_from == "resume" and world_size > 1:
        readable = [None] * world_size
        torch.distributed.all_gather_object(readable, os.path.isfile(path))
        missing = [r for r, ok in enumerate(readable) if not ok]
        if missing:
            error = (f"rank 0 resumes from {path}, which rank(s) "
                     f"{', '.join(map(str, missing))} cannot read: every machine needs the "
                     "checkpoint at that path (a shared filesystem, or a copy of out_dir)")
    if error:
        raise CheckpointError(error)
    return init_from, path


def resumed_settings(cfg, saved, named):
    """A resumed run's settings: its own, saved in its checkpoint, except those that this
    command names (its flags and config files), and where and how it runs (out_dir,
    init_from, device, backend, and how it is spread: fsdp, tp, pp, pp_schedule)."""
    known = {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in saved.items() if k in known}
    trained_with = settings.get("optimizer", "adamw")
    if "optimizer" in named and cfg.optimizer != trained_with:
        raise CheckpointError(
            f"the run in {cfg.out_dir} was trained with optimizer={trained_with}, "
            f"whose state cannot go on as {cfg.optimizer}'s: resume without --optimizer, or "
            f"finetune its weights with a fresh {cfg.optimizer} in another out_dir: "
            f"--init_from={os.path.join(cfg.out_dir, 'ckpt.pt')} --out_dir=NEW")
    here = ("out_dir", "init_from", "device", "backend", "fsdp", "tp", "pp", "pp_schedule")
    settings.update({k: getattr(cfg, k) for k in (*named, *here)})
    return TrainConfig(**settings).validate()


def resume_state(ckpt, model, optimizer, scaler, layout):
    """Put a checkpoint's optimizer and gradient-scaler states into a run being set up, and
    return where its loop goes on: (iter_num, whether that iteration's evaluation is done,
    best_val_loss, origin, seconds trained before this process)."""
    load_optimizer_state(model, optimizer, ckpt["optimizer"], layout)
    if ckpt["scaler"]:  # empty when saved without float16: the scale then starts afresh
        scaler.load_state_dict(ckpt["scaler"])
    iter_num = ckpt["iter_num"]
    # older checkpoints were saved at an evaluation, or by a stop after iteration 0
    evaluated = ckpt.get("evaluated", iter_num > 0)
    return (iter_num, evaluated, ckpt["best_val_loss"], ckpt.get("origin", "scratch"),
            ckpt.get("elapsed_s", 0.0))


def model_from_checkpoint(ckpt, path, dropout=0.0):
    """(model, meta): the GPT of a checkpoint of ours, and its tokenizer's meta; another
    project's checkpoint, or weights not finite, are a CheckpointError."""
    try:
        model = GPT(config_from_dict({**ckpt["model_args"], "dropout": dropout}))
        model.load_state_dict(ckpt["model"])
        meta = ckpt["meta"]
    except (ValueError, RuntimeError, KeyError, TypeError) as e:  # another project's file
        reason = " ".join(str(e).split())  # one line, even for load_state_dict's list
        raise CheckpointError(f"{path}: cannot load this checkpoint: {reason}") from None
    return check_finite(model, path), meta
