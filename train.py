"""Train the CTC model. The defaults are the recipe for LibriSpeech train-clean-100 on one GPU.

    python train.py --data LibriSpeech/train-clean-100 --dev LibriSpeech/dev-clean
    python train.py --resume runs/<run>/last.pt             # continue a stopped run exactly
    torchrun --nproc_per_node=4 train.py --data ... --dev ...   # DistributedDataParallel

This file is the flags and the training loop; runs.py keeps the run folder (checkpoints, the lock,
resume checks). The README has the CPU recipe (AN4). Every --log-every steps a line shows loss,
learning rate, gradient norm, x-realtime (audio seconds per wall second), data wait, the blank share
of the greedy output, peak memory and ETA; every --eval-every steps, dev WER/CER; the same go to
<run>/metrics.jsonl. <run>/last.pt is written every --save-every steps and on Ctrl-C; <run>/best.pt
has the best dev WER (ties: the better CER). From Python, train(argv) runs the same and raises
InputError where the command prints "error: ..." and exits with status 1.
"""
import argparse
import contextlib
import dataclasses
import copy
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn

import data
import decode
import runs
from data import InputError
from model import FRAMES_PER_SECOND, CTCModel, ModelConfig, lengths_mask

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


def build_parser():
    m = ModelConfig()  # the model flags' defaults live in the model's own config
    in_range = data.in_range
    count, positive, above_zero = in_range(int, 0), in_range(int, 1), in_range(float, 0, low_open=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="training corpora: LibriSpeech-layout folders or TSV manifests")
    g.add_argument("--dev", nargs="+", help="dev corpora, same forms; scored at every evaluation")
    g.add_argument("--max-seconds", type=above_zero, default=30.0, help="skip longer training utterances")
    g.add_argument("--batch-seconds", type=above_zero, default=800.0, help="padded audio seconds per batch")
    g.add_argument("--workers", type=count, default=4, help="DataLoader processes decoding audio")
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
    g.add_argument("--device", type=data.device, default="cuda" if torch.cuda.is_available() else "cpu")
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
    return ModelConfig(vocab_size=len(data.VOCAB), **{name: getattr(args, name) for name in fields})


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
        data.device(args.device)
    except argparse.ArgumentTypeError as e:
        raise InputError(f"--resume {path}: the run used --device {args.device}: {e}") from None
    log(f"resuming {path} at step {checkpoint['step']}" + f" in {run_dir}" * (run_dir != path.parent))
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
    # bf16 autocast: no loss scaling needed, unlike fp16; a CPU without AVX512-BF16 only emulates it.
    bf16 = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() if args.bf16 is None else args.bf16
    return device, rank, world_size, bf16


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


