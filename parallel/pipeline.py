"""Pipeline parallelism: the model cut by depth. The pp ranks of a column each hold n_layer / pp
consecutive Blocks (a stage); the first also holds the embeddings, the last the final norm and
the head. A micro-batch's activations go from stage to stage forward, their gradients back, as
point-to-point messages: one (batch_size, block_size, n_embd) tensor each way per stage
boundary and micro-batch, far less than FSDP's or TP's collectives, which is why pipelines are
what spans machines whose links are slow (pp is the outermost axis of the mesh, mesh.py).

The schedule decides which micro-batch each stage works on at each moment. Time runs right,
p = 4 stages, m = 8 micro-batches, F3: micro-batch 3's forward, B3 its backward (drawn as long
as a forward; it takes about twice as long, which changes no share below):

    GPipe  stage 0  F1 F2 F3 F4 F5 F6 F7 F8  .  .  .  .  .  . B1 B2 B3 B4 B5 B6 B7 B8
           stage 1   . F1 F2 F3 F4 F5 F6 F7 F8  .  .  .  . B1 B2 B3 B4 B5 B6 B7 B8  .
           stage 2   .  . F1 F2 F3 F4 F5 F6 F7 F8  .  . B1 B2 B3 B4 B5 B6 B7 B8  .  .
           stage 3   .  .  . F1 F2 F3 F4 F5 F6 F7 F8 B1 B2 B3 B4 B5 B6 B7 B8  .  .  .
    1F1B   stage 0  F1 F2 F3 F4  .  .  . B1 F5 B2 F6 B3 F7 B4 F8 B5  . B6  . B7  . B8
           stage 1   . F1 F2 F3  .  . B1 F4 B2 F5 B3 F6 B4 F7 B5 F8 B6  . B7  . B8  .
           stage 2   .  . F1 F2  . B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 F8 B7  . B8  .  .
           stage 3   .  .  . F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 F8 B8  .  .  .

Either way each stage idles while the pipeline fills and drains (the dots): the bubble, p-1 of
every m+p-1 slots, (p-1)/(m+p-1) of the step, here 3/11. 1F1B (once full, one forward, one
backward) frees a micro-batch's activations as soon as its backward is done: stage 0 holds at
most p of them (F1-F4 before B1), GPipe's all m. Hence 1F1B by default, with m (the micro-steps
of a data-parallel row) at least p; more micro-batches shrink the bubble.

Torch runs the schedules (torch.distributed.pipelining); this page gives it the stages, and
handles what a cut model changes around the step:
- the tied embedding (below, Pipeline.tie_gradients);
- the gradient norm, summed over the stages, the head's copy of wte counted once (train.py's
  clip calls training/step.py's clip_grad_norm_ with Pipeline.counted and Pipeline.group);
- the loss, computed on the last stage, sent to every rank, so that every rank logs it and
  agrees on a diverged step or a stop, as in one process.
A schedule cannot stop between micro-batches: a stop signal ends the run at the next
iteration boundary (the ranks agree as the micro-batches are drawn, before the schedule). Checkpoints are gathered from the stages into one
file of whole tensors (state.py), so a pipelined run resumes in one process and back.
"""
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


class Stage(nn.Module):
    """Stage index (of stages) of a GPT: its modules under the whole model's names, so that the
    stages' state dicts add up to the model's ("transformer.h.5..." stays h.5 on any stage)."""

    def __init__(self, model, index, stages):
        super().__init__()
        t, per_stage = model.transformer, model.config.n_layer // stages
        self.config, self.activation_checkpointing = model.config, model.activation_checkpointing
        self.first, self.last = index == 0, index == stages - 1
        blocks = nn.ModuleDict({str(i): t.h[i]
                                for i in range(index * per_stage, (index + 1) * per_stage)})
        own = {"h", "wte", "wpe", "drop"} if self.first else {"h"}  # as the model orders them
        own |= {"ln_f"} if self.last else set()
        self.transformer = nn.ModuleDict({name: blocks if name == "h" else part
                                          for name, part in t.items() if name in own})
        # The head is tied to wte in one process: here it is the same tensor's copy on the
        # last stage, kept equal to wte by summing their gradients (Pipeline.tie_gradients).
        self.lm_head = model.lm_head if self.last else None
        if model.config.rope:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        # the whole model's parameters, in one process's order, with their whole shapes
        # (checkpoints number the optimizer's state as one process does: state.py)
        self.whole = {name: p.shape for name, p in model.named_parameters()}

    def forward(self, x):
        """Token ids (B, T) on the first stage, the residual stream (B, T, C) on the others;
        returns the residual stream, or on the last stage the logits (B, T, vocab_size). As
        GPT.hidden_states and GPT.forward compute them."""
        t, T = self.transformer, x.size(1)
        pos, rotary = torch.arange(T, device=x.device), None
        if self.config.rope:
            rotary = (self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3))
        if self.first:
            x = t.drop(t.wte(x) if self.config.rope else t.wte(x) + t.wpe(pos))
        for block in t.h.values():
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, None, use_reentrant=False)
            else:
                x = block(x, rotary)
        return self.lm_head(t.ln_f(x)) if self.last else x


