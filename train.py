"""Train the CTC model. The defaults are the recipe for LibriSpeech train-clean-100 on one GPU.

    python train.py --data LibriSpeech/train-clean-100 --dev LibriSpeech/dev-clean
    python train.py --resume runs/<run>/last.pt             # continue a stopped run exactly
    torchrun --nproc_per_node=4 train.py --data ... --dev ...   # DistributedDataParallel

A CPU-sized run (3.8M parameters, under 20 minutes on 2 cores for 5.4 h of audio; see README):
    python train.py --data synth/train-clean-100 --dev synth/dev-clean --rnn-layers 3 --rnn-hidden 256 \
        --time-stride 3 --batch-seconds 100 --epochs 5 --workers 1 --lr 3e-3 --warmup-steps 150 \
        --freq-warp 0.2 --dropout 0 --freq-masks 0 --time-masks 0 --log-every 25 --eval-every 200

Every --log-every steps a line shows loss, learning rate, gradient norm, x-realtime (audio
seconds trained per wall second), data wait, ETA and the share of blank frames in the greedy
output; every --eval-every steps, dev WER/CER. The same numbers go to <run>/metrics.jsonl.
<run>/last.pt is written every --save-every steps and on Ctrl-C; <run>/best.pt has the best dev WER.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import data
import decode
from model import FRAMES_PER_SECOND, CTCModel, ModelConfig, build_from_checkpoint, lengths_mask, model_checkpoint

MAX_BAD_STEPS_IN_A_ROW = 20  # more non-finite steps than this means the run has diverged
STALLED_EVALS = 3            # evaluations without a better dev CER before the run is called stuck
# Flags that change where and how often, not what, a run computes: --resume may change them.
RESUME_MAY_CHANGE = ("device", "bf16", "workers", "log_every", "eval_every", "save_every")
CAUSES = ("Likely causes: learning rate too high or too low (--lr, --warmup-steps); features not "
          "log-mel or not normalized; CTC lengths that ignore the conv stride or the padding; a "
          "vocabulary without space or apostrophe; too little data for the model. Check with "
          "--overfit 20, and see 'When CTC training goes wrong' in the README.")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="training corpora: LibriSpeech-layout directories or TSV manifests")
    g.add_argument("--dev", nargs="+", help="dev corpora, same forms; scored at every evaluation")
    g.add_argument("--max-seconds", type=float, default=30.0, help="skip longer training utterances")
    g.add_argument("--batch-seconds", type=float, default=800.0, help="padded audio seconds per batch")
    g.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding audio")
    g = p.add_argument_group("model")
    g.add_argument("--n-mels", type=int, default=80, help="log-mel bins")
    g.add_argument("--time-stride", type=int, default=2, choices=[1, 2, 3, 4], help="output frames/s = 100 / stride")
    g.add_argument("--conv-channels", type=int, default=32)
    g.add_argument("--rnn-layers", type=int, default=5)
    g.add_argument("--rnn-hidden", type=int, default=512, help="GRU units per direction")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--freq-warp", type=float, default=0.1, help="VTLP per region: scale each frequency region by 1 +- up to this (0: off)")
    g.add_argument("--freq-masks", type=int, default=2, help="SpecAugment frequency masks (0: off)")
    g.add_argument("--time-masks", type=int, default=2, help="SpecAugment time masks (0: off)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=40)
    g.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW)")
    g.add_argument("--warmup-steps", type=int, default=1000, help="linear warmup, then cosine decay to --lr / 100")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overfit", type=int, default=0, metavar="N",
                   help="health check: train and evaluate on N training utterances, no augmentation "
                        "or dropout; a working pipeline drives their CER near zero")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", default=None, help="default: runs/<date>-<time>")
    g.add_argument("--resume", default=None, help="a last.pt to continue from (its run and flags)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default: on for CUDA and for CPUs with AVX512-BF16 (1.3x faster "
                        "steps there), off on other CPUs, which only emulate bf16")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--eval-every", type=int, default=1000)
    g.add_argument("--save-every", type=int, default=500)
    return p.parse_args(argv)


def as_flag(name):
    return "--" + name.replace("_", "-")


def learning_rate(step, total_steps, args):
    """Linear warmup from 0 to --lr, then cosine decay to --lr / 100 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomically(obj, path):
    """Write to a temp file, fsync, rename: a crash mid-write leaves the old file intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_resume(path, log):
    """The checkpoint to resume from, or exit naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint["step"], checkpoint["train_config"], checkpoint["optimizer"]  # noqa: B018
    except FileNotFoundError:
        sys.exit(f"error: --resume {path}: no such file")
    except Exception as e:  # a truncated or foreign file fails in many ways
        sys.exit(f"error: --resume {path}: not a readable train.py checkpoint ({type(e).__name__}: {e})")
    if checkpoint["vocab"] != data.VOCAB:
        sys.exit(f"error: --resume {path}: its vocabulary {''.join(checkpoint['vocab'])!r} differs from "
                 f"this code's {''.join(data.VOCAB)!r}; start a new run or use the matching code")
    log(f"resuming {path} at step {checkpoint['step']}")
    return path, checkpoint