def build_loaders(args, train_set, dev_set, rank, world_size, pin_memory):
    """(train loader, its batch sampler, dev loader)."""
    sampler = data.BucketBatches([u["seconds"] for u in train_set], args.batch_seconds, args.seed,
                                 rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise InputError(f"fewer batches than processes; lower --batch-seconds ({args.batch_seconds})")
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
    the progress so far: (step, epoch, batch in epoch, (best dev WER, its CER))."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # Its weights keep requires_grad, though no loss reaches them: bf16 autocast caches casts only of such
    # weights, and the CPU GRU would recast its own every time step (evaluation 3.6x slower, RESULTS.md).
    average = copy.deepcopy(model) if args.ema_decay else None
    if checkpoint is None:
        return optimizer, average, (0, 0, 0, (math.inf, math.inf))
    return optimizer, average, runs.restore_training_state(checkpoint, model, average, optimizer, device)


class Evaluation:
    """Dev scoring during training: corpus-level greedy WER and CER, logged with the health signals (the
    three longest pairs, each block's gradient norm, a warning if the run looks stuck). Keeps the CER
    history the warnings need and the time spent, which --max-minutes leaves out."""

    def __init__(self, dev_loader, device, bf16, args, log):
        self.dev_loader, self.device, self.bf16, self.args, self.log = dev_loader, device, bf16, args, log
        self.cer_history, self.block_norms, self.seconds = [], {}, 0.0

    def training_minutes(self, run_start):
        return (time.time() - run_start - self.seconds) / 60

    def run(self, model, label, step):
        """Score model on dev; returns the metrics record."""
        started = time.time()
        refs, hyps = decode.greedy_corpus(model, self.dev_loader, self.device, self.bf16)
        if not refs:  # a WER of nothing would read as 0.00% and freeze best.pt
            raise InputError(f"--dev {' '.join(self.args.dev)}: none of its utterances could be scored, "
                             f"each file was skipped (the warnings above say why); fix or replace the dev "
                             f"set")
        (wer, cer), seconds = decode.error_rates(refs, hyps), time.time() - started
        self.cer_history.append(cer)
        self.seconds += seconds
        self.log(f"{label}: dev WER {wer:.2f}% CER {cer:.2f}% ({seconds:.1f} s)  "
                 f"gradient norms {self.block_norms}")
        for ref, hyp in list(zip(refs, hyps))[-3:]:  # the longest: the shortest are often single words
            self.log(f"  ref: {ref}\n  hyp: {hyp}")
        warning = diagnose(hyps, self.cer_history, step, self.args)
        if warning:
            self.log(f"warning: {warning}")
        return {"dev_wer": wer, "dev_cer": cer, "grad_norms": self.block_norms, "warning": warning,
                "eval_seconds": seconds}


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
            blanks = ((log_probs.argmax(-1) == data.BLANK) & inside).sum()
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


def gradient_norms_by_block(model):
    """Gradient norm of the front end, each GRU layer and the output layer. A block near zero
    (vanishing) or far above the others (exploding) shows where to look."""
    blocks = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            kind, index = name.split(".")[:2]  # layers.2.forward_gru.weight_hh_l0: GRU layer 2
            block = f"rnn{index}" if kind == "layers" else "output" if kind == "output" else "front end"
            blocks[block] = blocks.get(block, 0.0) + p.grad.detach().float().pow(2).sum()
    return {block: round(float(total) ** 0.5, 4) for block, total in blocks.items()}


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


def on_every_rank(flag, device, distributed):
    """flag, and under DDP whether it holds on every rank: ranks must take the same path, or DDP hangs."""
    if not distributed:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class SkipStep(Exception):
    """Raised inside a step by StepGuard.unless(): the rest of the step is not done."""


class StepGuard:
    """Around each training step: a batch of only unusable files, a non-finite loss or gradient, or
    CUDA out of memory (on one process) skip that step instead of ending the run, counted in the log.

        with guard(batch) as skip:
            skip.unless(condition)       # False: the rest of this step is skipped
    """

    def __init__(self, optimizer, interval, args, device, distributed, log):
        self.optimizer, self.interval, self.args, self.log = optimizer, interval, args, log
        self.device, self.distributed = device, distributed
        self.bad_in_a_row, self.batch = 0, None  # non-finite steps since the last good one

    def __call__(self, batch):
        self.batch = batch
        return self

    def unless(self, condition):
        if not condition:
            raise SkipStep

    def unless_finite(self, loss, grad_norm):
        """Skip a step whose loss or gradient is NaN or infinite, before it reaches the weights. The one
        host sync per step."""
        finite = torch.isfinite(grad_norm).item() and torch.isfinite(loss).item()
        self.bad_in_a_row = 0 if finite else self.bad_in_a_row + 1
        self.unless(finite)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is SkipStep:
            self.interval.skipped += 1
            return True
        if kind is not None and issubclass(kind, torch.OutOfMemoryError) and not self.distributed:
            # One outsized batch should not end a long run (under DDP the other ranks already wait in
            # this step's all-reduce: it must end). Free what it took, say what to change.
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.interval.oom += 1
            padded = self.batch["waves"].numel() / data.SAMPLE_RATE
            self.log(f"warning: out of memory on a batch of {len(self.batch['ids'])} utterances "
                     f"({padded:.0f} s padded), skipped. If this repeats, lower --batch-seconds "
                     f"(now {self.args.batch_seconds}) or --max-seconds")
            return True
        return False


def agreed_stop(stop, over_time, device, distributed):
    """Whether to stop after this step: on Ctrl-C or SIGTERM, or past --max-minutes on rank 0's clock
    (rank 0 alone evaluates, so its clock alone can leave evaluations out). All ranks stop together."""
    return not on_every_rank(not (stop or over_time), device, distributed)


def catch_stop_signals(cleanup):
    """From now on Ctrl-C and SIGTERM append to the returned list, so that the loop can finish its step,
    save and say how to resume; the old handlers come back when cleanup (an ExitStack) closes."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        cleanup.callback(signal.signal, sig, handler)
    return stop


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
        torch.manual_seed(args.seed)
        model = (model or CTCModel(model_config(args))).to(device)
        train_set, dev_set = read_data(args, model, log)
        identity = {"run_id": checkpoint["run_id"] if here else runs.new_run_id(),  # a branch is a new run
                    "train_set": runs.corpus_id(train_set), "dev_set": runs.corpus_id(dev_set)}
        if checkpoint:
            runs.check_same_data(checkpoint, args.resume, identity)
        if master:
            cleanup.enter_context(runs.claim_run_dir(args, here))
        loaders = build_loaders(args, train_set, dev_set, rank, world_size, pin_memory=device.type == "cuda")
        return train_loop(args, checkpoint, model, loaders, identity, device, world_size, bf16, log, cleanup)


def train_loop(args, checkpoint, model, loaders, identity, device, world_size, bf16, log, cleanup):
    """The run after its flags, data and folder are settled: optimizer, the loop, the end."""
    master, distributed = int(os.environ.get("RANK", 0)) == 0, world_size > 1
    run_dir = Path(args.run_dir or ".")
    loader, sampler, dev_loader = loaders
    optimizer, average, (step, epoch, batch_in_epoch, best) = build_optimizer(args, checkpoint, model, device)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{FRAMES_PER_SECOND / model.config.time_stride:.0f} output frames/s, "
        f"device {device}{' bf16' if bf16 else ''}, world size {world_size}")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    ctc_loss = torch.nn.CTCLoss(blank=data.BLANK, zero_infinity=True)
    total_steps, run_start, start_step = args.epochs * len(sampler), time.time(), step
    log(f"run: {run_dir}  ({len(sampler)} steps/epoch, {total_steps} steps in all)")
    if checkpoint and master:
        runs.keep_metrics_until(step, Path(args.resume).parent / "metrics.jsonl", run_dir)
    metrics = cleanup.enter_context(open(run_dir / "metrics.jsonl", "a", buffering=1)) if master else None
    interval = LogInterval(device)
    guard = StepGuard(optimizer, interval, args, device, distributed, log)
    evaluation = Evaluation(dev_loader, device, bf16, args, log)  # the --max-minutes clock skips its time

    def save(name):
        progress = (step, epoch, batch_in_epoch, best)
        runs.save_training_state(run_dir / name, model, average, optimizer, progress, args, world_size,
                                 identity)

    def log_progress(lr):
        eta = (time.time() - run_start) / max(1, step - start_step) * (total_steps - step)
        line, record = interval.report(epoch, step, total_steps, lr, eta)
        log(line)
        metrics.write(json.dumps({**record, "wall_seconds": time.time() - run_start}) + "\n")

    def evaluate_and_keep_best(label):
        nonlocal best
        record = evaluation.run(average or model, label, step)
        metrics.write(json.dumps({"epoch": epoch, "step": step, **record,
                                  "wall_seconds": time.time() - run_start}) + "\n")
        if (record["dev_wer"], record["dev_cer"]) < best:  # a tie in WER goes to the better CER
            best = (record["dev_wer"], record["dev_cer"])
            save("best.pt")

    stop = catch_stop_signals(cleanup)  # a list, checked once per step
    log("note: the greedy output is mostly blank at first (the 'blank plateau'); letters follow, then words")
    over_time = False

    # ---- the loop: batch, learning rate, forward, loss, backward, clip, step, average, log, evaluate, save
    model.train()
    while epoch < args.epochs and not stop and not over_time:
        sampler.set_epoch(epoch, batch_in_epoch)
        for batch in interval.timed(loader):
            lr = learning_rate(step, total_steps, args)
            optimizer.param_groups[0]["lr"] = lr  # the one group: every parameter
            with guard(batch) as skip:  # a step skipped on a batch of unusable files, OOM, NaN or inf
                skip.unless(on_every_rank(batch is not None, device, distributed))
                log_probs, out_lengths = forward(ddp_model, batch, device, bf16)
                # CTCLoss wants (T, B, vocab); mean = per-utterance loss / target length, batch mean.
                loss = ctc_loss(log_probs.transpose(0, 1), batch["targets"].to(device, non_blocking=True),
                                out_lengths, batch["target_lengths"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if (step + 1) % args.eval_every == 0:  # this step ends in an evaluation
                    evaluation.block_norms = gradient_norms_by_block(model)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                skip.unless_finite(loss, grad_norm)
                optimizer.step()
                update_average(average, model, step, args.ema_decay)
                interval.add(loss, grad_norm, log_probs, out_lengths)
            if guard.bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                raise InputError(diverged(args, run_dir, world_size))
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            interval.audio += float(batch["wave_lengths"].sum()) / data.SAMPLE_RATE if batch else 0.0
            if step % args.log_every == 0 and master:
                log_progress(lr)
            over_time = master and evaluation.training_minutes(run_start) > (args.max_minutes or math.inf)
            stopping = agreed_stop(stop, over_time, device, distributed)
            if step % args.eval_every == 0 and master:  # also when stopping: best.pt as uninterrupted
                evaluate_and_keep_best(f"eval step {step}")
            if step % args.save_every == 0 and master:
                save("last.pt")
            if stopping:
                if not (stop or over_time):  # another rank was stopped
                    stop.append(signal.SIGTERM)
                break
        if batch_in_epoch == len(sampler):  # also when stopped on its last batch: a resume starts the next
            epoch, batch_in_epoch = epoch + 1, 0

    # ---- the end
    finished = epoch >= args.epochs
    if master:
        if (finished or not stop) and step % args.eval_every:  # the last step was not just scored
            evaluate_and_keep_best("final")
        save("last.pt")
        if not finished:
            why = f"stopped by signal {stop[0]}" if stop else f"--max-minutes {args.max_minutes} reached"
            log(f"{why} at step {step}; {run_dir / 'last.pt'} saved. Continue with:\n"
                f"  {runs.resume_command(run_dir / 'last.pt', world_size)}")
    if stop and not finished:
        raise Stopped(stop[0])
    return average or model


def diverged(args, run_dir, world_size):
    return (f"{MAX_BAD_STEPS_IN_A_ROW + 1} steps in a row had a non-finite loss or gradient: the run has "
            f"diverged. Lower --lr (now {args.lr}) or raise --warmup-steps and start anew, or resume from "
            f"before it: {runs.resume_command(run_dir / 'last.pt', world_size)}")


def main(argv=None):
    """The command line: train() with its InputError printed as 'error: ...' and exit status 1."""
    try:
        train(argv)
    except InputError as e:
        sys.exit(f"error: {e}")
    except Stopped as e:  # last.pt is saved and the resume command printed
        sys.exit(128 + e.args[0])
    except KeyboardInterrupt:  # the loop turns Ctrl-C into a stop; before it starts there is nothing to save
        sys.exit("error: interrupted while starting, before the first step: nothing was trained or saved")


if __name__ == "__main__":
    main()
