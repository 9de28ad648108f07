"""The run folder: what train.py keeps on disk, the checks that keep it safe, and what decode.py
needs of it. Also what both commands share: flag types, whole-or-nothing file writes, the duration cache,
and stop signals (Ctrl-C, SIGTERM) kept from DataLoader workers.

    lock = claim_run_dir(args, resuming_here)              # a new folder, or the resumed one; locked
    save_training_state(run_dir / "last.pt", model, ...)   # whole or not at all
    args, checkpoint = resume_args(build_parser, argv, args, ...)     # --resume: the run's flags, checked
    model, checkpoint = build_from_checkpoint("runs/<run>/best.pt")   # decode.py

A run folder holds last.pt (every --save-every steps and at the end), best.pt (the best dev WER, ties
broken by CER), metrics.jsonl (a JSON line per log line and evaluation) and train.lock (the live
process). A folder that holds a run is never reused for a new one, and a resume never rewinds one.
Checkpoints hold only tensors and plain Python types: torch.load(..., weights_only=True) reads them.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import shlex
import signal
import socket
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data import InputError
from model import ENGLISH, CTCModel, ModelConfig, vocabulary

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a folder holding any of these holds a run
MODEL_KEYS = ("model_config", "model", "vocab")       # what rebuilds the model
# The model flags that --init-from takes from its checkpoint: the weights' shapes and what they read.
SHAPE = ("n_mels", "time_stride", "conv_channels", "rnn_layers", "rnn_hidden", "norm_range_db",
         "reference_ms", "floor_db")
RESUME_KEYS = MODEL_KEYS + ("train_config", "optimizer", "step", "epoch", "batch_in_epoch", "best_wer",
                            "best_cer", "rng_cpu", "rng_cuda", "world_size", "run_id", "train_set", "dev_set")


def resume_command(checkpoint, world_size):
    """The command that continues a run of world_size processes from this checkpoint, ready to paste:
    on one machine (torchrun --standalone: a free port, so that two runs can train side by side). Runs
    over several machines are launched by hand, and resumed the same way with --resume."""
    launcher = "python" if world_size == 1 else f"torchrun --standalone --nproc_per_node={world_size}"
    return f"{launcher} train.py --resume {shlex.quote(str(checkpoint))}"


def saved_world_size(checkpoint_path):
    """The number of processes the run of this last.pt trained in (1 if it cannot be read)."""
    try:
        return int(torch.load(checkpoint_path, map_location="cpu", weights_only=True)["world_size"])
    except Exception:  # a damaged file is named by the resume itself
        return 1


# ------------------------------------------------------------- flags and files both commands share
def write_atomically(path, write):
    """Write a file whole or not at all: write(f) fills a temporary file beside path (binary), which is
    flushed to disk and renamed over it; a crash or kill mid-write leaves the old file as it was."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # the pid: two processes may write one file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def in_range(kind, low, high=math.inf, low_open=False, or_off=False):
    """An argparse type: a number in [low, high), or (low, high); or_off: 0 too (the feature off)."""
    def parse(text):
        value = kind(text)
        if or_off and value == 0:
            return value
        if not (low < value if low_open else low <= value) or not value < high:  # NaN fails too
            bounds = f"{'(' if low_open else '['}{low}, {high})"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}{' (or 0: off)' if or_off else ''}")
        return value
    return parse


def named_path(text):
    """An argparse type: a path that is not empty, as an unset shell variable ($CKPT) would leave it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); name a file or folder")
    return text


def device(text):
    """An argparse type: a torch device that exists here, checked before anything is written."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that PyTorch can use; "
                                         f"use --device cpu")
    return text


def utf8_output():
    """Print UTF-8 whatever the locale, as Python's UTF-8 mode does: under LANG=C a transcript in another
    alphabet would otherwise end a decode or a run with UnicodeEncodeError. For each command's main()."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")


def cache_dir():
    """Where the commands keep what is slow to learn again: audio durations (data.audio_info)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctc-baseline"


