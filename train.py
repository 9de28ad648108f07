"""Train the CTC model. The defaults are the recipe for LibriSpeech train-clean-100 on one GPU; the
files in recipes/ hold the other measured recipes, each a list of flags that a flag typed after it
overrides.

    python train.py @recipes/an4.args --data AN4/train --dev AN4/dev        # a CPU, minutes
    python train.py --data LibriSpeech/train-clean-100 --dev LibriSpeech/dev-clean   # one GPU
    python train.py --resume runs/<run>/last.pt             # continue a stopped run exactly
    python train.py @recipes/an4.args --init-from runs/<run>/best.pt --alphabet auto --data ... --dev ...
    torchrun --standalone --nproc_per_node=4 train.py --data ... --dev ...   # DistributedDataParallel

This file is the flags and the training loop; runs.py keeps the run folder (checkpoints, the lock,
resume checks). Every --log-every steps a line shows loss, learning rate, gradient norm, x-realtime
(audio seconds per wall second), data wait, the blank share of the greedy output, peak memory and ETA;
every --eval-every steps, dev WER/CER (health.py: what these mean); the same go to <run>/metrics.jsonl.
<run>/last.pt is written every --save-every steps and within seconds of Ctrl-C or SIGTERM, whatever the run
is doing; <run>/best.pt has the best dev WER (ties: the better CER).
From Python, train(argv) runs the same and raises InputError where the command prints "error: ..."
and exits with status 1.
"""
import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import get_ema_multi_avg_fn

import data
import runs
from data import InputError
from health import LogInterval, diagnose, gradient_norms_by_block
from model import BLANK, ENGLISH, FRAMES_PER_SECOND, CTCModel, ModelConfig, greedy_decode

MAX_BAD_STEPS_IN_A_ROW = 20  # more non-finite steps than this means the run has diverged
# Flags that change where and how often, not what, a run computes: --resume may change them. --data and
# --dev may name where the run's corpora now live: a resume checks that they hold the same utterances.
RESUME_MAY_CHANGE = ("device", "bf16", "workers", "log_every", "eval_every", "save_every", "max_minutes",
                     "data", "dev")


