"""Train the CTC model. The defaults are the recipe for LibriSpeech train-clean-100 on one GPU; the
files in recipes/ hold the other measured recipes, each a list of flags that a flag typed after it
overrides.

    python train.py @recipes/an4.args --data AN4/train --dev AN4/dev        # a CPU, minutes
    python train.py --data LibriSpeech/train-clean-100 --dev LibriSpeech/dev-clean   # one GPU
    python train.py --resume runs/<run>/last.pt             # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=4 train.py --data ... --dev ...   # DistributedDataParallel

This file is the flags and the training loop; runs.py keeps the run folder (checkpoints, the lock,
resume checks). Every --log-every steps a line shows loss, learning rate, gradient norm, x-realtime
(audio seconds per wall second), data wait, the blank share of the greedy output, peak memory and ETA;
every --eval-every steps, dev WER/CER; the same go to <run>/metrics.jsonl. <run>/last.pt is written
every --save-every steps and on Ctrl-C; <run>/best.pt has the best dev WER (ties: the better CER).
From Python, train(argv) runs the same and raises InputError where the command prints "error: ..."
and exits with status 1.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn

import data
import runs
from data import InputError
from model import (BLANK, FRAMES_PER_SECOND, CTCModel, ModelConfig, gradient_norms_by_block, greedy_decode,
                   lengths_mask)

MAX_BAD_STEPS_IN_A_ROW = 20  # more non-finite steps than this means the run has diverged
STALLED_EVALS = 3            # evaluations without a better dev CER before the run is called stuck
CONVERGED_CER = 1.0          # a dev CER (%) at or below this is a finished run, not a stuck one
# Flags that change where and how often, not what, a run computes: --resume may change them. --data and
# --dev may name where the run's corpora now live: a resume checks that they hold the same utterances.
RESUME_MAY_CHANGE = ("device", "bf16", "workers", "log_every", "eval_every", "save_every", "max_minutes",
                     "data", "dev")
CAUSES = ("Likely causes: learning rate too high or too low (--lr, --warmup-steps); features not "
          "log-mel or not normalized; CTC lengths that ignore the conv stride or the padding; a "
          "vocabulary without space or apostrophe; too little data for the model. Check with "
          "--overfit 20, and see 'When CTC training goes wrong' in the README.")
CORES = len(os.sched_getaffinity(0))


class RecipeParser(argparse.ArgumentParser):
    """Reads @FILE as the flags in it: words as a shell splits them, '#' starting a comment."""

    def convert_arg_line_to_args(self, arg_line):
        return shlex.split(arg_line, comments=True)


def build_parser():
    m = ModelConfig()  # the model flags' defaults live in the model's own config
    in_range = runs.in_range
    count, positive, above_zero = in_range(int, 0), in_range(int, 1), in_range(float, 0, low_open=True)
    p = RecipeParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     fromfile_prefix_chars="@")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="training corpora: LibriSpeech-layout folders or TSV manifests")
    g.add_argument("--dev", nargs="+", help="dev corpora, same forms; scored at every evaluation")
    g.add_argument("--max-seconds", type=above_zero, default=30.0, help="skip longer training utterances")
    g.add_argument("--batch-seconds", type=above_zero, default=800.0, help="padded audio seconds per batch")
    g.add_argument("--workers", type=count, default=min(4, CORES), help="DataLoader processes decoding "
                   "audio (default: 4, or this machine's cores if fewer)")
    g = p.add_argument_group("model")
    g.add_argument("--n-mels", type=in_range(int, 8), default=m.n_mels, help="log-mel bins")
    g.add_argument("--time-stride", type=int, default=m.time_stride, choices=[1, 2, 3, 4],
                   help="output frames/s = 100 / stride")
    g.add_argument("--conv-channels", type=positive, default=m.conv_channels)
    g.add_argument("--rnn-layers", type=positive, default=m.rnn_layers)
    g.add_argument("--rnn-hidden", type=positive, default=m.rnn_hidden, help="GRU units per direction")
    g.add_argument("--dropout", type=in_range(float, 0, 1), default=m.dropout)
    g.add_argument("--speed-perturb", action=argparse.BooleanOptionalAction, default=m.speed_perturb,
                   help="play each training batch at 0.9, 1.0 or 1.1 times its speed")
    g.add_argument("--freq-warp", type=in_range(float, 0, 0.5), default=m.freq_warp,
                   help="frequency warp (VTLP, see model.py): up to +-this per region (0: off)")
    g.add_argument("--freq-masks", type=count, default=m.freq_masks, help="SpecAugment frequency masks")
    g.add_argument("--time-masks", type=count, default=m.time_masks, help="SpecAugment time masks")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive, default=40)
    g.add_argument("--lr", type=above_zero, default=1.5e-3, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-steps", type=count, default=1000, help="linear warmup, cosine to --lr / 100")
    g.add_argument("--weight-decay", type=in_range(float, 0), default=0.01)
    g.add_argument("--grad-clip", type=above_zero, default=1.0, help="max global gradient norm")
    g.add_argument("--ema-decay", type=in_range(float, 0, 1), default=0.999, help="evaluate and save a "
                   "moving average of the weights, over about the last 1 / (1 - decay) steps (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overfit", type=count, default=0, metavar="N", help="health check: train and evaluate "
                   "on N training utterances, no augmentation or dropout: a working pipeline's CER nears 0")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="a new folder (default: runs/<date>-<time>)")
    g.add_argument("--resume", default=None, help="a last.pt to continue from (its run and flags)")
    g.add_argument("--device", type=runs.device, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast; "
                   "default: on for CUDA and CPUs with AVX512-BF16, off on other CPUs, which only emulate it")
    g.add_argument("--log-every", type=positive, default=50)
    g.add_argument("--eval-every", type=positive, default=1000)
    g.add_argument("--save-every", type=positive, default=500)
    g.add_argument("--max-minutes", type=above_zero, default=None, help="end after this many minutes of "
                   "training (evaluations not counted), as if the last epoch were done: a job's time limit")
    return p


def launched_world_size():
    """The number of training processes: torchrun's WORLD_SIZE, or 1 for a plain `python train.py`."""
    return int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else 1