def ignore_signals(_):
    """A DataLoader worker_init_fn: workers leave Ctrl-C and SIGTERM to the main process, which saves
    (train.py) or prints what it decoded (decode.py). One that came while the worker started (see
    signals_held) is dropped here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends, as DataLoader workers are started in it: a
    worker forked with them deliverable could die of one before ignore_signals() runs, and the
    loader would fail with a traceback. The workers inherit the hold; this process gets the
    signal when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def catch_stop_signals(cleanup):
    """From now on Ctrl-C and SIGTERM append to the returned list, so that the loop can end its step or
    evaluation, save and say how to resume; the old handlers come back when cleanup (an ExitStack) closes."""
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        cleanup.callback(signal.signal, sig, handler)
    return stop


# ------------------------------------------------------------------------------ the folder
def check_run_dir(run_dir, resuming_here):
    """Refuse, before any work, a --run-dir that holds another run or cannot be made. Reads only;
    claim_run_dir() checks again under the lock."""
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not resuming_here:
        last = run_dir / "last.pt"
        if in_use(run_dir):  # advice to remove it would delete a live run
            advice = f"A training process is using it now ({run_dir / 'train.lock'}): let it be, or"
        elif "last.pt" in held:
            advice = f"Continue it with\n  {resume_command(last, saved_world_size(last))}\nor"
        else:
            advice = "It holds no checkpoint (it stopped before its first save): remove it, or"
        raise InputError(f"{run_dir} already holds a run ({', '.join(held)}). {advice} start a new run "
                         f"with another --run-dir.")
    nearest = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK):
        raise InputError(f"--run-dir {run_dir}: cannot write there ({nearest} is not a writable folder); "
                         f"pick another --run-dir")


def in_use(run_dir):
    """Whether a live process holds run_dir's train.lock (a kill -9 leaves it free)."""
    try:
        with open(Path(run_dir) / "train.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file, or not readable: no live run we can see
        return False
    return False


def new_run_dir():
    """Make runs/<date>-<time>, or -2, -3, ... after it when another run took that name this second."""
    stem = time.strftime("runs/%Y%m%d-%H%M%S")
    for name in [stem] + [f"{stem}-{n}" for n in range(2, 1000)]:
        with contextlib.suppress(FileExistsError):
            Path(name).mkdir(parents=True)
            return name
    raise FileExistsError(errno.EEXIST, "every name is taken", stem)


def claim_run_dir(args, resuming_here):
    """Create the run folder (or reopen it, to resume there) and lock it for this process; sets
    args.run_dir. Returns the lock file, to hold open for the whole run: the kernel releases the lock
    when the process ends, even by kill -9. A folder that holds a run is refused unless resumed there."""
    typed = args.run_dir is not None
    try:
        args.run_dir = args.run_dir or new_run_dir()
        run_dir = Path(args.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / "train.lock", "a+")
    except OSError as e:
        where = "--run-dir" if typed else "the default run folder (runs/<date>-<time> here)"
        raise InputError(f"{where} {e.filename}: cannot write there ({e.strerror}); pick a --run-dir "
                         f"where you can write") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_run_dir(run_dir, resuming_here)  # again: another process may have started there meanwhile
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise InputError(f"{run_dir} is in use by another training process ({holder}, per "
                         f"{run_dir / 'train.lock'}); wait for it to end, or pick another "
                         f"--run-dir") from None
    except InputError:
        lock.close()
        raise
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    for unfinished in run_dir.glob("*.pt.*.tmp"):  # a save killed midway (kill -9): ours, under the lock
        unfinished.unlink(missing_ok=True)
    return lock


def claim_run_dir_on_rank_0(args, resuming_here, cleanup, ranks):
    """Rank 0 claims the run folder (held until cleanup, an ExitStack, closes); every rank raises if it
    could not, so that the others end with it rather than wait for it (only rank 0 prints the error).
    ranks: train.Ranks."""
    problem = None
    if ranks.main:
        try:
            cleanup.enter_context(claim_run_dir(args, resuming_here))
        except InputError as e:
            problem = e
    if ranks.agree(problem is not None)[0]:
        raise problem or InputError("rank 0 could not claim the run folder")


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def keep_metrics_until(step, source, run_dir):
    """run_dir/metrics.jsonl as source's lines up to this step: those a killed run logged after its
    checkpoint will be logged again; a branch into a new folder starts with its history."""
    if source.exists():
        kept = "".join(f"{line}\n" for line in source.read_text().splitlines() if logged_step(line) <= step)
        write_atomically(run_dir / "metrics.jsonl", lambda f: f.write(kept.encode()))


# ----------------------------------------------------------------------------- checkpoints
def model_checkpoint(model):
    """The part of every checkpoint that rebuilds the model: plain types and tensors only."""
    return {"model_config": asdict(model.config), "model": model.state_dict(), "vocab": list(model.vocab)}


def save_checkpoint(checkpoint, path):
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, keys=MODEL_KEYS, name=None):
    """A checkpoint train.py wrote, holding these keys, or InputError naming it as name (default: its
    path). One written before models had alphabets (its config has a vocab_size) is read as English's,
    one written before norm_range_db as 0, before reference_ms and floor_db as one frame and 1e-6."""
    path = Path(path)
    name = name or str(path)
    if path.is_dir():
        raise InputError(f"{name}: a folder; name a checkpoint in it (best.pt, or last.pt)")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save's format; a pickle would warn first
        with open(path, "rb") as f:
            begun = f.read(4) == b"PK\x03\x04"  # a zip's start without its end
        problem = "not a PyTorch checkpoint (train.py writes best.pt and last.pt); name one"
        if begun:
            problem = "not a readable train.py checkpoint: cut short or damaged (an unfinished copy?)"
        raise InputError(f"{name}: {problem}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        missing = [key for key in keys if key not in checkpoint]
        if missing:
            raise KeyError(f"it lacks {', '.join(missing)}")
    except FileNotFoundError:
        last = path.with_name("last.pt")
        raise InputError(f"{name}: no such file" + (
            f"; no evaluation has run yet in that run (best.pt is written by each one), but {last} is "
            f"there: use that" if path.name == "best.pt" and last.exists() else "") + (
            f"; {path.parent} holds no checkpoint: its run stopped before its first save"
            if path.name == "last.pt" and path.parent.is_dir() else "")) from None
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: never, for a foreign file
        raise InputError(f"{name}: not a checkpoint written by train.py (it holds more than tensors and "
                         f"plain types, or is not a PyTorch file)") from None
    except Exception as e:  # a truncated or foreign file fails in many ways
        reason = one_line(e)
        raise InputError(f"{name}: not a readable train.py checkpoint ({type(e).__name__}: "
                         f"{reason})") from None
    config = checkpoint.get("model_config", {})
    config.pop("vocab_size", None)  # before alphabets: English's, as its vocab (checked below) says
    config.setdefault("alphabet", ENGLISH)
    config.setdefault("norm_range_db", 0.0)  # written before it existed: statistics over every frame
    config.setdefault("reference_ms", 10)    # and before these: the loudest frame, an absolute floor
    config.setdefault("floor_db", 0.0)
    symbols = vocabulary(config["alphabet"])
    if "vocab" in checkpoint and checkpoint["vocab"] != symbols:
        raise InputError(f"{name}: its vocabulary {''.join(checkpoint['vocab'])!r} is not its model's "
                         f"{''.join(symbols)!r}; use the code that wrote it")
    return checkpoint


def one_line(error, limit=300):
    """An exception's message on one line, cut at limit: load_state_dict's names the tensors on the lines
    after its first."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def build_from_checkpoint(path):
    """(the model a checkpoint holds, the checkpoint), on the CPU, or InputError."""
    checkpoint = load_checkpoint(path)
    extra = sorted(set(checkpoint["model_config"]) - set(asdict(ModelConfig())))
    if "features" in extra:  # ablation.AblationConfig's own fields
        raise InputError(f"{path}: the checkpoint of an ablation.py row, whose model ({', '.join(extra)}) "
                         f"this code does not build: its weights load into ablation.build(<row>)[0], as "
                         f"ablation.py's docstring shows")
    try:
        model = CTCModel(ModelConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: its model does not fit this code's ({one_line(e)}); "
                         f"use the code that wrote it") from None
    return model, checkpoint


def as_flag(name):
    return "--" + name.replace("_", "-")


def typed_flags(build_parser, argv):
    """{name: value} of the flags argv gives, even those given at their defaults."""
    parser, untyped = build_parser(), object()
    # argparse fills in a default only where the namespace has no value yet
    untouched = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args([])), untyped))
    parsed = vars(parser.parse_args(argv, untouched))
    return {name: value for name, value in parsed.items() if value is not untyped}


def init_args(args, typed, log):
    """--init-from: the checkpoint whose model starts a new run (build_from_checkpoint's checks); a run
    folder's best.pt. Its model's shape (SHAPE) becomes the run's: a shape flag typed (typed: {name:
    value}) with another value is refused; a recipe's gives way, before or after the typed flags."""
    path = Path(args.init_from)
    path = path / "best.pt" if path.is_dir() else path  # a run folder: its best model
    args.init_from = str(path.absolute())
    start = build_from_checkpoint(path)[1]
    for name in SHAPE:
        saved, asked = start["model_config"][name], getattr(args, name)
        if name in typed and typed[name] != saved:
            raise InputError(f"--init-from {path}: its model has {as_flag(name)} {saved}, and "
                             f"{as_flag(name)} {typed[name]} would be another model; drop the flag, or train "
                             f"from scratch without --init-from")
        if asked != saved:
            log(f"init: {as_flag(name)} {saved}, the model's, in place of {asked}")
        setattr(args, name, saved)
    return start