def usable_cores():
    """The cores this process may use: Linux's affinity, which a container or taskset narrows; elsewhere
    (macOS) every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


CORES = usable_cores()


class RecipeParser(argparse.ArgumentParser):
    """Reads @FILE as the flags in it (read_recipe)."""

    def parse_known_args(self, args=None, namespace=None):
        flags = []
        try:
            for arg in sys.argv[1:] if args is None else args:
                flags += read_recipe(Path(arg[1:])) if arg.startswith("@") else [arg]
        except InputError as e:
            self.error(str(e))
        return super().parse_known_args(flags, namespace)


MAX_RECIPE_READS, MAX_RECIPE_DEPTH = 1000, 100  # for one command line: includes that multiply end here


def read_recipe(path, included_by=(), reads=None):
    """The flags in a recipe file: words as a shell splits them, '#' starting a comment, a line may end
    in a shell's '\\'; an unquoted @FILE in it is read in place, relative to its folder. included_by: the
    (recipe, line) that include this one; reads: the files read so far for this command line."""
    where = f"recipe {path}"
    if included_by:
        where = f"recipe {included_by[-1][0]} line {included_by[-1][1]}: @{path}"
    if any(path.resolve() == including.resolve() for including, _ in included_by):
        raise InputError(f"{where} includes a recipe that includes it; remove the loop")
    reads = [] if reads is None else reads
    reads.append(path)
    if len(reads) > MAX_RECIPE_READS or len(included_by) >= MAX_RECIPE_DEPTH:
        raise InputError(f"{where}: {len(reads)} recipe files read, {len(included_by)} includes deep "
                         f"(at most {MAX_RECIPE_READS} and {MAX_RECIPE_DEPTH}: includes that multiply?); "
                         f"simplify them")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, which some editors write, is dropped
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"recipe {path} line {line}: not UTF-8 (byte {raw[e.start]:#04x}); save it as "
                         f"UTF-8") from None
    flags = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        line = line[:-1] if line.endswith("\\") else line  # a continued line: the next one's words follow
        try:
            words = shlex.split(line, comments=True)
            as_written = shlex.split(line, comments=True, posix=False)  # quotes kept: "@x" is a value
        except ValueError as e:
            raise InputError(f"recipe {path} line {number}: {e} (a quote left open?)") from None
        unquoted = as_written if len(as_written) == len(words) else words
        for word, written in zip(words, unquoted):
            if written.startswith("@"):
                flags += read_recipe(path.parent / word[1:], included_by + ((path, number),), reads)
            else:
                flags.append(word)
    return flags


def build_parser():
    m = ModelConfig()  # the model flags' defaults live in the model's own config
    in_range = runs.in_range
    count, positive, above_zero = in_range(int, 0), in_range(int, 1), in_range(float, 0, low_open=True)
    p = RecipeParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--norm-range-db", type=in_range(float, 10, or_off=True), default=m.norm_range_db,
                   help="normalize features by the frames within this many dB of the reference level "
                   "(0: every frame)")
    g.add_argument("--reference-ms", type=in_range(int, 10, 1000), default=m.reference_ms, help="the "
                   "reference level: what each utterance's loudest this long reach (10: its loudest frame)")
    g.add_argument("--floor-db", type=in_range(float, 20, or_off=True), default=m.floor_db, help="each mel "
                   "bin's floor, this far below the reference (0: an absolute 1e-6, which quiet recordings' "
                   "bands sit on)")
    g.add_argument("--alphabet", type=alphabet_flag, default="english", help="the symbols it writes besides "
                   "space: english (a-z, '), a file (UTF-8, one a line) or auto (the training transcripts')")
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
    g.add_argument("--run-dir", type=runs.named_path, help="a new folder (default: runs/<date>-<time>)")
    g.add_argument("--resume", type=runs.named_path, help="a last.pt to continue from (its run and flags)")
    g.add_argument("--init-from", type=runs.named_path, metavar="CKPT", help="start a new run from a "
                   "checkpoint's model (a run folder: its best.pt): its shape and (unless --alphabet is "
                   "given) its alphabet; the rest is this run's")
    g.add_argument("--device", type=runs.device, default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast; "
                   "default: on where the hardware computes it (GPUs from Ampere on, CPUs with AVX512-BF16)")
    g.add_argument("--log-every", type=positive, default=50)
    g.add_argument("--eval-every", type=positive, default=1000)
    g.add_argument("--save-every", type=positive, default=500)
    g.add_argument("--max-minutes", type=above_zero, default=None, help="end after this many minutes of "
                   "training (evaluations not counted), as if the last epoch were done: a job's time limit")
    return p


def launched():
    """(rank, world size) of this process: torchrun's, or (0, 1) for a plain `python train.py`. The one
    place that reads them; the run carries them (Ranks)."""
    if "RANK" not in os.environ:
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


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
def resolve_args(argv, world_size, log):
    """(the run's flags, with --resume its checkpoint, with --init-from the checkpoint it starts from).
    A resume's flags are those the run was started with (runs.resume_args: a typed flag that would change
    them is refused). Everything a run will load is checked here, before the run folder is touched."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Saved absolute, so that a resume from another working directory finds the corpora.
    args.data, args.dev = ([str(Path(p).absolute()) for p in ps or []] or ps for ps in (args.data, args.dev))
    if args.resume and args.init_from:
        raise InputError("--init-from starts a new run from a model; --resume continues a run, whose "
                         "checkpoint holds where it started: give one of them")
    if args.resume:
        args, checkpoint = runs.resume_args(build_parser, argv, args, RESUME_MAY_CHANGE,
                                            lambda saved: CTCModel(model_config(saved)), world_size)
        where = f" in {args.run_dir}" if Path(args.run_dir) != Path(args.resume).parent else ""
        log(f"resuming {args.resume} at step {checkpoint['step']}{where}")
        return args, checkpoint, None
    if not args.data or not (args.dev or args.overfit):
        raise InputError("--data and --dev are required (or --resume a run)")
    args.dev = args.dev or []
    # Only flags typed on the command line are held against --init-from's model: a recipe's give way.
    typed = runs.typed_flags(build_parser, [arg for arg in argv if not arg.startswith("@")])
    start = runs.init_args(args, typed, log) if args.init_from else None
    if start and "alphabet" not in runs.typed_flags(build_parser, argv):
        args.alphabet = start["model_config"]["alphabet"]
    elif args.alphabet is None:
        args.alphabet = data.alphabet_of(args.data, log)
    return args, None, start