class Stopped(KeyboardInterrupt):
    """Raised by train() after Ctrl-C or SIGTERM stopped the loop and last.pt was saved: the run is
    not finished. A KeyboardInterrupt, so that a caller's `except Exception` does not take it for a
    result."""


def learning_rate(step, total_steps, args):
    """Linear warmup from 0 to --lr, then cosine decay to --lr / 100 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def model_config(args):
    """The model the flags describe."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)} & vars(args).keys()
    return ModelConfig(**{name: getattr(args, name) for name in fields})


# ------------------------------------------------------------------- before the loop
def resolve_args(argv, log):
    """The run's flags and, with --resume, its checkpoint: a resumed run keeps the flags it was
    started with, and a flag typed now that would change them is refused, whatever its value.
    Everything a resume will load is checked here, before the run folder is touched."""
    args = build_parser().parse_args(argv)
    # Saved absolute, so that a resume from another working directory finds the corpora.
    args.data, args.dev = ([str(Path(p).absolute()) for p in ps or []] or ps for ps in (args.data, args.dev))
    if not args.resume:
        if not args.data or not (args.dev or args.overfit):
            raise InputError("--data and --dev are required (or --resume a run)")
        args.dev = args.dev or []
        return args, None
    args, checkpoint = runs.resume_args(build_parser, argv, args, RESUME_MAY_CHANGE,
                                        lambda saved: CTCModel(model_config(saved)), launched_world_size())
    path, run_dir = Path(args.resume), Path(args.run_dir)
    try:
        runs.device(args.device)
    except argparse.ArgumentTypeError as e:
        raise InputError(f"--resume {path}: the run used --device {args.device}: {e}") from None
    where = f" in {run_dir}" if run_dir != path.parent else ""
    log(f"resuming {path} at step {checkpoint['step']}{where}")
    return args, checkpoint


def setup_device(args, cleanup):
    """(device, rank, world size, bf16 autocast on?); under torchrun, joins the process group (left
    when cleanup, an ExitStack, closes)."""
    if "RANK" not in os.environ:  # not started by torchrun
        device, rank, world_size = torch.device(args.device), 0, 1
    else:
        rank, world_size = int(os.environ["RANK"]), launched_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.device == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        cleanup.callback(dist.destroy_process_group)
    bf16 = args.bf16
    if bf16 is None:  # bf16 needs no loss scaling, unlike fp16; a CPU without AVX512-BF16 only emulates it
        bf16 = device.type == "cuda" or cpu_has_bf16()
    return device, rank, world_size, bf16