def load_matching(model, start):
    """Copy into model every tensor of the checkpoint start whose name and shape match; of the output
    layer, whose rows are symbols, the rows of the symbols both write (blank and space always), wherever
    each alphabet has them. Returns (the names not loaded, the symbols whose rows start afresh)."""
    own, theirs = model.state_dict(), start["model"]
    loaded = {name: tensor for name, tensor in theirs.items()
              if name in own and own[name].shape == tensor.shape and not name.startswith("output.")}
    their_row = {symbol: row for row, symbol in enumerate(vocabulary(start["model_config"]["alphabet"]))}
    shared = [(row, their_row[symbol]) for row, symbol in enumerate(model.vocab) if symbol in their_row]
    if own["output.weight"].shape[1:] == theirs["output.weight"].shape[1:]:  # the same width of GRU
        rows, their_rows = map(list, zip(*shared))
        for name in ("output.weight", "output.bias"):
            loaded[name] = own[name].clone()
            loaded[name][rows] = theirs[name][their_rows]
    model.load_state_dict(loaded, strict=False)
    new_symbols = [symbol for symbol in model.vocab if symbol not in their_row]
    if "output.weight" not in loaded:
        new_symbols = model.vocab
    return sorted(set(own) - set(loaded)), new_symbols


def started_from(args, start):
    """What a new run's checkpoints record of the checkpoint it started from, start (None: from scratch)."""
    if start is None:
        return None
    return {"checkpoint": args.init_from, "run_id": start.get("run_id"), "step": start.get("step")}