def evaluate(model, loader, device, amp):
    """Dev WER and CER (corpus level) plus a few reference/hypothesis pairs."""
    model.eval()
    refs, hyps = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in loader:
            log_probs, out_lengths = model(batch["waves"].to(device), batch["wave_lengths"])
            hyps += decode.greedy_decode(log_probs, out_lengths)
            refs += batch["texts"]
    model.train()
    wer, cer = decode.error_rates(refs, hyps)
    return wer, cer, list(zip(refs, hyps))


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
    if earlier and min(recent) >= min(earlier):
        return f"dev CER has not improved in {STALLED_EVALS} evaluations (best {min(earlier):.1f}%). {CAUSES}"
    return None


def main(argv=None):
    """Train as the command line says; returns the trained model (on every rank)."""
    args = get_args(argv)
    distributed = "RANK" in os.environ  # set by torchrun
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    master = rank == 0

    def log(message):
        if master:
            print(message, flush=True)

    checkpoint = None
    if args.resume:
        resume_path, checkpoint = load_resume(args.resume, log)
        defaults = vars(get_args([]))
        given = {k: v for k, v in vars(args).items() if k != "resume" and v != defaults[k]}
        fixed = [as_flag(k) for k in given if k not in RESUME_MAY_CHANGE]
        if fixed:  # silently ignoring them would train something other than what was asked
            sys.exit(f"error: --resume continues {resume_path} with the flags it was started with; "
                     f"{' '.join(fixed)} cannot change mid-run (only {' '.join(map(as_flag, RESUME_MAY_CHANGE))} "
                     f"can). Drop them, or start a new run with a new --run-dir.")
        args = argparse.Namespace(**{**checkpoint["train_config"], **given, "resume": str(resume_path),
                                     "run_dir": str(resume_path.parent)})
    if not args.data or not (args.dev or args.overfit):
        sys.exit("error: --data and --dev are required (or --resume a run)")
    if args.overfit:
        args.freq_masks = args.time_masks = 0
        args.freq_warp = 0.0
        args.dropout = 0.0
    if args.run_dir is None:
        args.run_dir = time.strftime("runs/%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir)

    if distributed:
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if args.device == "cuda" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    # bf16 autocast: no loss scaling needed, unlike fp16.
    amp = args.bf16 if args.bf16 is not None else cuda or torch.cpu._is_avx512_bf16_supported()
    torch.manual_seed(args.seed)

    config = ModelConfig(len(data.VOCAB), n_mels=args.n_mels, time_stride=args.time_stride, conv_channels=args.conv_channels,
                         rnn_layers=args.rnn_layers, rnn_hidden=args.rnn_hidden, dropout=args.dropout, freq_warp=args.freq_warp,
                         freq_masks=args.freq_masks, time_masks=args.time_masks)
    model = CTCModel(config)
    if checkpoint is not None:
        if checkpoint["model_config"] != asdict(config):
            sys.exit(f"error: --resume {args.resume}: model shape differs from the flags it was saved with")
        model = build_from_checkpoint(checkpoint)[0]
    model.to(device)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{FRAMES_PER_SECOND / args.time_stride:.0f} output frames/s, "
        f"device {device}{' bf16' if amp else ''}, world size {world_size}")

    try:
        train_set = data.filter_trainable(data.read_corpus(args.data, log), args.max_seconds,
                                          model.output_lengths, log)
        if args.overfit:
            train_set = train_set[:args.overfit]
        dev_set = train_set if args.overfit else data.read_corpus(args.dev, log)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    if not train_set:
        sys.exit(f"error: no trainable utterances left in {' '.join(args.data)} (see the counts above)")
    sampler = data.BucketBatches([u["seconds"] for u in train_set], args.batch_seconds, args.seed,
                                 rank=rank, world_size=world_size)
    if len(sampler) == 0:
        sys.exit(f"error: fewer batches than processes; lower --batch-seconds ({args.batch_seconds})")

    def ignore_signals(_):  # Ctrl-C and SIGTERM are for the main process, which saves and exits
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    # Own generators: the loaders must not draw from the global RNG, or resume would shift it.
    loader_args = dict(collate_fn=data.collate, num_workers=args.workers, pin_memory=cuda,
                       worker_init_fn=ignore_signals, persistent_workers=args.workers > 0)
    if args.workers > 0:
        loader_args["prefetch_factor"] = 4
    loader = torch.utils.data.DataLoader(data.AudioDataset(train_set), batch_sampler=sampler,
                                         generator=torch.Generator(), **loader_args)
    dev_loader = torch.utils.data.DataLoader(
        data.AudioDataset(dev_set), batch_sampler=data.BucketBatches(
            [u["seconds"] for u in dev_set], args.batch_seconds, shuffle=False),
        generator=torch.Generator(), **loader_args)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=cuda)
    step, epoch, batch_in_epoch, best_wer = 0, 0, 0, float("inf")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, batch_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        best_wer = checkpoint["best_wer"]
        torch.set_rng_state(checkpoint["rng_cpu"])
        if cuda and checkpoint["rng_cuda"] is not None:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"])
    total_steps = args.epochs * len(sampler)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    ctc_loss = torch.nn.CTCLoss(blank=data.BLANK, zero_infinity=True)
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(run_dir / "metrics.jsonl", "a")
        log(f"run: {run_dir}  ({len(sampler)} steps/epoch, {total_steps} steps in all)")

    def save(name):
        save_atomically({
            **model_checkpoint(model, data.VOCAB), "train_config": vars(args),
            "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best_wer": best_wer, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if cuda else None,
        }, run_dir / name)

    def evaluate_and_keep_best(label):
        """Score dev, log it with the health signals, keep best.pt."""
        nonlocal best_wer
        wer, cer, pairs = evaluate(model, dev_loader, device, amp)
        cer_history.append(cer)
        log(f"{label}: dev WER {wer:.2f}% CER {cer:.2f}%  gradient norms {block_norms}")
        for ref, hyp in pairs[:3]:
            log(f"  ref: {ref}\n  hyp: {hyp}")
        warning = diagnose([hyp for _, hyp in pairs], cer_history, step, args)
        if warning:
            log(f"warning: {warning}")
        metrics.write(json.dumps({"epoch": epoch, "step": step, "dev_wer": wer, "dev_cer": cer,
                                  "grad_norms": block_norms, "warning": warning}) + "\n")
        metrics.flush()
        if wer < best_wer:
            best_wer = wer
            save("best.pt")

    stop = []  # the signal received, if any; checked once per step
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    log("note: the greedy output is mostly blank at first (the 'blank plateau'); letters follow, then words")
    totals = torch.zeros(3, device=device)  # loss, blank frames, frames: summed on device, read at log time
    window = {"audio": 0.0, "wait": 0.0, "steps": 0, "skipped": 0, "oom": 0, "grad_norm": 0.0, "start": time.time()}
    bad_in_a_row, run_start, start_step = 0, time.time(), step
    cer_history, block_norms = [], {}
    model.train()
    while epoch < args.epochs and not stop:
        sampler.set_epoch(epoch, batch_in_epoch)
        wait_start = time.time()
        for batch in loader:
            window["wait"] += time.time() - wait_start
            lr = learning_rate(step, total_steps, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            try:
                waves = batch["waves"].to(device, non_blocking=True)
                targets = batch["targets"].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    log_probs, out_lengths = ddp_model(waves, batch["wave_lengths"])
                # CTCLoss wants (T, B, vocab); mean = per-utterance loss / target length, batch mean.
                loss = ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, batch["target_lengths"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if (step + 1) % args.eval_every == 0:  # this step ends in an evaluation
                    block_norms = gradient_norms_by_block(model)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            except torch.OutOfMemoryError:
                if distributed:  # the other ranks are already waiting in this step's all-reduce
                    raise
                # One outsized batch should not end a long run: drop it and go on.
                waves = targets = log_probs = loss = None
                optimizer.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                window["oom"] += 1
                log(f"warning: out of memory on a batch of {len(batch['ids'])} utterances "
                    f"({batch['waves'].numel() / data.SAMPLE_RATE:.0f} s padded); skipped it. If this "
                    f"repeats, lower --batch-seconds (now {args.batch_seconds}) or --max-seconds")
            else:
                # The one host sync per step: a non-finite step must be known before it is applied.
                if torch.isfinite(grad_norm).item() and torch.isfinite(loss).item():
                    optimizer.step()
                    bad_in_a_row = 0
                    window["grad_norm"] += float(grad_norm)
                    with torch.no_grad():
                        inside = lengths_mask(out_lengths.to(device, non_blocking=True), log_probs.shape[1])
                        blanks = ((log_probs.argmax(-1) == data.BLANK) & inside).sum()
                        totals += torch.stack([loss.detach(), blanks.float(), inside.sum().float()])
                else:
                    window["skipped"] += 1
                    bad_in_a_row += 1
                    if bad_in_a_row > MAX_BAD_STEPS_IN_A_ROW:
                        log(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient: the "
                            f"run has diverged. Lower --lr (now {args.lr}) or raise --warmup-steps, then "
                            f"--resume {run_dir / 'last.pt'}")
                        sys.exit(1)
            step += 1
            batch_in_epoch += 1
            window["steps"] += 1
            window["audio"] += float(batch["wave_lengths"].sum()) / data.SAMPLE_RATE

            if step % args.log_every == 0 and master:
                loss_sum, blank_frames, frames = totals.tolist()
                good = max(1, window["steps"] - window["skipped"] - window["oom"])
                elapsed = time.time() - window["start"]
                eta = (time.time() - run_start) / max(1, step - start_step) * (total_steps - step)
                record = {"epoch": epoch, "step": step, "loss": loss_sum / good, "lr": lr,
                          "grad_norm": window["grad_norm"] / good, "x_realtime": window["audio"] / elapsed,
                          "data_wait": window["wait"] / elapsed, "blank_share": blank_frames / max(1, frames),
                          "skipped_steps": window["skipped"], "oom_batches": window["oom"]}
                log(f"epoch {epoch} step {step}/{total_steps} loss {record['loss']:.3f} lr {lr:.2e} "
                    f"grad {record['grad_norm']:.2f} {record['x_realtime']:.0f}x realtime "
                    f"data wait {100 * record['data_wait']:.0f}% blank {100 * record['blank_share']:.0f}% "
                    f"skipped {window['skipped']} ETA {eta / 60:.0f} min")
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                totals.zero_()
                window.update(audio=0.0, wait=0.0, steps=0, skipped=0, oom=0, grad_norm=0.0, start=time.time())

            if distributed:  # every rank must stop at the same step, or the next all-reduce hangs
                flag = torch.tensor([float(bool(stop))], device=device)
                dist.all_reduce(flag)
                if flag.item() and not stop:
                    stop.append(signal.SIGTERM)
            if stop:
                break
            if step % args.eval_every == 0 and master:
                evaluate_and_keep_best(f"eval step {step}")
            if step % args.save_every == 0 and master:
                save("last.pt")
            wait_start = time.time()
        else:
            epoch, batch_in_epoch = epoch + 1, 0

    if master:
        if not stop and step % args.eval_every:  # the last step was not just scored
            evaluate_and_keep_best("final")
        save("last.pt")
        metrics.close()
        if stop:
            log(f"stopped by signal {stop[0]} at step {step}; {run_dir / 'last.pt'} saved. Continue with:\n"
                f"  python train.py --resume {run_dir / 'last.pt'}")
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)
    if distributed:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