def cpu_has_bf16():
    """Whether this CPU computes bf16 itself (AVX512-BF16, in the kernel's list of its flags)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux
        return False


def read_data(args, model, log):
    """(training utterances, dev utterances); InputError naming the data if it is unusable. A resumed
    run's corpora must hold what they held: the same ids, transcripts and durations."""
    try:
        return read_corpora(args, model, log)
    except InputError as e:
        if not args.resume:
            raise
        raise InputError(f"{e}\nThe run in {args.resume} reads --data {' '.join(args.data)} --dev "
                         f"{' '.join(args.dev)}. If they moved, resume with --data and --dev naming where "
                         f"they are now (checked to be the same utterances).") from None


def read_corpora(args, model, log):
    train_set = data.filter_trainable(data.read_corpus(args.data, log), args.max_seconds,
                                      model.output_lengths, log)
    train_set = train_set[:args.overfit] if args.overfit else train_set
    if not train_set:
        raise InputError(f"no trainable utterances left in {' '.join(args.data)} (see the counts above)")
    return train_set, train_set if args.overfit else data.read_corpus(args.dev, log)


def build_loaders(args, train_set, dev_set, rank, world_size, pin_memory, log):
    """(train loader, its batch sampler, dev loader)."""
    sampler = data.BucketBatches([u["seconds"] for u in train_set], args.batch_seconds, args.seed,
                                 rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise InputError(f"fewer batches than processes; lower --batch-seconds ({args.batch_seconds})")
    left_out = len(sampler.batches) - world_size * len(sampler)
    if left_out:  # every rank takes the same number of steps, so each epoch leaves these few batches out
        log(f"data: {len(sampler.batches)} batches an epoch over {world_size} processes, {len(sampler)} "
            f"steps each: the last {left_out} of each epoch's order (others each epoch) are left out of it")
    dev_batches = data.BucketBatches([u["seconds"] for u in dev_set], args.batch_seconds, shuffle=False)
    dev_loader = data.batch_loader(dev_set, dev_batches, args.workers, pin_memory)
    if rank == 0:  # the rank that evaluates
        # Start the dev workers now, while this process is small: forked later from a process holding
        # the training's memory, they slowed the next steps (copy on write), 10 s on AN4 (RESULTS.md).
        with data.signals_held():  # a Ctrl-C now ends the start cleanly, after the workers are up
            iter(dev_loader)
    return data.batch_loader(train_set, sampler, args.workers, pin_memory), sampler, dev_loader


def build_optimizer(args, checkpoint, model, device):
    """AdamW and the moving average of the weights (or None), new or as the checkpoint left them, and
    the runs.Progress so far."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # Its weights keep requires_grad, though no loss reaches them: bf16 autocast caches casts only of such
    # weights, and the CPU GRU would recast its own every time step (evaluation 3.6x slower, RESULTS.md).
    average = copy.deepcopy(model) if args.ema_decay else None
    if checkpoint is None:
        return optimizer, average, runs.Progress()
    return optimizer, average, runs.restore_training_state(checkpoint, model, average, optimizer, device)


def claim_run_dir(args, resuming_here, cleanup, device, distributed):
    """Rank 0 claims the run folder (held until cleanup closes); every rank raises if it could not, so
    that the others end with it rather than wait for it (only rank 0 prints the error)."""
    problem = None
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            cleanup.enter_context(runs.claim_run_dir(args, resuming_here))
        except InputError as e:
            problem = e
    if not on_every_rank(problem is None, device, distributed):
        raise problem or InputError("rank 0 could not claim the run folder")


def on_every_rank(flag, device, distributed):
    """flag, and under DDP whether it holds on every rank: ranks must take the same path, or DDP hangs."""
    if not distributed:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def catch_stop_signals(cleanup):
    """From now on Ctrl-C and SIGTERM append to the returned list, so that the loop can finish its step,
    save and say how to resume; the old handlers come back when cleanup (an ExitStack) closes."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        cleanup.callback(signal.signal, sig, handler)
    return stop


# ------------------------------------------------------------------------ the run
def train(argv=None, model=None):
    """Train as the command line says; returns the model the checkpoints hold (on every rank). model: a
    module to train instead of the flags' CTCModel, called and checkpointed as it is (ablation.py).
    Raises InputError, naming the flag, file or checkpoint, before anything is written where it can."""
    master = int(os.environ.get("RANK", 0)) == 0
    log = (lambda message: print(message, flush=True)) if master else (lambda message: None)
    args, checkpoint = resolve_args(argv, log)
    if args.overfit:  # the health check: nothing may stand between the model and its training set
        args.freq_warp, args.freq_masks, args.time_masks, args.dropout = 0.0, 0, 0, 0.0
        args.speed_perturb, args.ema_decay = False, 0.0  # and it scores the trained weights themselves
    here = checkpoint is not None and Path(args.run_dir).resolve() == Path(args.resume).parent.resolve()
    runs.check_run_dir(args.run_dir, here)  # before the data scan, which can take minutes
    with contextlib.ExitStack() as cleanup:  # what the run holds, given back however it ends
        device, rank, world_size, bf16 = setup_device(args, cleanup)
        if device.type == "cpu" and model is None and (args.rnn_layers, args.rnn_hidden) == (5, 512):
            log(f"note: these are train.py's defaults, the GPU recipe, on a CPU ({CORES} cores): it would "
                f"take days. On a CPU start from a recipe: @recipes/an4.args or "
                f"@recipes/mini-librispeech.args")
        torch.manual_seed(args.seed)
        model = (model or CTCModel(model_config(args))).to(device)
        train_set, dev_set = read_data(args, model, log)
        identity = {"run_id": checkpoint["run_id"] if here else runs.new_run_id(),  # a branch is a new run
                    "train_set": runs.corpus_id(train_set), "dev_set": runs.corpus_id(dev_set)}
        if checkpoint:
            runs.check_same_data(checkpoint, args.resume, identity)
        claim_run_dir(args, here, cleanup, device, world_size > 1)
        loader, sampler, dev_loader = build_loaders(args, train_set, dev_set, rank, world_size,
                                                    device.type == "cuda", log)
        optimizer, average, progress = build_optimizer(args, checkpoint, model, device)
        run = Run(args, device, bf16, world_size, Path(args.run_dir), model, average, optimizer, identity,
                  dev_loader, log)
        if checkpoint and master:
            runs.keep_metrics_until(progress.step, Path(args.resume).parent / "metrics.jsonl", run.dir)
        if master:
            run.metrics = cleanup.enter_context(open(run.dir / "metrics.jsonl", "a", buffering=1))
        stop = catch_stop_signals(cleanup)  # a list, checked once per step
        ended = train_loop(run, loader, sampler, progress, stop)
        caught = stop[0] if stop else signal.SIGTERM  # none here: a signal to another rank stopped it
        if master and ended != "finished":
            why = f"--max-minutes {args.max_minutes} reached"
            if ended == "signal":
                why = f"stopped by signal {caught}"
            log(f"{why} at step {progress.step}; {run.dir / 'last.pt'} saved. Continue with:\n"
                f"  {runs.resume_command(run.dir / 'last.pt', world_size)}")
        if world_size > 1:
            dist.barrier()  # the others wait for rank 0's final evaluation and save, then all leave together
    if ended == "signal":
        raise Stopped(caught)
    return average or model


@dataclasses.dataclass
class Run:
    """What the loop works with, settled before it starts."""
    args: argparse.Namespace
    device: torch.device
    bf16: bool
    world_size: int
    dir: Path
    model: torch.nn.Module                # what AdamW trains
    average: torch.nn.Module              # its moving average (None: off), evaluated and saved
    optimizer: torch.optim.Optimizer
    identity: dict                        # run id and corpus fingerprints, saved in each checkpoint
    dev_loader: torch.utils.data.DataLoader
    log: object
    metrics: object = None                # metrics.jsonl, open on rank 0
    cer_history: list = dataclasses.field(default_factory=list)  # dev CERs, for diagnose()
    block_norms: dict = dataclasses.field(default_factory=dict)  # gradient norms before the evaluation
    eval_seconds: float = 0.0             # spent evaluating, which --max-minutes leaves out

    def training_minutes(self, run_start):
        return (time.time() - run_start - self.eval_seconds) / 60

    def save(self, name, progress):
        runs.save_training_state(self.dir / name, self.model, self.average, self.optimizer, progress,
                                 self.args, self.world_size, self.identity)

    def write_metrics(self, record, run_start):
        self.metrics.write(json.dumps({**record, "wall_seconds": time.time() - run_start}) + "\n")


def train_loop(run, loader, sampler, progress, stop):
    """The training steps until the last epoch, a signal or --max-minutes; returns which ended it:
    "finished", "signal" or "time". Every rank runs it; rank 0 alone logs, evaluates and saves."""
    args, p, model, optimizer, log = run.args, progress, run.model, run.optimizer, run.log
    master, distributed = int(os.environ.get("RANK", 0)) == 0, run.world_size > 1
    log(f"model: {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M parameters, "
        f"{FRAMES_PER_SECOND / model.config.time_stride:.0f} output frames/s, "
        f"device {run.device}{' bf16' if run.bf16 else ''}, world size {run.world_size}")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    ctc_loss = torch.nn.CTCLoss(blank=BLANK, zero_infinity=True)
    total_steps, run_start, start_step = args.epochs * len(sampler), time.time(), p.step
    log(f"run: {run.dir}  ({len(sampler)} steps/epoch, {total_steps} steps in all)")
    log("note: the greedy output is mostly blank at first (the 'blank plateau'); letters follow, then words")
    interval, bad_in_a_row, signalled, over_time = LogInterval(run.device), 0, False, False
    model.train()
    while p.epoch < args.epochs and not (signalled or over_time):
        sampler.set_epoch(p.epoch, p.batch_in_epoch)
        for batch in interval.timed(loader):
            lr = learning_rate(p.step, total_steps, args)
            optimizer.param_groups[0]["lr"] = lr  # the one group: every parameter
            if not on_every_rank(batch is not None, run.device, distributed):  # all its files unusable
                interval.skipped += 1
            else:
                try:
                    log_probs, out_lengths = forward(ddp_model, batch, run.device, run.bf16)
                    # CTCLoss wants (T, B, vocab); mean = per-utterance loss / target length, batch mean.
                    targets = batch["targets"].to(run.device, non_blocking=True)
                    loss = ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, batch["target_lengths"])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if (p.step + 1) % args.eval_every == 0:  # this step ends in an evaluation
                        run.block_norms = gradient_norms_by_block(model)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                    # A NaN or inf must not reach the weights. The one host sync per step.
                    finite = torch.isfinite(grad_norm).item() and torch.isfinite(loss).item()
                    bad_in_a_row = 0 if finite else bad_in_a_row + 1
                    if finite:
                        optimizer.step()
                        update_average(run.average, model, p.step, args.ema_decay)
                        interval.add(loss, grad_norm, log_probs, out_lengths)
                    else:
                        interval.skipped += 1
                except torch.OutOfMemoryError:
                    if distributed:  # the other ranks already wait in this step's all-reduce: it must end
                        raise
                    skip_out_of_memory(batch, optimizer, run.device, args, log)
                    interval.oom += 1
            if bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                raise InputError(diverged(args, run.dir, run.world_size))
            p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
            interval.audio += float(batch["wave_lengths"].sum()) / data.SAMPLE_RATE if batch else 0.0
            if p.step % args.log_every == 0 and master:
                eta = (time.time() - run_start) / max(1, p.step - start_step) * (total_steps - p.step)
                line, record = interval.report(p.epoch, p.step, total_steps, lr, eta)
                log(line)
                run.write_metrics(record, run_start)
            late = master and run.training_minutes(run_start) > (args.max_minutes or math.inf)
            signalled, over_time = agreed_stop(bool(stop), late, run.device, distributed)
            if signalled and master:  # saved first: torchrun kills its processes 30 s after a signal
                run.save("last.pt", p)
            if p.step % args.eval_every == 0:  # also when stopping: best.pt as if uninterrupted
                evaluate_and_keep_best(run, p, f"eval step {p.step}", run_start)
            if p.step % args.save_every == 0 and master:
                run.save("last.pt", p)
            if signalled or over_time:
                break
        if p.batch_in_epoch == len(sampler):  # also when stopped on its last batch: a resume starts the next
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    del ddp_model  # before the process group goes: a DDP model left to exit's garbage collection hung there

    # ---- the end: a finished or timed-out run is scored once more unless its last step just was
    if not signalled and p.step % args.eval_every:
        evaluate_and_keep_best(run, p, "final", run_start)
    if master:
        run.save("last.pt", p)
    if p.epoch >= args.epochs:
        return "finished"
    return "signal" if signalled else "time"