def resume_args(build_parser, argv, args, may_change, build_model, world_size):
    """(the run's flags, its checkpoint) for a command line with --resume: the flags the run was
    started with, plus those argv names among may_change (and --run-dir). A typed flag that would
    change the run is refused, whatever its value, as is a checkpoint that cannot continue here.
    args: argv parsed; build_parser() makes the parser; build_model(flags) the run's model."""
    path = Path(args.resume)
    path = path / "last.pt" if path.is_dir() else path
    checkpoint = load_checkpoint(path, RESUME_KEYS, name=f"--resume {path}")
    given = {k: getattr(args, k) for k in typed_flags(build_parser, argv) if k != "resume"}
    refused = [as_flag(k) for k in given if k not in may_change + ("run_dir",)]
    if refused:  # silently ignoring them would train something other than what was asked
        raise InputError(f"--resume continues {path} with the flags it was started with, which the "
                         f"checkpoint holds; {' '.join(refused)} cannot be typed with it, even unchanged "
                         f"(only "
                         f"{' '.join(map(as_flag, may_change))} can). Drop them (and any recipe file), or "
                         f"start a new run with a new --run-dir.")
    unknown = [as_flag(k) for k in vars(build_parser().parse_args([])) if k not in checkpoint["train_config"]]
    if unknown:  # train.py has gained flags since: their defaults need not be what that run did
        raise InputError(f"--resume {path}: written by an older train.py, before {' '.join(unknown)} "
                         f"existed; continue it with the code that wrote it, or start a new run from its "
                         f"model with --init-from {path}")
    saved = argparse.Namespace(**checkpoint["train_config"])
    run_dir = Path(given.get("run_dir") or path.parent)
    check_resumable(checkpoint, path, build_model(saved), run_dir, world_size)
    resumed = argparse.Namespace(**{**vars(saved), **given, "resume": str(path), "run_dir": str(run_dir)})
    try:
        device(resumed.device)
    except argparse.ArgumentTypeError as e:
        raise InputError(f"--resume {path}: the run used --device {resumed.device}: {e}") from None
    return resumed, checkpoint


