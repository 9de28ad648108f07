"""Train the CTC model. The defaults are the recipe for LibriSpeech train-clean-100 on one GPU.

    python train.py --data LibriSpeech/train-clean-100 --dev LibriSpeech/dev-clean
    python train.py --resume runs/<run>/last.pt             # continue a stopped run exactly
    torchrun --nproc_per_node=4 train.py --data ... --dev ...   # DistributedDataParallel

The README has the CPU recipe (AN4). Every --log-every steps a line shows loss, learning rate,
gradient norm, x-realtime (audio seconds per wall second), data wait, the blank share of the greedy
output, peak memory and ETA; every --eval-every steps, dev WER/CER; the same go to <run>/metrics.jsonl.
<run>/last.pt is written every --save-every steps and on Ctrl-C; <run>/best.pt has the best dev WER.
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import resource
import shlex
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn

import data
import decode
from model import (FRAMES_PER_SECOND, CTCModel, ModelConfig, gradient_norms_by_block, lengths_mask,
                   model_checkpoint, save_atomically)

MAX_BAD_STEPS_IN_A_ROW = 20  # more non-finite steps than this means the run has diverged
STALLED_EVALS = 3            # evaluations without a better dev CER before the run is called stuck
CONVERGED_CER = 1.0          # a dev CER (%) at or below this is a finished run, not a stuck one
# Flags that change where and how often, not what, a run computes: --resume may change them.
RESUME_MAY_CHANGE = ("device", "bf16", "workers", "log_every", "eval_every", "save_every", "max_minutes")
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a folder holding any of these holds a run
CHECKPOINT_KEYS = ("model_config", "model", "vocab", "train_config", "optimizer", "step", "epoch",
                   "batch_in_epoch", "best_wer", "rng_cpu", "rng_cuda")
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


def typed_flags(argv):
    """{flag: value} for the flags the command line names, even those given their default value."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def as_flag(name):
    return "--" + name.replace("_", "-")


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