def evaluate_and_keep_best(run, progress, label, run_start):
    """On every rank: rank 0 scores the model's greedy output on dev (corpus-level WER and CER), logs it
    with the health signals (the three longest pairs, each block's gradient norm, a warning if the run
    looks stuck) and keeps best.pt. The others learn whether it could, so that a dev set of only
    unusable files ends every rank with rank 0's error."""
    master, started, scored = int(os.environ.get("RANK", 0)) == 0, time.time(), True
    if master:
        refs, hyps = greedy_corpus(run.average or run.model, run.dev_loader, run.device, run.bf16)
        scored = bool(refs)  # a WER of nothing would read as 0.00% and freeze best.pt
    if not on_every_rank(scored, run.device, run.world_size > 1):
        raise InputError(f"--dev {' '.join(run.args.dev)}: none of its utterances could be scored, each "
                         f"file was skipped (the warnings above say why); fix or replace the dev set")
    if not master:
        return
    (wer, cer), seconds = data.error_rates(refs, hyps), time.time() - started
    run.cer_history.append(cer)
    run.eval_seconds += seconds
    run.log(f"{label}: dev WER {wer:.2f}% CER {cer:.2f}% ({seconds:.1f} s)  gradient norms {run.block_norms}")
    for ref, hyp in list(zip(refs, hyps))[-3:]:  # the longest: the shortest are often single words
        run.log(f"  ref: {ref}\n  hyp: {hyp}")
    warning = diagnose(hyps, run.cer_history, progress.step, run.args)
    if warning:
        run.log(f"warning: {warning}")
    run.write_metrics({"epoch": progress.epoch, "step": progress.step, "dev_wer": wer, "dev_cer": cer,
                       "grad_norms": run.block_norms, "warning": warning, "eval_seconds": seconds}, run_start)
    if (wer, cer) < (progress.best_wer, progress.best_cer):  # a tie in WER goes to the better CER
        progress.best_wer, progress.best_cer = wer, cer
        run.save("best.pt", progress)


