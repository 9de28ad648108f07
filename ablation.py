"""Why a DeepSpeech-like model prints `ttthhheee`, measured: the model people report, fixed one
cause at a time until it is this project's AN4 recipe (direction a), and the recipe broken one
cause at a time (direction b). Every row trains through train.py's own loop, for the same
minutes of training on the same corpus, and is then inspected on the dev set.

    python ablation.py --data AN4/train --dev AN4/dev --out ablation/          # the whole table
    python ablation.py --data AN4/train --dev AN4/dev --out ablation-quick/ --quick   # a smaller one
    python ablation.py --data AN4/train --dev AN4/dev --out ablation/ --rows recipe b-softmax

<out>/table.md holds the tables, <out>/cer.png dev CER against training minutes (needs
matplotlib), <out>/results.json the numbers, <out>/<row>/ each row's train.py run (train.log,
metrics.jsonl, checkpoints, whose "model" weights load into ablation.build(row)[0]). Rows already
in results.json are kept, so a stopped table continues where it stopped. The rows marked long
also run on <out>/long/: the same corpora's utterances of one speaker joined into 10-17 s
recordings (LibriSpeech's length), where a stride of 1 and vanishing gradients should show.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
from torch import nn

import data
import runs
import train
from health import gradient_norms_by_block
from model import (BLANK, ENGLISH, TIME_STRIDES, VOCAB, BiGRULayer, CTCModel, ModelConfig, frame_lengths,
                   greedy_decode, lengths_mask)

# The AN4 recipe: its file, wherever this script is run from.
RECIPE = [f"@{Path(__file__).resolve().parent / 'recipes' / 'an4.args'}"]
# Rows are scored on the weights they trained: the table predates train.py's moving average.
NO_AVERAGE = ["--ema-decay", "0"]
HIDDEN_UNITS = 2048                  # the reported model's DNN hidden layer
LETTERS = [BLANK] + [data.CHAR_TO_ID[c] for c in VOCAB if c.isalpha()]  # no space or '
IMPOSSIBLE = -1e4                    # log-prob of a symbol the letters-only model lacks (-inf would NaN)


@dataclasses.dataclass
class AblationConfig(ModelConfig):
    """ModelConfig plus the knobs of the reported model; the defaults are the recipe's choices."""
    features: str = "normalized"     # "normalized" log-mel, "log" (not normalized), "power" (as it comes)
    front_end: str = "conv"          # "conv": the recipe's 2-D conv; "vgg": the reported 1-D VGG block
    rnn: str = "bigru"               # "bigru" (LayerNorm + both directions), "gru" (one direction, no
    #                                  norm), "time-major" (bigru whose GRUs are batch_first=False)
    hidden: str = ""                 # "softmax" or "relu": a HIDDEN_UNITS layer before the output
    letters_only: bool = False       # 27 outputs: blank and a-z, no space or apostrophe
    ctc_lengths: str = "conv"        # "conv" arithmetic, "padded" (every utterance as long as the
    #                                  batch), "frames" (the stride ignored), "halved" (stride counted twice)


class GRULayer(nn.Module):
    """The reported layer: one direction, no normalization."""

    def __init__(self, input_size, hidden):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, batch_first=True)

    def forward(self, x, lengths):
        return self.gru(x)[0]


def vgg_block(channels_in, channels_out, time_pool):
    """Two 3-tap convs over the mel axis of each frame, ReLU, max-pool 2 on the mel axis (and
    time_pool frames in time)."""
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, (1, 3), padding=(0, 1)), nn.ReLU(),
                         nn.Conv2d(channels_out, channels_out, (1, 3), padding=(0, 1)), nn.ReLU(),
                         nn.MaxPool2d((time_pool, 2)))