def alphabet_flag(text):
    """--alphabet: english -> English's symbols, FILE -> its symbols (data.read_alphabet), auto -> None:
    the training transcripts' letters, once the flags are resolved (data.alphabet_of)."""
    if text == "english":
        return ENGLISH
    if text == "auto":
        return None
    try:
        return data.read_alphabet(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup_device(args, world_size, cleanup):
    """(device, bf16 autocast on?). DDP, place 1 of 3: under torchrun, each process takes its GPU and
    joins the process group (left when cleanup, an ExitStack, closes)."""
    device = torch.device(args.device)
    if world_size > 1:
        if device.type == "cuda":  # cuda or cuda:N alike: each process its own GPU on this machine
            local_rank = os.environ.get("LOCAL_RANK", int(os.environ["RANK"]) % torch.cuda.device_count())
            device = torch.device("cuda", int(local_rank))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        cleanup.callback(dist.destroy_process_group)
    bf16 = args.bf16  # bf16 needs no loss scaling, unlike fp16; without hardware for it, it is emulated
    if bf16 is None and device.type == "cuda":
        bf16 = cuda_has_bf16(device)
    elif bf16 is None:
        bf16 = device.type == "cpu" and cpu_has_bf16()
    return device, bf16


def cuda_has_bf16(device):
    """Whether this GPU computes bf16 itself (Ampere and later), not in emulation."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_bf16():
    """Whether this CPU computes bf16 itself (AVX512-BF16, in the kernel's list of its flags)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux
        return False


def read_data(args, model, log):
    """(training utterances, dev utterances); InputError naming the data if it is unusable."""
    try:
        train_set = data.read_corpus(args.data, args.alphabet, log, runs.cache_dir())
        train_set = data.filter_trainable(train_set, args.max_seconds, model.output_lengths, log)
        train_set = train_set[:args.overfit] if args.overfit else train_set
        if not train_set:
            raise InputError(f"no trainable utterances left in {' '.join(args.data)} (see the counts above)")
        if args.overfit:
            return train_set, train_set
        return train_set, data.read_corpus(args.dev, args.alphabet, log, runs.cache_dir())
    except InputError as e:
        raise runs.moved_corpus_error(e, args) from None


def build_loaders(args, train_set, dev_set, ranks, log):
    """(train loader, its batch sampler, dev loader)."""
    sampler = data.BucketBatches([u["seconds"] for u in train_set], args.batch_seconds, args.seed,
                                 rank=ranks.rank, world_size=ranks.world_size)
    if len(sampler) == 0:
        raise InputError(f"fewer batches than processes; lower --batch-seconds ({args.batch_seconds})")
    left_out = len(sampler.batches) - ranks.world_size * len(sampler)
    if left_out:  # every rank takes the same number of steps, so each epoch leaves these few batches out
        log(f"data: {len(sampler.batches)} batches an epoch over {ranks.world_size} processes, "
            f"{len(sampler)} steps each: the last {left_out} of each epoch's order (others each epoch) "
            f"are left out of it")
    pin_memory = ranks.device.type == "cuda"
    dev_batches = data.BucketBatches([u["seconds"] for u in dev_set], args.batch_seconds, shuffle=False)
    dev_loader = data.batch_loader(dev_set, dev_batches, args.alphabet, args.workers, pin_memory,
                                   runs.ignore_signals)
    if ranks.main:  # the rank that evaluates
        # Start the dev workers now, while this process is small: forked later from a process holding
        # the training's memory, they slowed the next steps (copy on write), 10 s on AN4 (RESULTS.md).
        with runs.signals_held():  # a Ctrl-C now ends the start cleanly, after the workers are up
            iter(dev_loader)
    train_loader = data.batch_loader(train_set, sampler, args.alphabet, args.workers, pin_memory,
                                     runs.ignore_signals)
    return train_loader, sampler, dev_loader


def build_optimizer(args, checkpoint, model, device, rank):
    """AdamW and the moving average of the weights (or None), new or as the checkpoint left them, and
    the runs.Progress so far."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    # Its weights keep requires_grad, though no loss reaches them: bf16 autocast caches casts only of such
    # weights, and the CPU GRU would recast its own every time step (evaluation 3.6x slower, RESULTS.md).
    average = copy.deepcopy(model) if args.ema_decay else None
    if checkpoint is None:
        return optimizer, average, runs.Progress()
    progress = runs.restore_training_state(checkpoint, model, average, optimizer, device, rank)
    return optimizer, average, progress


# ------------------------------------------------------------------------ the run
def train(argv=None, model=None):
    """Train as the command line says; returns the model the checkpoints hold (on every rank). model: a
    module to train instead of the flags' CTCModel, called and checkpointed as it is (ablation.py).
    Raises InputError, naming the flag, file or checkpoint, before anything is written where it can."""
    rank, world_size = launched()
    log = (lambda message: print(message, flush=True)) if rank == 0 else (lambda message: None)
    args, checkpoint, start = resolve_args(argv, world_size, log)
    if args.overfit:  # the health check: nothing may stand between the model and its training set
        args.freq_warp, args.freq_masks, args.time_masks, args.dropout = 0.0, 0, 0, 0.0
        args.speed_perturb, args.ema_decay = False, 0.0  # and it scores the trained weights themselves
    here = checkpoint is not None and Path(args.run_dir).resolve() == Path(args.resume).parent.resolve()
    runs.check_run_dir(args.run_dir, here)  # before the data scan, which can take minutes
    with contextlib.ExitStack() as cleanup:  # what the run holds, given back however it ends
        device, bf16 = setup_device(args, world_size, cleanup)
        ranks = Ranks(rank, world_size, device)
        if device.type == "cpu" and model is None and (args.rnn_layers, args.rnn_hidden) == (5, 512):
            log(f"note: these are train.py's defaults, the GPU recipe, on a CPU ({CORES} cores): it would "
                f"take days. On a CPU start from a recipe: @recipes/an4.args or "
                f"@recipes/mini-librispeech.args")
        torch.manual_seed(args.seed)
        model = (model or CTCModel(model_config(args))).to(device)
        if start:  # before the moving average copies the model
            fresh, new_symbols = runs.load_matching(model, start)
            log(f"init: {len(model.state_dict()) - len(fresh)} tensors from {args.init_from}; "
                f"initialized afresh: {', '.join(fresh) or 'none'}; output rows afresh for "
                f"{len(new_symbols)} of {len(model.vocab)} symbols{': ' if new_symbols else ''}"
                f"{' '.join(new_symbols[:40])}")
        train_set, dev_set = read_data(args, model, log)
        origin = checkpoint.get("started_from") if checkpoint else runs.started_from(args, start)
        identity = {"run_id": checkpoint["run_id"] if here else runs.new_run_id(),  # a branch is a new run
                    "started_from": origin,
                    "train_set": runs.corpus_id(train_set), "dev_set": runs.corpus_id(dev_set)}
        if checkpoint:
            runs.check_same_data(checkpoint, args.resume, identity)
        runs.claim_run_dir_on_rank_0(args, here, cleanup, ranks)
        loader, sampler, dev_loader = build_loaders(args, train_set, dev_set, ranks, log)
        optimizer, average, progress = build_optimizer(args, checkpoint, model, device, rank)
        run = Run(args, ranks, bf16, Path(args.run_dir), model, average, optimizer, identity, dev_loader,
                  log, LogInterval(device))
        if checkpoint and ranks.main:
            runs.keep_metrics_until(progress.step, Path(args.resume).parent / "metrics.jsonl", run.dir)
        if ranks.main:
            run.metrics = cleanup.enter_context(open(run.dir / "metrics.jsonl", "a", buffering=1))
        stop = runs.catch_stop_signals(cleanup)  # a list, checked once per step and per dev batch
        ended = train_loop(run, loader, sampler, progress, stop)
        if ranks.main and ended != "finished":
            log(runs.stopped_message(ended, stop, progress, args, run.dir, world_size))
        if world_size > 1:
            dist.barrier()  # the others wait for rank 0's final evaluation and save, then all leave together
    if ended == "signal":
        raise Stopped(stop[0] if stop else signal.SIGTERM)  # none here: a signal to another rank stopped it
    return average or model


@dataclasses.dataclass
class Ranks:
    """This process among the training processes: torchrun starts one per GPU, python one."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self):
        """Whether this is rank 0, which alone logs, evaluates and saves."""
        return self.rank == 0

    def agree(self, *flags):
        """Each flag, true on every rank if it is true on any. DDP, place 3 of 3: the ranks must take
        the same path, or the next all-reduce hangs. A host sync under DDP; nothing with one process."""
        if self.world_size == 1:
            return flags
        agreed = torch.tensor([float(flag) for flag in flags], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return tuple(bool(flag) for flag in agreed.tolist())

    def random_states(self):
        """[CPU, CUDA or None] random state of every rank, for a checkpoint: each rank draws its own
        augmentation (its batches differ), so a resume must give each its own back. Every rank calls it."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        state = [torch.get_rng_state(), cuda]
        if self.world_size == 1:
            return [state]
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states


@dataclasses.dataclass
class Run:
    """What the loop works with, settled before it starts."""
    args: argparse.Namespace
    ranks: Ranks
    bf16: bool
    dir: Path
    model: torch.nn.Module                # what AdamW trains
    average: torch.nn.Module              # its moving average (None: off), evaluated and saved
    optimizer: torch.optim.Optimizer
    identity: dict                        # run id and corpus fingerprints, saved in each checkpoint
    dev_loader: torch.utils.data.DataLoader
    log: object
    interval: LogInterval                 # the steps since the last log line
    metrics: object = None                # metrics.jsonl, open on rank 0
    cer_history: list = dataclasses.field(default_factory=list)  # dev CERs, for diagnose()
    block_norms: dict = dataclasses.field(default_factory=dict)  # gradient norms before the evaluation
    eval_seconds: float = 0.0             # spent evaluating, which --max-minutes leaves out
    evaluated_step: int = -1              # the step of the last finished evaluation

    @property
    def device(self):
        return self.ranks.device

    def training_minutes(self, run_start):
        return (time.time() - run_start - self.eval_seconds) / 60

    def save(self, name, progress, rng):
        """Rank 0 writes a checkpoint; rng: every rank's random state (Ranks.random_states, a collective)."""
        if self.ranks.main:
            runs.save_training_state(self.dir / name, self.model, self.average, self.optimizer, progress,
                                     self.args, self.identity, rng)

    def write_metrics(self, record, run_start):
        self.metrics.write(json.dumps({**record, "wall_seconds": time.time() - run_start}) + "\n")


def train_loop(run, loader, sampler, progress, stop):
    """The training steps until the last epoch, a signal or --max-minutes; returns which ended it:
    "finished", "signal" or "time". Every rank runs it; rank 0 alone logs, evaluates and saves."""
    args, p, ranks, log = run.args, progress, run.ranks, run.log
    log(f"model: {sum(t.numel() for t in run.model.parameters()) / 1e6:.2f}M parameters, "
        f"{FRAMES_PER_SECOND / run.model.config.time_stride:.0f} output frames/s, "
        f"device {run.device}{' bf16' if run.bf16 else ''}, world size {ranks.world_size}")
    # DDP, place 2 of 3: its backward averages the gradients over the ranks.
    ddp_model = torch.nn.parallel.DistributedDataParallel(run.model) if ranks.world_size > 1 else run.model
    total_steps, run_start, start_step = args.epochs * len(sampler), time.time(), p.step
    log(f"run: {run.dir}  ({len(sampler)} steps/epoch, {total_steps} steps in all)")
    log("note: the greedy output is mostly blank at first (the 'blank plateau'); letters follow, then words")
    ended, bad_in_a_row, limit = None, 0, args.max_minutes or math.inf
    # A stop abandoned the evaluation of this step: it comes first.
    if p.eval_pending and not evaluate_and_keep_best(run, p, f"eval step {p.step}", run_start, stop):
        ended = "signal"
    run.model.train()
    while p.epoch < args.epochs and not ended:
        sampler.set_epoch(p.epoch, p.batch_in_epoch)
        for batch in run.interval.timed(loader):
            # At least one step a start: a resume always moves the run on.
            late = ranks.main and p.step > start_step and run.training_minutes(run_start) > limit
            signalled, late, unusable = ranks.agree(bool(stop), late, batch is None)
            if signalled or late:
                ended = "signal" if signalled else "time"
                break
            lr = learning_rate(p.step, total_steps, args)
            run.optimizer.param_groups[0]["lr"] = lr  # the one group: every parameter
            outcome = "skipped" if unusable else train_step(run, ddp_model, batch, p.step)
            bad_in_a_row = bad_in_a_row + 1 if outcome == "not finite" else 0
            if bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                raise InputError(runs.diverged_message(args, run.dir, ranks.world_size, bad_in_a_row))
            p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
            run.interval.count(outcome, batch["wave_lengths"].sum().item() / data.SAMPLE_RATE if batch else 0)
            if p.step % args.log_every == 0 and ranks.main:
                eta = (time.time() - run_start) / max(1, p.step - start_step) * (total_steps - p.step)
                line, record = run.interval.report(p.epoch, p.step, total_steps, lr, eta)
                log(line)
                run.write_metrics(record, run_start)
            if p.step % args.eval_every == 0 and not evaluate_and_keep_best(run, p, f"eval step {p.step}",
                                                                            run_start, stop):
                ended = "signal"
                break
            if p.step % args.save_every == 0:
                run.save("last.pt", p, ranks.random_states())
        if p.batch_in_epoch == len(sampler):  # also when stopped on its last batch: a resume starts the next
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    del ddp_model  # before the process group goes: a DDP model left to exit's garbage collection hung there

    # ---- the end: a finished or timed-out run is scored once more unless its last step just was
    final_due = ended != "signal" and run.evaluated_step != p.step
    if final_due and not evaluate_and_keep_best(run, p, "final", run_start, stop):
        ended = "signal"
    run.save("last.pt", p, ranks.random_states())
    if p.epoch >= args.epochs and ended != "signal":
        return "finished"
    return ended


def train_step(run, model, batch, step):
    """One step on a batch: forward, CTC loss, backward, clip, then the weights and their moving average
    move unless the loss or the gradient is not finite. Returns "trained", "not finite" or "out of
    memory". model: run.model, or its DDP wrapper under torchrun."""
    args, optimizer, out_of_memory = run.args, run.optimizer, False
    try:
        log_probs, out_lengths = forward(model, batch, run.device, run.bf16)
        # CTC takes (T, B, vocab); the mean is each utterance's loss over its target length, then the batch's.
        targets = batch["targets"].to(run.device, non_blocking=True)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, batch["target_lengths"],
                          blank=BLANK, zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if (step + 1) % args.eval_every == 0:  # this step ends in an evaluation, which logs them
            run.block_norms = gradient_norms_by_block(run.model)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
        # A NaN or inf must not reach the weights. The step's one host sync (under DDP, the agreement too).
        if not (torch.isfinite(grad_norm).item() and torch.isfinite(loss).item()):
            return "not finite"
        optimizer.step()
        update_average(run.average, run.model, step, args.ema_decay)
    except torch.OutOfMemoryError:
        if run.ranks.world_size > 1:  # the other ranks already wait in this step's all-reduce: it must end
            raise
        out_of_memory = True
    if out_of_memory:  # out of the except: its traceback held the failed batch's activations
        log_probs = loss = None
        skip_out_of_memory(batch, optimizer, run.device, args, run.log)
        return "out of memory"
    run.interval.add(loss, grad_norm, log_probs, out_lengths)
    return "trained"


def evaluate_and_keep_best(run, progress, label, run_start, stop):
    """On every rank: rank 0 scores the model's greedy output on dev (corpus-level WER and CER), logs it
    with the health signals (the three longest pairs, each block's gradient norm, a warning if the run
    looks stuck) and keeps best.pt. Returns False when a stop signal abandoned it, so that last.pt is
    saved within seconds (progress.eval_pending: a resume redoes it first). A dev set of only unusable
    files ends every rank with rank 0's error."""
    started, refs, hyps, abandoned = time.time(), [], [], False
    if run.ranks.main:
        dev_batches = itertools.takewhile(lambda _: not stop, run.dev_loader)  # a stop ends it early
        refs, hyps = greedy_corpus(run.average or run.model, dev_batches, run.device, run.bf16)
        abandoned = bool(stop)
    # a WER of nothing would read as 0.00% and freeze best.pt
    abandoned, unscorable = run.ranks.agree(abandoned, run.ranks.main and not abandoned and not refs)
    progress.eval_pending = abandoned
    if abandoned:
        return False
    if unscorable:
        raise InputError(f"--dev {' '.join(run.args.dev)}: none of its utterances could be scored, each "
                         f"file was skipped (the warnings above say why); fix or replace the dev set")
    run.evaluated_step = progress.step
    rng = run.ranks.random_states()  # for best.pt, which rank 0 alone knows whether to write
    if not run.ranks.main:
        return True
    (wer, cer), seconds = data.error_rates(refs, hyps), time.time() - started
    run.cer_history.append(cer)
    run.eval_seconds += seconds
    run.interval.leave_out(seconds)
    norms = f"  gradient norms {run.block_norms}" if run.block_norms else ""  # none for a final one
    run.log(f"{label}: dev WER {wer:.2f}% CER {cer:.2f}% ({seconds:.1f} s){norms}")
    for ref, hyp in list(zip(refs, hyps))[-3:]:  # the longest: the shortest are often single words
        run.log(f"  ref: {ref}\n  hyp: {hyp}")
    warning = diagnose(hyps, run.cer_history, progress.step, run.args.warmup_steps)
    if warning:
        run.log(f"warning: {warning}")
    run.write_metrics({"epoch": progress.epoch, "step": progress.step, "dev_wer": wer, "dev_cer": cer,
                       "grad_norms": run.block_norms, "warning": warning, "eval_seconds": seconds}, run_start)
    run.block_norms = {}  # measured for this evaluation only
    if (wer, cer) < (progress.best_wer, progress.best_cer):  # a tie in WER goes to the better CER
        progress.best_wer, progress.best_cer = wer, cer
        run.save("best.pt", progress, rng)
    return True


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


def greedy_corpus(model, batches, device, bf16=False):
    """(references, greedy hypotheses) over batches from data.collate; a None batch (only unusable
    files) is passed over. The model is scored in eval mode and left in the mode it was in."""
    refs, hyps, training = [], [], model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in filter(None, batches):
            log_probs, out_lengths = model(batch["waves"].to(device), batch["wave_lengths"])
            hyps += greedy_decode(log_probs, out_lengths, model.vocab)
            refs += batch["texts"]
    model.train(training)
    return refs, hyps


def main(argv=None):
    """The command line: train() with its InputError printed as 'error: ...' and exit status 1. Under
    torchrun the other ranks meet the same error: rank 0 alone prints it."""
    main_rank = launched()[0] == 0
    runs.utf8_output()
    kill_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # told while starting, as Ctrl-C
    try:
        train(argv)
    except InputError as e:
        sys.exit(f"error: {e}" if main_rank else 1)
    except Stopped as e:  # last.pt is saved and the resume command printed
        sys.exit(128 + e.args[0])
    except KeyboardInterrupt:  # the loop turns Ctrl-C into a stop; before it starts there is nothing to save
        sys.exit("error: interrupted while starting, before the first step: nothing was trained or saved"
                 if main_rank else 130)
    finally:
        signal.signal(signal.SIGTERM, kill_handler)  # given back to a caller in Python


if __name__ == "__main__":
    main()