def agreed_stop(signalled, over_time, device, distributed):
    """(stop for a signal, stop for --max-minutes), the same on every rank: the ranks leave the loop
    together. A signal on any rank stops all; the time is rank 0's clock (rank 0 alone evaluates, so its
    clock alone can leave evaluations out)."""
    if not distributed:
        return signalled, over_time
    flags = torch.tensor([float(signalled), float(over_time)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


def forward(model, batch, device, bf16):
    """(log-probs, output lengths) of a batch. bf16 autocast needs no loss scaling, unlike fp16."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(batch["waves"].to(device, non_blocking=True), batch["wave_lengths"])


def update_average(average, model, step, decay):
    """One step of the moving average of the weights (if any). Early on it averages only about the last
    ninth of the steps (TensorFlow's num_updates rule), so that the random start fades fast."""
    if average:
        update = get_ema_multi_avg_fn(min(decay, (1 + step) / (10 + step)))
        update(list(average.parameters()), list(model.parameters()), None)


def skip_out_of_memory(batch, optimizer, device, args, log):
    """One outsized batch should not end a long run: free what it took, say what to change."""
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    padded = batch["waves"].numel() / data.SAMPLE_RATE
    log(f"warning: out of memory on a batch of {len(batch['ids'])} utterances ({padded:.0f} s padded), "
        f"skipped. If this repeats, lower --batch-seconds (now {args.batch_seconds}) or --max-seconds")


# ------------------------------------------------------------------- what the log shows
def greedy_corpus(model, batches, device, bf16=False):
    """(references, greedy hypotheses) over batches from data.collate; a None batch (only unusable
    files) is passed over. The model is scored in eval mode and left in the mode it was in."""
    refs, hyps, training = [], [], model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in filter(None, batches):
            log_probs, out_lengths = model(batch["waves"].to(device), batch["wave_lengths"])
            hyps += greedy_decode(log_probs, out_lengths)
            refs += batch["texts"]
    model.train(training)
    return refs, hyps


def diagnose(hyps, cer_history, step, args):
    """A plain-words warning when the run looks stuck, or None when it looks healthy."""
    symbols = set("".join(hyps)) - {" "}
    # A model leaving the blank plateau first prints blanks, then one or two common letters:
    # neither means anything until well past the warmup.
    if step <= 3 * args.warmup_steps:
        return None
    if not symbols:
        return (f"the output is still all blank at step {step}, more than 3x the warmup "
                f"(--warmup-steps {args.warmup_steps}). {CAUSES}")
    if 0 < len(symbols) <= 2:
        return f"the output has collapsed to {''.join(sorted(symbols))!r}. {CAUSES}"
    recent, earlier = cer_history[-STALLED_EVALS:], cer_history[:-STALLED_EVALS]
    if earlier and min(recent) >= min(earlier) > CONVERGED_CER:
        return (f"dev CER has not improved in {STALLED_EVALS} evaluations (best {min(earlier):.1f}%). If the "
                f"training loss is near 0, the model knows the training set by heart: more data or "
                f"augmentation (--dropout, --freq-masks, --time-masks) is what helps. Otherwise: {CAUSES}")
    return None


def peak_memory_gb(device):
    """Most memory held so far: on a GPU the caching allocator's (nvidia-smi less the context), else RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class LogInterval:
    """The steps since the last log line. Sums stay on the device until the line: no host sync per step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(3, device=self.device)  # loss, blank frames, real frames
        self.start, self.audio, self.wait, self.grad_norm = time.time(), 0.0, 0.0, 0.0
        self.trained, self.skipped, self.oom = 0, 0, 0

    def timed(self, batches):
        """The batches, the time spent waiting for each counted as data wait."""
        batches, waited = iter(batches), time.time()
        for batch in batches:
            self.wait += time.time() - waited
            yield batch
            waited = time.time()

    def add(self, loss, grad_norm, log_probs, out_lengths):
        """A trained step."""
        with torch.no_grad():
            inside = lengths_mask(out_lengths.to(log_probs.device, non_blocking=True), log_probs.shape[1])
            blanks = ((log_probs.argmax(-1) == BLANK) & inside).sum()
            self.sums += torch.stack([loss.detach(), blanks.float(), inside.sum().float()])
        self.grad_norm += float(grad_norm)
        self.trained += 1

    def report(self, epoch, step, total_steps, lr, eta_seconds):
        """(log line, metrics record) for the steps since the last log line; a new interval starts."""
        loss, blank_frames, frames = self.sums.tolist()
        elapsed, trained = time.time() - self.start, max(1, self.trained)
        r = {"epoch": epoch, "step": step, "loss": loss / trained, "lr": lr,
             "grad_norm": self.grad_norm / trained, "x_realtime": self.audio / elapsed,
             "data_wait": self.wait / elapsed, "blank_share": blank_frames / max(1, frames),
             "skipped_steps": self.skipped, "oom_batches": self.oom, "audio_seconds": self.audio,
             "peak_memory_gb": peak_memory_gb(self.device)}
        line = (f"epoch {epoch} step {step}/{total_steps} loss {r['loss']:.3f} lr {lr:.2e} "
                f"grad {r['grad_norm']:.2f} {r['x_realtime']:.0f}x realtime data wait "
                f"{100 * r['data_wait']:.0f}% blank {100 * r['blank_share']:.0f}% skipped {self.skipped} "
                f"memory {r['peak_memory_gb']:.1f} GB ETA {eta_seconds / 60:.0f} min")
        self.reset()
        return line, r


def diverged(args, run_dir, world_size):
    return (f"{MAX_BAD_STEPS_IN_A_ROW + 1} steps in a row had a non-finite loss or gradient: the run has "
            f"diverged. Lower --lr (now {args.lr}) or raise --warmup-steps and start anew, or resume from "
            f"before it: {runs.resume_command(run_dir / 'last.pt', world_size)}")


def main(argv=None):
    """The command line: train() with its InputError printed as 'error: ...' and exit status 1. Under
    torchrun the other ranks meet the same error: rank 0 alone prints it."""
    master = int(os.environ.get("RANK", 0)) == 0
    try:
        train(argv)
    except InputError as e:
        sys.exit(f"error: {e}" if master else 1)
    except Stopped as e:  # last.pt is saved and the resume command printed
        sys.exit(128 + e.args[0])
    except KeyboardInterrupt:  # the loop turns Ctrl-C into a stop; before it starts there is nothing to save
        sys.exit("error: interrupted while starting, before the first step: nothing was trained or saved"
                 if master else 130)


if __name__ == "__main__":
    main()
