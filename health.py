"""What train.py's log shows about a run's health: the line every --log-every steps (loss, learning
rate, gradient norm, speed, data wait, the blank share of the greedy output, peak memory), the
gradient norm of each block before an evaluation, and a plain-words warning when a run looks stuck.

    interval = LogInterval(device)
    interval.add(loss, grad_norm, log_probs, out_lengths)      # each trained step; no host sync
    line, record = interval.report(epoch, step, total_steps, lr, eta_seconds)
    warning = diagnose(hypotheses, cer_history, step, warmup_steps)   # None while it looks healthy
"""
import math
import sys
import time

import torch

try:
    import resource
except ImportError:  # Windows
    resource = None

from model import BLANK, lengths_mask

STALLED_EVALS = 3            # evaluations without a better dev CER before the run is called stuck
CONVERGED_CER = 1.0          # a dev CER (%) at or below this is a finished run, not a stuck one
CAUSES = ("Likely causes: learning rate too high or too low (--lr, --warmup-steps); features not "
          "log-mel or not normalized; CTC lengths that ignore the conv stride or the padding; a "
          "vocabulary without space or apostrophe; too little data for the model. Check with "
          "--overfit 20, and see 'When CTC training goes wrong' in the README.")


def diagnose(hyps, cer_history, step, warmup_steps):
    """A plain-words warning when the run looks stuck, or None when it looks healthy."""
    symbols = set("".join(hyps)) - {" "}
    # A model leaving the blank plateau first prints blanks, then one or two common letters:
    # neither means anything until well past the warmup.
    if step <= 3 * warmup_steps:
        return None
    if not symbols:
        return (f"the output is still all blank at step {step}, more than 3x the warmup "
                f"(--warmup-steps {warmup_steps}). {CAUSES}")
    if 0 < len(symbols) <= 2:
        return f"the output has collapsed to {''.join(sorted(symbols))!r}. {CAUSES}"
    recent, earlier = cer_history[-STALLED_EVALS:], cer_history[:-STALLED_EVALS]
    if earlier and min(recent) >= min(earlier) > CONVERGED_CER:
        return (f"dev CER has not improved in {STALLED_EVALS} evaluations (best {min(earlier):.1f}%). If the "
                f"training loss is near 0, the model knows the training set by heart: more data or "
                f"augmentation (--dropout, --freq-masks, --time-masks) is what helps. Otherwise: {CAUSES}")
    return None


def gradient_norms_by_block(model):
    """Gradient norm of the front end, each GRU layer and the output layer. A block near zero
    (vanishing) or far above the others (exploding) shows where to look."""
    blocks = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            kind, index = name.split(".")[:2]  # layers.2.forward_gru.weight_hh_l0: GRU layer 2
            block = "front end"
            if kind == "layers":
                block = f"rnn{index}"
            elif kind == "output":
                block = "output"
            blocks[block] = blocks.get(block, 0.0) + p.grad.detach().float().pow(2).sum()
    return {block: round(float(total) ** 0.5, 4) for block, total in blocks.items()}


def peak_memory_gb(device):
    """Most memory held so far: on a GPU the caching allocator's (nvidia-smi less the context), else RSS
    (none where the system does not say, as on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 1e9
    if resource is None:
        return math.nan
    unit = 1e9 if sys.platform == "darwin" else 1e6  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


class LogInterval:
    """The steps since the last log line. Sums stay on the device until the line: no host sync per step."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(4, device=self.device)  # loss, gradient norm, blank frames, real frames
        self.start, self.audio, self.wait = time.time(), 0.0, 0.0
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
            self.sums += torch.stack([loss.detach().float(), grad_norm.detach().float(), blanks.float(),
                                      inside.sum().float()])
        self.trained += 1

    def leave_out(self, seconds):
        """Seconds spent outside the steps (an evaluation), which the speed must not count."""
        self.start += seconds

    def count(self, outcome, audio_seconds):
        """A step's outcome, from train.train_step ("trained", "not finite", "out of memory") or "skipped"
        (a batch of only unusable files), and its audio."""
        self.skipped += outcome in ("not finite", "skipped")
        self.oom += outcome == "out of memory"
        self.audio += audio_seconds

    def report(self, epoch, step, total_steps, lr, eta_seconds):
        """(log line, metrics record) for the steps since the last log line; a new interval starts."""
        loss, grad_norm, blank_frames, frames = self.sums.tolist()
        elapsed, trained = time.time() - self.start, self.trained or math.nan  # nan: no finite step
        r = {"epoch": epoch, "step": step, "loss": loss / trained, "lr": lr,
             "grad_norm": grad_norm / trained, "x_realtime": self.audio / elapsed,
             "data_wait": self.wait / elapsed, "blank_share": blank_frames / max(1, frames),
             "skipped_steps": self.skipped, "oom_batches": self.oom, "audio_seconds": self.audio,
             "peak_memory_gb": peak_memory_gb(self.device)}
        line = (f"epoch {epoch} step {step}/{total_steps} loss {r['loss']:.3f} lr {lr:.2e} "
                f"grad {r['grad_norm']:.2f} {r['x_realtime']:.0f}x realtime data wait "
                f"{100 * r['data_wait']:.0f}% blank {100 * r['blank_share']:.0f}% skipped {self.skipped} "
                f"memory {r['peak_memory_gb']:.1f} GB ETA {eta_seconds / 60:.0f} min")
        self.reset()
        return line, r