def moved_corpus_error(error, args):
    """A resumed run's unreadable data, error, told with where the run read it and how to say where it
    moved; error itself when not resuming."""
    if not args.resume:
        return error
    return InputError(f"{error}\nThe run in {args.resume} reads --data {' '.join(args.data)} --dev "
                      f"{' '.join(args.dev)}. If they moved, resume with --data and --dev naming where they "
                      f"are now (checked to be the same utterances).")


def check_resumable(checkpoint, path, model, run_dir, world_size):
    """Refuse a resume that could not continue the same run: weights or optimizer state that do not
    fit the model its flags build, another number of processes, a finished run, or a rewind of
    run_dir to before its last.pt."""
    try:
        if checkpoint["model_config"] != asdict(model.config):
            raise ValueError("its model shape differs from the flags it was saved with")
        model.load_state_dict(checkpoint["model"])
        torch.optim.AdamW(model.parameters()).load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"--resume {path}: its weights or optimizer state do not fit this code's model "
                         f"({one_line(e)}); use the code that wrote it, or start a "
                         f"new run") from None
    saved_size, epochs = checkpoint["world_size"], checkpoint["train_config"]["epochs"]
    if world_size != saved_size:  # the steps per epoch, the schedule and the batch order would change
        trained_in = "1 process" if saved_size == 1 else f"{saved_size} processes"
        raise InputError(f"--resume {path}: the run trained in {trained_in}, this is {world_size}. "
                         f"Continue it as it started:\n  {resume_command(path, saved_size)}")
    # More epochs would be another learning-rate schedule; a final evaluation cut short is still to run.
    if checkpoint["epoch"] >= epochs and not checkpoint.get("eval_pending"):
        raise InputError(f"--resume {path}: that run finished its {epochs} epochs at step "
                         f"{checkpoint['step']}; there is nothing to continue. To train longer, start a "
                         f"new run.")
    held = next((run_dir / name for name in ("last.pt", "best.pt") if (run_dir / name).exists()), None)
    if held and held.resolve() != path.resolve() and run_dir.resolve() == path.parent.resolve():
        check_same_run(checkpoint, path, held, saved_size)


def check_same_run(checkpoint, path, held, world_size):
    """Refuse to continue in held's folder a checkpoint of another run, or one from before held's step:
    either would overwrite that run's checkpoints and mix its metrics.jsonl."""
    branch = (f"branch from step {checkpoint['step']} into a new folder:\n  "
              f"{resume_command(path, world_size)} --run-dir NEW_FOLDER")
    try:
        run = load_checkpoint(held, ("run_id", "step", "epoch", "train_config"))
    except InputError as e:
        raise InputError(f"{e}. --resume {path} would continue that folder's run over it: move the damaged "
                         f"file out of the way first, or {branch}") from None
    if run["run_id"] != checkpoint["run_id"]:
        raise InputError(f"--resume {path} is a checkpoint of another run than the one in {held.parent} "
                         f"(run {checkpoint['run_id']}; {held.name} there is of run {run['run_id']}): "
                         f"continuing it there would mix the two. Continue it in a folder of its own, or "
                         f"{branch}")
    if run["step"] > checkpoint["step"]:  # continuing here would overwrite the later work
        later = (f"whose {held.name} finished the run at step {run['step']}. To go on from step "
                 f"{checkpoint['step']}, "
                 if run["epoch"] >= run["train_config"]["epochs"] else
                 f"whose {held.name} is at step {run['step']}. Continue it with\n  "
                 f"{resume_command(held, world_size)}\nor ")
        raise InputError(f"--resume {path} (step {checkpoint['step']}) would rewind the run in "
                         f"{held.parent}, {later}{branch}")