class AblationModel(CTCModel):
    """CTCModel with the pieces its config names swapped for the reported ones."""

    def __init__(self, config: AblationConfig):
        super().__init__(config)
        c, pools = config, TIME_STRIDES[config.time_stride]
        rnn_input = self.layers[0].forward_gru.input_size
        if c.front_end == "vgg":
            self.convs = nn.ModuleList([vgg_block(1, 128, pools[0]), vgg_block(128, 256, pools[1])])
            rnn_input = 256 * (c.n_mels // 4)
        directions = 1 if c.rnn == "gru" else 2
        sizes = [rnn_input] + [directions * c.rnn_hidden] * (c.rnn_layers - 1)
        layer = GRULayer if c.rnn == "gru" else BiGRULayer
        self.layers = nn.ModuleList(layer(size, c.rnn_hidden) for size in sizes)
        if c.rnn == "time-major":  # the input stays (batch, time, features): the GRU runs over the batch
            for bi, size in zip(self.layers, sizes):
                bi.forward_gru, bi.backward_gru = nn.GRU(size, c.rnn_hidden), nn.GRU(size, c.rnn_hidden)
        outputs = len(LETTERS) if c.letters_only else len(VOCAB)
        width = directions * c.rnn_hidden
        self.output = nn.Linear(width, outputs) if not c.hidden else nn.Sequential(
            nn.Linear(width, HIDDEN_UNITS), nn.Softmax(-1) if c.hidden == "softmax" else nn.ReLU(),
            nn.Linear(HIDDEN_UNITS, outputs))

    def features(self, waves, wave_lengths):
        if self.config.features == "normalized":
            return super().features(waves, wave_lengths)
        with torch.autocast(waves.device.type, enabled=False):
            x = self.mel(waves.float()).transpose(1, 2)
            x = torch.log(x + 1e-6) if self.config.features == "log" else x
        lengths = frame_lengths(wave_lengths).clamp(min=0).to(x.device)
        return x * lengths_mask(lengths, x.shape[1])[:, :, None], lengths

    def front_end(self, x, lengths):
        if self.config.front_end != "vgg":
            return super().front_end(x, lengths)
        x = x.unsqueeze(1)
        for block, pool in zip(self.convs, TIME_STRIDES[self.config.time_stride]):
            x, lengths = block(x), torch.div(lengths, pool, rounding_mode="floor")
            x = x * lengths_mask(lengths, x.shape[2])[:, None, :, None]
        return x.permute(0, 2, 1, 3).flatten(2), lengths

    def output_lengths(self, wave_lengths):
        if self.config.front_end != "vgg":
            return super().output_lengths(wave_lengths)
        lengths = frame_lengths(torch.as_tensor(wave_lengths)).clamp(min=0)
        return lengths // math.prod(TIME_STRIDES[self.config.time_stride])

    def forward(self, waves, wave_lengths):
        log_probs, lengths = super().forward(waves, wave_lengths)
        if self.config.letters_only:  # shown to CTC in the 29-symbol layout, space and ' impossible
            full = log_probs.new_full((*log_probs.shape[:2], len(VOCAB)), IMPOSSIBLE)
            full[:, :, LETTERS] = log_probs
            log_probs = full
        mistake = self.config.ctc_lengths
        if mistake == "padded":
            lengths = torch.full_like(lengths, log_probs.shape[1])
        elif mistake == "frames":
            lengths = lengths * math.prod(TIME_STRIDES[self.config.time_stride])
        elif mistake == "halved":
            lengths = lengths // 2
        return log_probs, lengths


# A row: (name, what it changes, model config changes, train.py flags); direction a is cumulative.
REPORTED = dict(features="power", front_end="vgg", rnn="gru", hidden="softmax", letters_only=True,
                time_stride=1, rnn_layers=5, rnn_hidden=512, speed_perturb=False, freq_warp=0.0)
ADAM_1E4 = ["--lr", "1e-4", "--warmup-steps", "0", "--grad-clip", "1e9", "--weight-decay", "0"]
DIRECTION_A = [
    ("a0-reported", "the reported model: raw mel power, 1-D VGG block, 100 frames/s, 5 x 512 GRU "
     "(one direction), softmax hidden layer, blank + a-z, Adam 1e-4, no warmup or clipping", {}, ADAM_1E4),
    ("a1-log-norm", "+ log-mel, normalized per utterance", {"features": "normalized"}, ADAM_1E4),
    ("a2-relu", "+ ReLU instead of softmax in the hidden layer", {"hidden": "relu"}, ADAM_1E4),
    ("a3-space", "+ space and apostrophe in the vocabulary", {"letters_only": False}, ADAM_1E4),
    ("a4-stride", "+ time stride 4 (25 frames/s, max-pool 2 in time in each block)", {"time_stride": 4},
     ADAM_1E4),
    ("a5-lr", "+ AdamW 3e-3, 150 warmup steps, clipping at 1, weight decay 0.01", {}, []),
    ("a6-bigru", "+ bidirectional GRU with LayerNorm", {"rnn": "bigru"}, []),
    ("a7-size", "+ the recipe's 3 x 256 GRU", {"rnn_layers": 3, "rnn_hidden": 256}, []),
]
RECIPE_ROW = ("recipe", "the recipe: + 2-D conv front end, no hidden layer, speed perturbation, "
              "frequency warp", None, [])
DIRECTION_B = [
    ("b-softmax", "a 2,048-unit softmax hidden layer", {"hidden": "softmax"}, []),
    ("b-power", "raw mel power features (no log, no normalization)", {"features": "power"}, []),
    ("b-no-norm", "log-mel, not normalized", {"features": "log"}, []),
    ("b-no-space", "no space or apostrophe in the vocabulary", {"letters_only": True}, []),
    ("b-stride1", "time stride 1 (100 frames/s)", None, ["--time-stride", "1"]),
    ("b-adam1e-4", "lr 1e-4 without warmup", None, ["--lr", "1e-4", "--warmup-steps", "0"]),
    ("b-no-clip", "no gradient clipping", None, ["--grad-clip", "1e9"]),
    ("b-len-padded", "CTC input lengths that ignore the padding", {"ctc_lengths": "padded"}, []),
    ("b-len-stride", "CTC input lengths that ignore the conv stride", {"ctc_lengths": "frames"}, []),
    ("b-len-halved", "CTC input lengths that count the stride twice", {"ctc_lengths": "halved"}, []),
    ("b-time-major", "GRUs built batch_first=False, fed (batch, time, features)", {"rnn": "time-major"}, []),
    ("b-lr-3e-2", "a too-large learning rate (3e-2, 10x)", None, ["--lr", "3e-2"]),
    ("b-dropout", "heavy dropout (0.5)", None, ["--dropout", "0.5"]),
]
LONG_ROWS = ["recipe", "b-stride1", "a0-reported"]
QUICK_ROWS = ["recipe", "a0-reported", "b-softmax", "b-power", "b-no-space", "b-adam1e-4"]


def all_rows():
    """{name: (what it changes, model config or None for the flags' CTCModel, train.py flags)}."""
    recipe = dataclasses.asdict(train.model_config(train.build_parser().parse_args(RECIPE)))
    rows, config = {}, {**recipe, **REPORTED}
    for name, what, changes, flags in DIRECTION_A:
        config = {**config, **changes}
        rows[name] = (what, AblationConfig(**config), flags)
    rows["recipe"] = RECIPE_ROW[1:]
    for name, what, changes, flags in DIRECTION_B:
        rows[name] = (what, None if changes is None else AblationConfig(**recipe, **changes), flags)
    return rows


def build(name):
    """A row's model (None: train.py builds the recipe's CTCModel from the flags) and its flags."""
    _, config, flags = all_rows()[name]
    model_flags = []
    if config is not None:  # the run's flags describe the model it trains, as in any checkpoint
        flagged = {action.dest for action in train.build_parser()._actions}
        for name in (f.name for f in dataclasses.fields(ModelConfig) if f.name in flagged - {"alphabet"}):
            value, flag = getattr(config, name), runs.as_flag(name)
            model_flags += ([flag if value else f"--no-{flag[2:]}"] if isinstance(value, bool)
                            else [flag, str(value)])
    return (None if config is None else AblationModel(config)), RECIPE + NO_AVERAGE + model_flags + flags


def letters_only_corpus(paths, out):
    """A TSV manifest of the corpora with transcripts reduced to a-z, for the letters-only rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    utterances = data.read_corpus(paths, ENGLISH, log=lambda message: None)
    lines = [f"{Path(u['path']).resolve()}\t{''.join(c for c in u['text'] if c.isalpha())}\n"
             for u in utterances]
    out.write_text("".join(lines))
    return [str(out)]


def join_utterances(paths, out, seed=0):
    """Each speaker's utterances, shuffled and joined with 0.3 s of silence into 10-17 s
    recordings, as a LibriSpeech-layout folder: a corpus of LibriSpeech's length from AN4."""
    if out.is_dir():
        return [str(out)]
    rng, by_speaker = random.Random(seed), {}
    for u in data.read_corpus(paths, ENGLISH, log=lambda message: None):
        by_speaker.setdefault(Path(u["path"]).parent.parent.name, []).append(u)  # <speaker>/<chapter>/
    partial, gap = out.with_name(out.name + ".partial"), np.zeros(data.SAMPLE_RATE * 3 // 10, np.float32)
    for speaker, utterances in sorted(by_speaker.items()):
        folder, lines = partial / speaker / "long", []
        folder.mkdir(parents=True, exist_ok=True)
        rng.shuffle(utterances)
        while utterances:
            target, audio, words = rng.uniform(10, 17), [], []
            while utterances and sum(map(len, audio)) < target * data.SAMPLE_RATE:
                u = utterances.pop()
                audio, words = audio + [data.load_audio(u["path"]).numpy(), gap], words + [u["text"]]
            utt_id = f"{speaker}-long-{len(lines):04d}"
            soundfile.write(folder / f"{utt_id}.flac", np.concatenate(audio[:-1]), data.SAMPLE_RATE)
            lines.append(f"{utt_id} {' '.join(words)}\n")
        (folder / f"{speaker}-long.trans.txt").write_text("".join(lines))
    partial.rename(out)
    return [str(out)]


def inspect(model, dev_paths, samples=2):
    """After training, on the dev set: greedy letter CER, WER, blank share, each GRU layer's output
    standard deviation, the gradient norm of each block on one dev batch, and the greedy output
    of the `samples` longest utterances."""
    utterances = data.read_corpus(dev_paths, ENGLISH, log=lambda message: None)
    dataset = data.AudioDataset(utterances, ENGLISH)
    batches = data.BucketBatches([u["seconds"] for u in utterances], 100, shuffle=False)
    sums = torch.zeros(len(model.layers), 3, dtype=torch.float64)   # per layer: n, sum, sum of squares

    def moments(i):
        def hook(module, inputs, out):  # returns None: the layer's output goes on unchanged
            out = out.double()
            sums[i] += torch.stack([torch.tensor(out.numel()).double(), out.sum(), out.pow(2).sum()])
        return hook
    hooks = [layer.register_forward_hook(moments(i)) for i, layer in enumerate(model.layers)]
    refs, hyps, ids, blank, frames = [], [], [], 0, 0
    model.eval()
    with torch.no_grad():
        for batch in filter(None, map(lambda b: data.collate([dataset[i] for i in b]), batches)):
            log_probs, lengths = model(batch["waves"], batch["wave_lengths"])
            inside = lengths_mask(lengths.clamp(max=log_probs.shape[1]), log_probs.shape[1])
            blank += int(((log_probs.argmax(-1) == BLANK) & inside).sum())
            frames += int(inside.sum())
            hyps += greedy_decode(log_probs, lengths, model.vocab)
            refs, ids = refs + batch["texts"], ids + batch["ids"]
    for hook in hooks:
        hook.remove()
    model.train()
    batch = data.collate([dataset[i] for i in batches.batches[0]])
    log_probs, lengths = model(batch["waves"], batch["wave_lengths"])
    model.zero_grad()
    F.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths.clamp(max=log_probs.shape[1]),
               batch["target_lengths"], blank=BLANK, zero_infinity=True).backward()
    norms = gradient_norms_by_block(model)
    model.zero_grad()
    wer, _ = data.error_rates(refs, hyps)
    _, letter_cer = data.error_rates(*(["".join(filter(str.isalpha, t)) for t in texts]
                                               for texts in (refs, hyps)))
    n, total, squares = sums.T
    std = ((squares - total ** 2 / n) / n).clamp(min=0).sqrt()
    by_letters = sorted(utterances, key=lambda u: (-sum(map(str.isalpha, u["text"])), u["id"]))
    longest = [u["id"] for u in by_letters[:samples]]
    return {"letter_cer": letter_cer, "wer": wer, "blank_share": blank / max(frames, 1),
            "gru_std": [float(f"{s:.3g}") for s in std], "grad_norms": norms,
            "samples": [(refs[ids.index(i)], hyps[ids.index(i)]) for i in longest]}


def curves(metrics_file):
    """(training steps, audio seconds, training minutes, mean loss of the last 10 steps, and the
    dev CER curve [(training minutes, CER)]) from a run's metrics.jsonl; evaluations not counted."""
    steps, audio, minutes, losses, curve, eval_seconds = 0, 0.0, 0.0, [], [], 0.0
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if "dev_cer" in record:
            eval_seconds += record["eval_seconds"]
            curve.append((round((record["wall_seconds"] - eval_seconds) / 60, 3), record["dev_cer"]))
        else:
            steps, audio = record["step"], audio + record["audio_seconds"]
            minutes = (record["wall_seconds"] - eval_seconds) / 60
            losses.append(record["loss"])
    return steps, audio, minutes, (sum(losses[-10:]) / len(losses[-10:]) if losses else None), curve


def run_row(key, args, out):
    """Train one row through train.py's loop, inspect it on dev; returns its results record."""
    long, name = key.startswith("long/"), key.removeprefix("long/")
    what, config, _ = all_rows()[name]
    torch.manual_seed(args.seed)
    model, flags = build(name)
    train_paths, dev_paths = args.data, args.dev
    if long:
        train_paths = join_utterances(args.data, out / "long" / "train", args.seed)
        dev_paths = join_utterances(args.dev, out / "long" / "dev", args.seed)
    if config is not None and config.letters_only:  # the targets (and dev references) hold no space
        corpus = out / ("long" if long else "") / "letters-only"
        train_paths = letters_only_corpus(train_paths, corpus / "train.tsv")
        dev_paths = letters_only_corpus(dev_paths, corpus / "dev.tsv")
    folder = out / key
    folder.mkdir(parents=True)
    try:
        return train_row(key, what, model, flags, train_paths, dev_paths, folder, args)
    except KeyboardInterrupt:  # the row is not finished: its part-run goes, so the same command redoes it
        shutil.rmtree(folder)
        raise


def train_row(key, what, model, flags, train_paths, dev_paths, folder, args):
    argv = flags + ["--data", *train_paths, "--dev", *dev_paths, "--run-dir", str(folder),
                    "--max-minutes", str(args.minutes), "--log-every", "1", "--eval-every",
                    str(args.eval_every), "--save-every", str(10 ** 9), "--seed", str(args.seed)]
    record, started = {"row": key, "what": what, "argv": argv, "error": None}, time.time()
    with open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log):
        try:
            model = train.train(argv, model)
        except data.InputError as e:  # train.py's own verdict on the row, such as a diverged run (the
            #                           corpora and flags the user typed were checked before any row)
            record["error"] = f"error: {e}"
        except Exception as e:  # what the mistake does to PyTorch, such as CTCLoss refusing lengths
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    record["wall_minutes"] = (time.time() - started) / 60
    if (folder / "metrics.jsonl").exists():
        keys = ("steps", "audio_seconds", "train_minutes", "final_loss", "curve")
        record.update(zip(keys, curves(folder / "metrics.jsonl")))
    if model is not None and record["error"] is None:
        record.update(inspect(model, dev_paths))
    return record