def resume_command(checkpoint, world_size):
    """The command that continues a run from this checkpoint, ready to paste."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # set by torchrun
    nodes = f"torchrun --nnodes={world_size // per_node} --nproc_per_node={per_node}"
    return f"{'python' if world_size == 1 else nodes} train.py --resume {shlex.quote(str(checkpoint))}"


def resolve_args(argv, log):
    """The run's flags and, with --resume, its checkpoint: a resumed run keeps the flags it was
    started with, and a flag typed now that would change them is refused, whatever its value.
    Everything a resume will load is checked here, before the run folder is touched."""
    args = build_parser().parse_args(argv)
    if not args.resume:
        if not args.data or not (args.dev or args.overfit):
            sys.exit("error: --data and --dev are required (or --resume a run)")
        # Saved absolute, so that a resume from another working directory finds the corpora.
        args.data, args.dev = ([str(Path(p).absolute()) for p in ps or []] for ps in (args.data, args.dev))
        return args, None
    path = Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if missing:
            raise KeyError(f"it lacks {', '.join(missing)}")
    except FileNotFoundError:
        sys.exit(f"error: --resume {path}: no such file" + path.parent.is_dir() * (
            f"; {path.parent} holds no checkpoint: its run stopped before its first save"))
    except Exception as e:  # a truncated or foreign file fails in many ways
        sys.exit(f"error: --resume {path}: not a readable train.py checkpoint ({type(e).__name__}: {e})")
    if checkpoint["vocab"] != data.VOCAB:
        sys.exit(f"error: --resume {path}: its vocabulary {''.join(checkpoint['vocab'])!r} differs from "
                 f"this code's {''.join(data.VOCAB)!r}; start a new run or use the matching code")
    given = {k: v for k, v in typed_flags(argv).items() if k != "resume"}
    refused = [as_flag(k) for k in given if k not in RESUME_MAY_CHANGE + ("run_dir",)]
    if refused:  # silently ignoring them would train something other than what was asked
        sys.exit(f"error: --resume continues {path} with the flags it was started with; {' '.join(refused)} "
                 f"cannot change mid-run (only {' '.join(map(as_flag, RESUME_MAY_CHANGE))} can). "
                 f"Drop them, or start a new run with a new --run-dir.")
    saved = argparse.Namespace(**{"ema_decay": 0.0, **checkpoint["train_config"]})  # runs before --ema-decay
    try:
        model = CTCModel(model_config(saved))
        # A model field added since the checkpoint was written has its default value there.
        if {**dataclasses.asdict(ModelConfig()), **checkpoint["model_config"]} != dataclasses.asdict(
                model.config):
            raise ValueError("its model shape differs from the flags it was saved with")
        model.load_state_dict(checkpoint["model"])
        torch.optim.AdamW(model.parameters()).load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        sys.exit(f"error: --resume {path}: its weights or optimizer state do not fit this code's model "
                 f"({str(e).strip().splitlines()[0]}); use the code that wrote it, or start a new run")
    world_size, saved_size = int(os.environ.get("WORLD_SIZE", 1)), checkpoint.get("world_size", 1)
    if world_size != saved_size:  # the steps per epoch, the schedule and the batch order would change
        sys.exit(f"error: --resume {path}: the run trained in {saved_size} processes, this is {world_size}. "
                 f"Continue it as it started:\n  {resume_command(path, saved_size)}")
    if checkpoint["epoch"] >= saved.epochs:  # more epochs would be another learning-rate schedule
        sys.exit(f"error: --resume {path}: that run finished its {saved.epochs} epochs at step "
                 f"{checkpoint['step']}; there is nothing to continue. To train longer, start a new run.")
    run_dir, last = Path(given.get("run_dir") or path.parent), path.parent / "last.pt"
    if run_dir.resolve() == path.parent.resolve() and path.name != "last.pt" and last.exists():
        last_step = torch.load(last, map_location="cpu", weights_only=True)["step"]
        if last_step > checkpoint["step"]:  # continuing here would overwrite the later work
            sys.exit(f"error: --resume {path} (step {checkpoint['step']}) would rewind the run in "
                     f"{run_dir}, whose last.pt is at step {last_step}. Continue it with\n  "
                     f"{resume_command(last, saved_size)}\nor branch from step {checkpoint['step']} into "
                     f"a new folder:\n  {resume_command(path, saved_size)} --run-dir NEW_FOLDER")
    args = argparse.Namespace(**{**vars(saved), **given, "resume": str(path), "run_dir": str(run_dir)})
    try:
        data.device(args.device)
    except argparse.ArgumentTypeError as e:
        sys.exit(f"error: --resume {path}: the run used --device {args.device}: {e}")
    log(f"resuming {path} at step {checkpoint['step']}" + f" in {run_dir}" * (run_dir != path.parent))
    return args, checkpoint


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def new_run_dir():
    """Make runs/<date>-<time>, or -2, -3, ... after it when another run took that name this second."""
    stem = time.strftime("runs/%Y%m%d-%H%M%S")
    for name in [stem] + [f"{stem}-{n}" for n in range(2, 1000)]:
        with contextlib.suppress(FileExistsError):
            Path(name).mkdir(parents=True)
            return name
    raise FileExistsError(errno.EEXIST, "every name is taken", stem)


def claim_run_dir(args, resuming_here):
    """Create the run folder (or reopen it, to resume there) and lock it for this process. Returns
    the lock file, held open for the whole run: the kernel releases the lock when the process
    ends, even by kill -9. A folder that already holds a run is refused unless resumed there."""
    try:
        args.run_dir = args.run_dir or new_run_dir()
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / "train.lock", "a+")
    except OSError as e:
        sys.exit(f"error: --run-dir {e.filename}: cannot write there ({e.strerror}); pick another --run-dir")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        sys.exit(f"error: {run_dir} is in use by another training process ({lock.read().strip()}, "
                 f"per {run_dir / 'train.lock'}); wait for it to end, or pick another --run-dir")
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not resuming_here:
        advice = (f"Continue it with\n  {resume_command(run_dir / 'last.pt', 1)}\nor" if "last.pt" in held
                  else "It holds no checkpoint (it stopped before its first save): remove it, or")
        sys.exit(f"error: {run_dir} already holds a run ({', '.join(held)}). {advice} start a new run "
                 f"with another --run-dir.")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def keep_metrics_until(step, source, run_dir):
    """run_dir/metrics.jsonl as source's lines up to this step: those a killed run logged after its
    checkpoint will be logged again; a branch into a new folder starts with its history."""
    if source.exists():
        kept = "".join(f"{line}\n" for line in source.read_text().splitlines() if logged_step(line) <= step)
        (run_dir / "metrics.jsonl.tmp").write_text(kept)
        os.replace(run_dir / "metrics.jsonl.tmp", run_dir / "metrics.jsonl")


def setup_device(args):
    """(device, rank, world size, bf16 autocast on?); under torchrun, joins the process group."""
    if "RANK" not in os.environ:  # not started by torchrun
        device, rank, world_size = torch.device(args.device), 0, 1
    else:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.device == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # bf16 autocast: no loss scaling needed, unlike fp16; a CPU without AVX512-BF16 only emulates it.
    bf16 = device.type == "cuda" or torch.cpu._is_avx512_bf16_supported() if args.bf16 is None else args.bf16
    return device, rank, world_size, bf16


def build_data(args, model, rank, world_size, pin_memory, log):
    """(train loader and its batch sampler, dev loader, what identifies the training set: a resume
    must find the same); exits naming the data if it is unusable."""
    try:
        train_set = data.filter_trainable(data.read_corpus(args.data, log), args.max_seconds,
                                          model.output_lengths, log)
        train_set = train_set[:args.overfit] if args.overfit else train_set
        dev_set = train_set if args.overfit else data.read_corpus(args.dev, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if not train_set:
        sys.exit(f"error: no trainable utterances left in {' '.join(args.data)} (see the counts above)")
    sampler = data.BucketBatches([u["seconds"] for u in train_set], args.batch_seconds, args.seed,
                                 rank=rank, world_size=world_size)
    if len(sampler) == 0:
        sys.exit(f"error: fewer batches than processes; lower --batch-seconds ({args.batch_seconds})")
    # Own generators: the loaders must not draw from the global RNG, or resume would shift it.
    common = dict(collate_fn=data.collate, num_workers=args.workers, pin_memory=pin_memory,
                  worker_init_fn=data.ignore_signals, persistent_workers=args.workers > 0,
                  prefetch_factor=4 if args.workers else None)
    loader = torch.utils.data.DataLoader(data.AudioDataset(train_set), batch_sampler=sampler,
                                         generator=torch.Generator(), **common)
    dev_batches = data.BucketBatches([u["seconds"] for u in dev_set], args.batch_seconds, shuffle=False)
    dev_loader = torch.utils.data.DataLoader(data.AudioDataset(dev_set), batch_sampler=dev_batches,
                                             generator=torch.Generator(), **common)
    if rank == 0:  # the rank that evaluates
        # Start the dev workers now, while this process is small: forked later from a process holding
        # the training's memory, they slowed the next steps (copy on write), 10 s on AN4 (RESULTS.md).
        iter(dev_loader)
    ids = hashlib.sha1("\n".join(u["id"] for u in train_set).encode()).hexdigest()[:16]
    return loader, sampler, dev_loader, {"utterances": len(train_set), "ids_sha1": ids,
                                         "seconds": round(sum(u["seconds"] for u in train_set), 2)}


def evaluate_and_report(model, dev_loader, device, bf16, label, step, cer_history, block_norms, args, log):
    """Score dev (corpus-level greedy WER and CER) and log it with the health signals: the three longest
    pairs, each block's gradient norm, a warning if the run looks stuck. Returns (WER, metrics record)."""
    started, refs, hyps = time.time(), [], []
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in filter(None, dev_loader):  # None: a batch of only unusable files
            log_probs, out_lengths = model(batch["waves"].to(device), batch["wave_lengths"])
            hyps += decode.greedy_decode(log_probs, out_lengths)
            refs += batch["texts"]
    model.train()
    (wer, cer), pairs, seconds = decode.error_rates(refs, hyps), list(zip(refs, hyps)), time.time() - started
    cer_history.append(cer)
    log(f"{label}: dev WER {wer:.2f}% CER {cer:.2f}% ({seconds:.1f} s)  gradient norms {block_norms}")
    for ref, hyp in pairs[-3:]:  # the longest: the shortest are often single words
        log(f"  ref: {ref}\n  hyp: {hyp}")
    warning = diagnose([hyp for _, hyp in pairs], cer_history, step, args)
    if warning:
        log(f"warning: {warning}")
    return wer, {"dev_wer": wer, "dev_cer": cer, "grad_norms": block_norms, "warning": warning,
                 "eval_seconds": seconds}