# -------------------------------------------------------------------------- training state
@dataclass
class Progress:
    """How far a run is, saved in each checkpoint and continued by a resume."""
    step: int = 0                   # optimizer steps taken (skipped batches count too)
    epoch: int = 0
    batch_in_epoch: int = 0         # batches of this epoch done: a resume replays the rest
    best_wer: float = math.inf      # the best dev WER so far, and its CER (best.pt)
    best_cer: float = math.inf
    eval_pending: bool = False      # a stop abandoned this step's evaluation: a resume runs it first


def new_run_id():
    """A run's identity, kept by its resumes in its folder: a checkpoint continues only its own run."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def corpus_id(utterances):
    """What a resume must find again: the same utterances and transcripts (so the same epochs, batch
    order and dev scores), wherever the corpus now lives."""
    lines = "\n".join(f"{u['id']}\t{u['text']}" for u in utterances)
    return {"utterances": len(utterances), "sha1": hashlib.sha1(lines.encode()).hexdigest()[:16],
            "seconds": round(sum(u["seconds"] for u in utterances), 2)}


def check_same_data(checkpoint, path, identity):
    """Refuse a resume whose training or dev set is not the run's (ids, transcripts or durations)."""
    for key, flag, what in (("train_set", "--data", "the epochs, schedule and batch order"),
                            ("dev_set", "--dev", "the dev scores that chose best.pt")):
        if checkpoint[key] != identity[key]:
            raise InputError(f"--resume {path}: the {'training' if key == 'train_set' else 'dev'} data "
                             f"({flag}) changed ({identity[key]} now, {checkpoint[key]} then), and with it "
                             f"{what}. Restore it, or start a new run.")


def save_training_state(path, model, average, optimizer, progress, args, identity, rng):
    """A checkpoint: the model to evaluate and decode ("model": the moving average where there is one)
    and all a resume continues from: "trained_model" (what AdamW trains), optimizer, progress, flags and
    every rank's random state; progress: a Progress; identity: {"run_id", "train_set", "dev_set"}; rng:
    [CPU state, CUDA state or None] of each rank (train.Ranks.random_states)."""
    save_checkpoint({
        **model_checkpoint(average or model), "train_config": vars(args),
        **({"trained_model": model.state_dict()} if average else {}),
        "optimizer": optimizer.state_dict(), **asdict(progress), "rng_cpu": [cpu for cpu, _ in rng],
        "rng_cuda": [cuda for _, cuda in rng], "world_size": len(rng), **identity}, path)


def restore_training_state(checkpoint, model, average, optimizer, device, rank):
    """Put a checked checkpoint's weights, average, optimizer and this rank's random state back; returns
    its Progress. A checkpoint from before every rank's state was kept holds rank 0's alone."""
    model.load_state_dict(checkpoint["trained_model"] if average else checkpoint["model"])
    if average:
        average.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    cpu, cuda = checkpoint["rng_cpu"], checkpoint["rng_cuda"]
    if isinstance(cpu, list):
        cpu, cuda = cpu[rank], cuda[rank]
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    return Progress(checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"],
                    checkpoint["best_wer"], checkpoint["best_cer"], checkpoint.get("eval_pending", False))


def stopped_message(ended, stop, progress, args, run_dir, world_size):
    """What a run that did not finish says: why it ended, and the command that continues it."""
    why = f"--max-minutes {args.max_minutes} reached"
    if ended == "signal":  # none caught here: a signal to another rank stopped it
        why = f"stopped by {signal.Signals(stop[0]).name if stop else 'a signal to another process'}"
    pending = " (its evaluation was cut short: the resume runs it first)" if progress.eval_pending else ""
    return (f"{why} at step {progress.step}; {run_dir / 'last.pt'} saved{pending}. Continue with:\n"
            f"  {resume_command(run_dir / 'last.pt', world_size)}")


def diverged_message(args, run_dir, world_size, steps):
    last = run_dir / "last.pt"
    resume = f", or resume from before it: {resume_command(last, world_size)}" if last.exists() else (
        f" ({last} is not written yet: nothing to resume)")
    return (f"{steps} steps in a row had a non-finite loss or gradient: the run has diverged. Lower --lr "
            f"(now {args.lr}) or raise --warmup-steps and start anew{resume}")