def cell(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def write_table(results, minutes, out):
    """<out>/table.md: the numbers, then the health signals, then the sample outputs."""
    lines = [f"Each row trained for {minutes} minutes (evaluations not counted), then greedy-decoded on "
             f"dev. Letter CER ignores spaces and apostrophes, so rows without them compare; WER needs "
             f"a space symbol.", "",
             "| row | what it changes | steps | audio h | min | dev letter CER % | dev WER % | blank % "
             "| final loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "letter_cer" not in r:
            lines.append(f"| {r['row']} | {r['what']} | {r.get('steps', 0)} | | | {r['error']} | | | |")
            continue
        no_words = "letters" in " ".join(r["argv"])
        lines.append(f"| {r['row']} | {r['what']} | {r['steps']} | {cell(r['audio_seconds'] / 3600, 2)} "
                     f"| {cell(r['train_minutes'])} | {cell(r['letter_cer'])} | "
                     f"{'-' if no_words else cell(r['wer'])} | {cell(100 * r['blank_share'], 0)} | "
                     f"{cell(r['final_loss'], 3)} |")
    lines += ["", "| row | gradient norm per block | GRU output std per layer |", "| --- | --- | --- |"]
    lines += [f"| {r['row']} | {', '.join(f'{k} {v:.3g}' for k, v in r['grad_norms'].items())} | "
              f"{', '.join(map(str, r['gru_std']))} |" for r in results if "grad_norms" in r]
    lines += ["", "| row | reference | greedy output |", "| --- | --- | --- |"]
    lines += [f"| {r['row']} | {ref} | `{hyp or '(blank)'}` |" for r in results if "samples" in r
              for ref, hyp in r["samples"]]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(results, out):
    """<out>/cer.png: dev CER against training minutes, a panel per direction (and corpus); returns
    whether it was drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: pip install matplotlib to draw cer.png", file=sys.stderr)
        return False
    panels = {"a": "from the reported model to the recipe", "b": "the recipe with one mistake",
              "long/": "10-17 s recordings"}
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), sharey=True)
    for ax, (prefix, title) in zip(axes, panels.items()):
        for r in results:
            in_panel = r["row"].startswith(prefix) or r["row"] == "recipe" and prefix != "long/"
            if in_panel and r.get("curve"):
                minutes, cer = zip(*r["curve"])
                ax.plot(minutes, cer, marker=".", label=r["row"])
        ax.set(title=title, xlabel="training minutes", ylim=(0, 105))
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("dev CER % (letters-only rows: letter CER)")
    figure.tight_layout()
    figure.savefig(out / "cer.png", dpi=110)
    plt.close(figure)
    return True


def main(argv=None):
    rows = all_rows()
    keys = ["recipe", "a0-reported"] + [n for n in rows if n.startswith("b-")] + \
        [n for n in rows if n.startswith("a") and n != "a0-reported"] + [f"long/{n}" for n in LONG_ROWS]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="training corpora, as train.py takes them")
    p.add_argument("--dev", nargs="+", required=True, help="dev corpora: every row is scored on them")
    p.add_argument("--out", type=Path, required=True, help="folder for the tables, figure and row runs")
    p.add_argument("--minutes", type=runs.in_range(float, 0, low_open=True), default=None,
                   help="training minutes per row (default 4, --quick 1.5)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_ROWS)}")
    p.add_argument("--rows", nargs="+", metavar="ROW", help=f"only these, of: {', '.join(keys)}")
    p.add_argument("--eval-every", type=runs.in_range(int, 1), default=25, help="steps between dev scores")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key in set(args.rows or []) - set(keys):
        p.error(f"--rows: unknown row {key!r}; rows are {', '.join(keys)}")
    args.minutes = args.minutes or (1.5 if args.quick else 4.0)
    try:
        run_table(args, args.rows or (QUICK_ROWS if args.quick else keys), keys)
    except data.InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; the rows finished so far are in results.json, and the same command "
                 "continues with the rest")


def check_out(args):
    """The settings the table's rows share ({flag: value}); InputError for an --out that is a file,
    lies inside a corpus (its joined recordings would join that corpus), or holds rows of others."""
    args.data, args.dev = [[str(Path(p).absolute()) for p in paths] for paths in (args.data, args.dev)]
    if args.out.exists() and not args.out.is_dir():
        raise data.InputError(f"--out {args.out} is a file; name a folder for the table")
    for corpus in map(Path, args.data + args.dev):
        if corpus.is_dir() and args.out.resolve().is_relative_to(corpus.resolve()):
            raise data.InputError(f"--out {args.out} is inside the corpus {corpus}, which would then hold "
                                  f"the table's recordings; pick a folder outside it")
    for paths in (args.data, args.dev):  # a typo must not become a row's result
        data.read_corpus(paths, ENGLISH, log=lambda message: print(message, file=sys.stderr))
    settings = {"minutes": args.minutes, "data": args.data, "dev": args.dev, "seed": args.seed,
                "eval_every": args.eval_every}
    results_file = args.out / "results.json"
    if not results_file.exists():
        return settings
    try:
        table = json.loads(results_file.read_text())
        saved = {key: table[key] for key in settings}
        rows = table.get("rows", [])
        if not (isinstance(rows, list) and all(isinstance(r, dict) and isinstance(r.get("row"), str)
                                               for r in rows)):
            raise ValueError("its rows are not rows")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a folder, cut short, other JSON
        raise data.InputError(f"{results_file} is not a table ablation.py wrote (cut short, or of an older "
                              f"version); move it away to start the table anew, or use another "
                              f"--out") from None
    differ = [f"--{k.replace('_', '-')} {saved[k]}" for k in settings if saved[k] != settings[k]]
    if differ:
        raise data.InputError(f"{results_file} holds rows run with {', '.join(differ)}; give the same to "
                              f"add to them, or use another --out")
    return settings


def run_table(args, chosen, keys):
    """Train the chosen rows that results.json lacks, rewriting the table and figure after each."""
    settings = check_out(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    done = {r["row"]: r for r in saved.get("rows", [])}
    for key in chosen:
        if key in done:
            print(f"{key}: already in {results_file}", file=sys.stderr)
            continue
        if (args.out / key).exists():
            raise data.InputError(f"{args.out / key} holds an unfinished row (the table was killed during "
                                  f"it); remove that folder to run the row again")
        what = all_rows()[key.removeprefix("long/")][0]
        print(f"{key}: training for {args.minutes} min ({what})", file=sys.stderr)
        done[key] = run_row(key, args, args.out)
        verdict = done[key]["error"] or f"dev letter CER {done[key].get('letter_cer', math.nan):.1f}%"
        print(f"{key}: {verdict}", file=sys.stderr)
        results = [done[k] for k in keys if k in done]
        table = json.dumps({**settings, "rows": results}, indent=1).encode()
        runs.write_atomically(results_file, lambda f: f.write(table))
        write_table(results, args.minutes, args.out)
        plot(results, args.out)
    results = [done[k] for k in keys if k in done]  # also when every row was already there
    write_table(results, args.minutes, args.out)
    drawn = plot(results, args.out)
    print(", ".join(str(args.out / name) for name in ["table.md"] + ["cer.png"] * drawn), file=sys.stderr)


if __name__ == "__main__":
    main()