def diagnose(hyps, cer_history, step, args):
    """A plain-words warning when the run looks stuck, or None when it looks healthy."""
    symbols = set("".join(hyps)) - {" "}
    if step <= args.warmup_steps:
        return None
    if not symbols and step > 3 * args.warmup_steps:
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
        self.sums = torch.zeros(3, device=device)  # loss, blank frames, real frames
        self.device, self.start, self.audio, self.wait, self.grad_norm = device, time.time(), 0.0, 0.0, 0.0
        self.trained, self.skipped, self.oom = 0, 0, 0

    def add(self, loss, grad_norm, log_probs, out_lengths):
        with torch.no_grad():
            inside = lengths_mask(out_lengths.to(log_probs.device, non_blocking=True), log_probs.shape[1])
            blanks = ((log_probs.argmax(-1) == data.BLANK) & inside).sum()
            self.sums += torch.stack([loss.detach(), blanks.float(), inside.sum().float()])
        self.grad_norm += float(grad_norm)
        self.trained += 1

    def report(self, epoch, step, total_steps, lr, eta_seconds):
        """(log line, metrics record) for the steps since the last log line."""
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
        return line, r


def on_every_rank(flag, device, distributed):
    """flag, and under DDP whether it holds on every rank: ranks must take the same path, or DDP hangs."""
    if not distributed:
        return flag
    flag = torch.tensor(float(flag), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def skip_out_of_memory_batch(batch, optimizer, cuda, args, log):
    """One outsized batch should not end a long run: free what it took, say what to change."""
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
    padded = batch["waves"].numel() / data.SAMPLE_RATE
    log(f"warning: out of memory on a batch of {len(batch['ids'])} utterances ({padded:.0f} s padded), "
        f"skipped. If this repeats, lower --batch-seconds (now {args.batch_seconds}) or --max-seconds")


def catch_stop_signals():
    """From now on Ctrl-C and SIGTERM append to the returned list, so that the loop can finish its step,
    save and say how to resume. Returns (that list, a function that puts the old handlers back)."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stop, restore


def main(argv=None, model=None):
    """Train as the command line says; returns the model the checkpoints hold (on every rank). model: a
    module to train instead of the flags' CTCModel, called and checkpointed as it is (ablation.py)."""
    master = int(os.environ.get("RANK", 0)) == 0
    log = (lambda message: print(message, flush=True)) if master else (lambda message: None)
    try:  # the loop turns Ctrl-C into a stop; before it starts, there is nothing to save
        args, checkpoint = resolve_args(argv, log)
        if args.overfit:  # the health check: nothing may stand between the model and its training set
            args.freq_warp, args.freq_masks, args.time_masks, args.dropout = 0.0, 0, 0, 0.0
            args.speed_perturb, args.ema_decay = False, 0.0  # and it scores the trained weights themselves
        here = checkpoint is not None and Path(args.run_dir).resolve() == Path(args.resume).parent.resolve()
        lock = claim_run_dir(args, here) if master else None
        try:
            return train(args, checkpoint, master, log, model)
        finally:
            if lock:
                lock.close()  # on an error exit too, so that the folder is free at once
    except KeyboardInterrupt:
        sys.exit("error: interrupted while starting, before the first step: nothing was trained or saved")


def build_model(args, checkpoint, device, model):
    """The model, its moving average (or None), AdamW, new or as the checkpoint left them, and the progress
    so far. A checkpoint's "model" is the average (evaluated, decoded), "trained_model" what AdamW trains."""
    model = (model or CTCModel(model_config(args))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # Its weights keep requires_grad, though no loss reaches them: bf16 autocast caches casts only of such
    # weights, and the CPU GRU would recast its own every time step (evaluation 3.6x slower, RESULTS.md).
    ema = copy.deepcopy(model) if args.ema_decay else None
    if checkpoint is None:
        return model, ema, optimizer, (0, 0, 0, math.inf)
    model.load_state_dict(checkpoint.get("trained_model", checkpoint["model"]))  # shapes checked already
    if ema:
        ema.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng_cpu"])
    if device.type == "cuda" and checkpoint["rng_cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng_cuda"])
    return model, ema, optimizer, [checkpoint[k] for k in ("step", "epoch", "batch_in_epoch", "best_wer")]


def train(args, checkpoint, master, log, model=None):
    """The run after its flags and folder are settled: setup, the loop, the end."""
    # ---- device, model, optimizer, data
    device, rank, world_size, bf16 = setup_device(args)
    distributed, cuda, run_dir = world_size > 1, device.type == "cuda", Path(args.run_dir or ".")
    torch.manual_seed(args.seed)
    model, ema, optimizer, progress = build_model(args, checkpoint, device, model)
    step, epoch, batch_in_epoch, best_wer = progress
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{FRAMES_PER_SECOND / model.config.time_stride:.0f} output frames/s, "
        f"device {device}{' bf16' if bf16 else ''}, world size {world_size}")
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    ctc_loss = torch.nn.CTCLoss(blank=data.BLANK, zero_infinity=True)
    loader, sampler, dev_loader, train_set = build_data(args, model, rank, world_size, cuda, log)
    if checkpoint and checkpoint.get("train_set", train_set) != train_set:
        sys.exit(f"error: --resume {args.resume}: the training data changed ({train_set} now, "
                 f"{checkpoint['train_set']} then), and with it the epochs, schedule and batch order. "
                 f"Restore it, or start a new run.")
    if checkpoint and master:
        keep_metrics_until(step, Path(args.resume).parent / "metrics.jsonl", run_dir)
    total_steps = args.epochs * len(sampler)
    log(f"run: {run_dir}  ({len(sampler)} steps/epoch, {total_steps} steps in all)")
    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1) if master else None  # line-buffered
    interval, bad_in_a_row, run_start, start_step = LogInterval(device), 0, time.time(), step
    eval_seconds, out_of_time = 0.0, False  # the --max-minutes clock runs only while training
    cer_history, block_norms = [], {}

    def save(name):
        save_atomically({
            **model_checkpoint(ema or model, data.VOCAB), "train_config": vars(args),
            **({"trained_model": model.state_dict()} if ema else {}),
            "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best_wer": best_wer, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if cuda else None, "world_size": world_size,
            "train_set": train_set,
        }, run_dir / name)

    def evaluate_and_keep_best(label):
        nonlocal best_wer, eval_seconds
        wer, record = evaluate_and_report(ema or model, dev_loader, device, bf16, label, step, cer_history,
                                          block_norms, args, log)
        eval_seconds += record["eval_seconds"]
        record = {"epoch": epoch, "step": step, **record, "wall_seconds": time.time() - run_start}
        metrics.write(json.dumps(record) + "\n")
        if wer < best_wer:
            best_wer = wer
            save("best.pt")

    stop, restore_signal_handlers = catch_stop_signals()  # stop is checked once per step
    log("note: the greedy output is mostly blank at first (the 'blank plateau'); letters follow, then words")

    # ---- the loop: get batch, forward, loss, backward, clip, step, log, evaluate, save
    model.train()
    while epoch < args.epochs and not stop and not out_of_time:
        sampler.set_epoch(epoch, batch_in_epoch)
        wait_start = time.time()
        for batch in loader:
            interval.wait += time.time() - wait_start
            lr = learning_rate(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if not on_every_rank(batch is not None, device, distributed):  # None: only unusable files
                interval.skipped += 1
            else:
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        log_probs, out_lengths = ddp_model(batch["waves"].to(device, non_blocking=True),
                                                           batch["wave_lengths"])
                    # CTCLoss wants (T, B, vocab); mean = per-utterance loss / target length, batch mean.
                    loss = ctc_loss(log_probs.transpose(0, 1), batch["targets"].to(device, non_blocking=True),
                                    out_lengths, batch["target_lengths"])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if (step + 1) % args.eval_every == 0:  # this step ends in an evaluation
                        block_norms = gradient_norms_by_block(model)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                    # The one host sync per step: a non-finite step must be known before it is applied.
                    finite = torch.isfinite(grad_norm).item() and torch.isfinite(loss).item()
                    if finite:
                        optimizer.step()
                        if ema:  # early on, only the last ninth of the steps (TensorFlow's num_updates rule)
                            update_ema = get_ema_multi_avg_fn(min(args.ema_decay, (1 + step) / (10 + step)))
                            update_ema(list(ema.parameters()), list(model.parameters()), None)
                        interval.add(loss, grad_norm, log_probs, out_lengths)
                    interval.skipped += not finite
                    bad_in_a_row = 0 if finite else bad_in_a_row + 1
                except torch.OutOfMemoryError:
                    if distributed:  # the other ranks are already waiting in this step's all-reduce
                        raise
                    skip_out_of_memory_batch(batch, optimizer, cuda, args, log)
                    interval.oom += 1
            if bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                log(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient: the run has "
                    f"diverged. Lower --lr (now {args.lr}) or raise --warmup-steps and start anew, or "
                    f"resume from before it: {resume_command(run_dir / 'last.pt', world_size)}")
                sys.exit(1)
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            interval.audio += float(batch["wave_lengths"].sum()) / data.SAMPLE_RATE if batch else 0.0

            if step % args.log_every == 0 and master:
                eta = (time.time() - run_start) / max(1, step - start_step) * (total_steps - step)
                line, record = interval.report(epoch, step, total_steps, lr, eta)
                log(line)
                metrics.write(json.dumps({**record, "wall_seconds": time.time() - run_start}) + "\n")
                interval = LogInterval(device)
            if not on_every_rank(not stop, device, distributed) and not stop:
                stop.append(signal.SIGTERM)  # another rank was stopped: all stop at this step
            if step % args.eval_every == 0 and master:  # also when stopping: best.pt as uninterrupted
                evaluate_and_keep_best(f"eval step {step}")
            if step % args.save_every == 0 and master:
                save("last.pt")
            if args.max_minutes:  # rank 0's clock decides for all ranks: it alone evaluates
                over = master and time.time() - run_start - eval_seconds > 60 * args.max_minutes
                out_of_time = not on_every_rank(not over, device, distributed)
            if stop or out_of_time:
                break
            wait_start = time.time()
        else:
            epoch, batch_in_epoch = epoch + 1, 0

    # ---- the end
    if master:
        if not stop and step % args.eval_every:  # the last step was not just scored
            evaluate_and_keep_best("final")
        save("last.pt")
        metrics.close()
        if stop or out_of_time:
            why = f"stopped by signal {stop[0]}" if stop else f"--max-minutes {args.max_minutes} reached"
            log(f"{why} at step {step}; {run_dir / 'last.pt'} saved. Continue with:\n"
                f"  {resume_command(run_dir / 'last.pt', world_size)}")
    restore_signal_handlers()
    if distributed:
        dist.destroy_process_group()
    return ema or model


if __name__ == "__main__":
    main()