def loss_fn(logits, targets):
    """GPT.forward's loss, computed by the last stage for each micro-batch."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


class Pipeline(nn.Module):
    """What train.py runs under --pp: stage (this rank's Stage, split further by TP or FSDP if
    asked) and torch's schedule over the pp ranks of layout's mesh, micro_steps micro-batches
    an iteration. Called as a model, model(x, y), it evaluates through the pipeline."""

    def __init__(self, stage, layout, device, micro_steps, schedule="1f1b"):
        super().__init__()
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.stage, self.group = stage, layout.mesh["pp"].get_group()
        where = (layout.pp_rank, layout.pp, torch.device(device))
        kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        # scale_grads divides each micro-batch's gradient by m, as forward_backward does.
        self.schedule = kind(PipelineStage(stage, *where, group=self.group), micro_steps,
                             loss_fn=loss_fn, scale_grads=True)
        # Evaluation: one micro-batch at a time, forward only, on a stage of its own.
        self.evaluation = ScheduleGPipe(PipelineStage(stage, *where, group=self.group), 1,
                                        loss_fn=loss_fn)
        self.tied, self.micro_steps = _tied_group(layout), micro_steps
        # Every parameter is counted in the gradient norm once: the head's copy is not.
        self.counted = [p for name, p in stage.named_parameters()
                        if name != "lm_head.weight" or stage.first]

    def forward_backward(self, batches, ctx):
        """Forward and backward over one iteration's micro-batches, the schedule's order;
        gradients as forward_backward in training/step.py leaves them. Returns the mean loss
        (every rank gets it from the last stage)."""
        batches = list(batches)  # all drawn first: the schedule runs them in its own order
        if len(batches) < self.micro_steps:  # a stop came as they were drawn (every rank
            return torch.zeros(())  # agrees): the loop drops this iteration, unrun
        xs, ys = zip(*batches)
        losses = []
        with ctx:
            self.schedule.step(torch.cat(xs), target=torch.cat(ys), losses=losses)
        self.tie_gradients()
        return self._from_last(torch.stack(losses).mean() if losses else None, xs[0].device)

    def forward(self, x, y):
        """(None, the loss of batch x, y): a forward through the stages, for evaluation."""
        losses = []
        self.evaluation.eval(x, target=y, losses=losses)
        return None, self._from_last(losses[0] if losses else None, x.device)

    def tie_gradients(self):
        """In one process wte and the head are one matrix: it embeds the tokens at the input and
        scores them at the output, and its gradient is the sum of what both uses contribute.
        A pipeline puts the two ends on different GPUs, so the last stage holds a copy (the
        head) of the first stage's wte. Each stage computed its part of the gradient: summed
        between the two, it is one process's gradient on both, and the two take the same step
        (the same clip, the same optimizer state), so they stay identical, as one matrix."""
        if self.tied is None:
            return
        stage = self.stage
        weight = stage.transformer.wte.weight if stage.first else stage.lm_head.weight
        grad = weight.grad.to_local() if hasattr(weight.grad, "to_local") else weight.grad
        torch.distributed.all_reduce(grad, group=self.tied)

    def _from_last(self, loss, device):
        """loss, which the last stage alone has, on every rank of the column."""
        loss = torch.zeros((), device=device) if loss is None else loss.detach().float()
        torch.distributed.broadcast(loss, group_src=self.group.size() - 1, group=self.group)
        return loss


def _tied_group(layout):
    """The process group of this rank's first and last stage (same dp and tp ranks), where wte's
    gradient is summed; None on a middle stage. Every rank creates every such group."""
    rank, mine = torch.distributed.get_rank(), None
    for column in layout.mesh.mesh.flatten(1).t().tolist():  # dp * tp columns of pp ranks
        group = torch.distributed.new_group([column[0], column[-1]])
        mine = group if rank in (column[0], column[-1]) else mine
    return mine
