"""What the tests share: generated audio and corpora, flags, servers and scorers written apart from the code.
CPU only, no network: every corpus is made here with numpy."""
import http.server
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import data
import decode
import download
import train
from model import BLANK, ModelConfig

HERE = Path(__file__).resolve().parent


# Tone-burst "speech": each letter is its own pitch, 90 ms on, 30 ms off. Any working CTC
# pipeline learns to read it; a broken one (bad lengths, bad padding, bad vocab) does not.
LETTERS = "abcdefghij"


PITCH = {c: 300 * 1.25 ** i for i, c in enumerate(LETTERS)}


TINY = ["--rnn-layers", "1", "--rnn-hidden", "32", "--conv-channels", "4", "--workers", "0",
        "--freq-warp", "0", "--freq-masks", "0", "--time-masks", "0", "--log-every", "5"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tones(text, rate=data.SAMPLE_RATE):
    t = np.arange(int(0.09 * rate)) / rate
    gap = np.zeros(int(0.03 * rate))
    parts = [gap * 3]
    for c in text:
        parts += [0.3 * np.sin(2 * np.pi * PITCH[c] * t) * np.hanning(len(t)), gap]
    return np.concatenate(parts + [gap * 3]).astype(np.float32)


def random_text(rng):
    return "".join(rng.choice(list(LETTERS), size=rng.integers(4, 10)))


def write_librispeech(root, texts, speaker=19, chapter=198):
    """A LibriSpeech-layout corpus of tone bursts; returns the utterance ids."""
    folder = root / str(speaker) / str(chapter)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{speaker}-{chapter}-{i:04d}" for i in range(len(texts))]
    for utt_id, text in zip(ids, texts):
        soundfile.write(folder / f"{utt_id}.flac", tones(text), data.SAMPLE_RATE)
    (folder / f"{speaker}-{chapter}.trans.txt").write_text(
        "".join(f"{u} {t.upper()}\n" for u, t in zip(ids, texts)))
    return ids


def run_script(*args, timeout=300, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def make_corpus(root, n_train, n_dev, seed=0):
    rng = np.random.default_rng(seed)
    write_librispeech(root / "train", [random_text(rng) for _ in range(n_train)], speaker=1)
    write_librispeech(root / "dev", [random_text(rng) for _ in range(n_dev)], speaker=2)
    return root / "train", root / "dev"


def train_flags(train_dir, dev_dir, run_dir, *extra):
    return ["--data", str(train_dir), "--dev", str(dev_dir), "--run-dir", str(run_dir), *TINY,
            "--batch-seconds", "6", "--warmup-steps", "3", *map(str, extra)]


def independent_distance(a, b):
    """Plain dynamic-programming Levenshtein, written separately from data.edit_distance."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def read_arpa(path):
    """{ngram: (log10 p, log10 backoff)} from an ARPA file, read here independently of decode.py."""
    model, order = {}, 0
    for line in Path(path).read_text().splitlines():
        if line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
        elif order and line and line != "\\end\\":
            fields = line.split("\t")
            model[tuple(fields[1].split())] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    return model


def arpa_log10(model, history, word):
    """log10 p(word | history) by the ARPA backoff rule."""
    if history + (word,) in model:
        return model[history + (word,)][0]
    if not history:
        return model[(word,)][0]
    return model.get(history, (0.0, 0.0))[1] + arpa_log10(model, history[1:], word)


def tiny_arpa(unigrams):
    """ARPA text over these {word: log10 p} and one bigram (KenLM reads bigram models and up)."""
    return "\n".join(["\\data\\", f"ngram 1={len(unigrams) + 3}", "ngram 2=1", "", "\\1-grams:",
                      "-99\t<s>\t0", *(f"{p}\t{w}\t0" for w, p in unigrams.items()), "-1\t</s>",
                      "-3\t<unk>", "", "\\2-grams:", "-0.1\t<s> </s>", "", "\\end\\", ""])


def letter_frames(*frames):
    """(1, T, V) log-probabilities: each frame a {symbol: probability} dict, the rest on blank."""
    probs = torch.full((len(frames), len(data.VOCAB)), 1e-4)
    for t, frame in enumerate(frames):
        for symbol, p in frame.items():
            probs[t, data.CHAR_TO_ID[symbol]] = p
        probs[t, BLANK] += 1 - float(probs[t].sum())
    return probs.log()[None]


def beam_texts(decoder, log_probs, lengths):
    """The beam search's transcripts, as decode.py prints them."""
    return [" ".join(w["word"] for w in decode.words_with_times(spans, 0.04))
            for spans in decode.beam_search_spans(decoder, log_probs, lengths, data.VOCAB)]


def train_one_rank(rank, flags, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), XDG_CACHE_HOME=str(out_dir / f"cache{rank}"))
    model = train.train(flags)
    torch.save(model.state_dict(), out_dir / f"rank{rank}.weights")


class ArchiveServer:
    """HTTP on 127.0.0.1 serving fixed files, honouring Range, and able to cut a response short."""

    def __init__(self, files):
        server = self
        self.files, self.cut_after, self.ranges = files, None, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                if name not in server.files:
                    return self.send_error(404)
                body = server.files[name]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers["Range"] else 0
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name.endswith(".gz"):
                    server.ranges.append(start)
                    body, server.cut_after = body[:server.cut_after], None
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resources/12"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


AN4_FAKE = {  # (AN4 file id, transcription line) in the archive's two formats, and seconds of audio
    "train": [("an4_clstk/fash/an251-fash-b", "<s> YES </s> (an251-fash-b)", 0.9),
              ("an4_clstk/fash/cen1-fash-b", "<s> P I T T S B U R G H </s> (cen1-fash-b)", 2.5),
              ("an4_clstk/mblb/an11-mblb-b", "<s> ENTER SIX TWO </s> (an11-mblb-b)", 1.6),
              (f"an4_clstk/{download.AN4_DEV_SPEAKERS[0]}/an7-{download.AN4_DEV_SPEAKERS[0]}-b",
               f"<s> RUBOUT </s> (an7-{download.AN4_DEV_SPEAKERS[0]}-b)", 1.2)],
    "test": [("an4test_clstk/fcaw/an406-fcaw-b", "RUBOUT G M E F THREE NINE (an406-fcaw-b)", 3.1),
             ("an4test_clstk/mjwl/cen4-mjwl-b", "FIFTY (cen4-mjwl-b)", 0.8)],
}


def an4_archive(tmp_path):
    """A tar.gz in the layout of CMU's an4_raw.bigendian.tar.gz, holding AN4_FAKE; and each
    utterance's 16-bit samples."""
    source, samples = tmp_path / "an4src", {}
    for part, utterances in AN4_FAKE.items():
        (source / "an4/etc").mkdir(parents=True, exist_ok=True)
        (source / f"an4/etc/an4_{part}.fileids").write_text("".join(f"{f}\n" for f, _, _ in utterances))
        (source / f"an4/etc/an4_{part}.transcription").write_text("".join(f"{t}\n" for _, t, _ in utterances))
        for fileid, _, seconds in utterances:
            pcm = (tones("abcdefghij" * 3, 16000)[:int(seconds * 16000)] * 32767).astype(">i2")
            (source / f"an4/wav/{fileid}.raw").parent.mkdir(parents=True, exist_ok=True)
            (source / f"an4/wav/{fileid}.raw").write_bytes(pcm.tobytes())  # headerless, big-endian
            samples[fileid.rsplit("/", 1)[-1]] = pcm.astype(np.int16)
    with tarfile.open(tmp_path / "an4.tar.gz", "w:gz") as tar:
        tar.add(source / "an4", arcname="an4")
    return (tmp_path / "an4.tar.gz").read_bytes(), samples


def readme_commands(script):
    """The README's `python SCRIPT ...` command lines, continuations joined, comments dropped."""
    lines = (HERE / "README.md").read_text().replace("\\\n", " ").splitlines()
    commands = [line.split("#")[0].split() for line in lines if line.startswith("    ")]
    runners = ("python", "time", "torchrun")
    return [c[c.index(script) + 1:] for c in commands if script in c and c[0] in runners]


class LoudnessModel(torch.nn.Module):
    """A model whose output is known: on each loud stretch of audio it spells "ab" ("a" on the first
    loud output frame, "b" on the last), and a space on quiet frames, at 25 output frames/s."""
    config = ModelConfig(time_stride=4)
    samples_per_frame = data.SAMPLE_RATE // 25

    def forward(self, waves, wave_lengths):
        frames = waves.shape[1] // self.samples_per_frame
        framed = waves[:, :frames * self.samples_per_frame].reshape(len(waves), frames, -1)
        loud = framed.abs().amax(-1) > 0.01
        symbol = torch.where(loud, BLANK, data.CHAR_TO_ID[" "])
        starts = loud & ~torch.nn.functional.pad(loud, (1, 0))[:, :-1]
        ends = loud & ~torch.nn.functional.pad(loud, (0, 1))[:, 1:]
        symbol[starts], symbol[ends & ~starts] = data.CHAR_TO_ID["a"], data.CHAR_TO_ID["b"]
        log_probs = torch.full((len(waves), frames, len(data.VOCAB)), -30.0)
        log_probs = log_probs.scatter(2, symbol[..., None], 0.0)
        return log_probs, torch.div(wave_lengths, self.samples_per_frame, rounding_mode="floor")


class RelativeLoudnessModel(LoudnessModel):
    """LoudnessModel with loudness judged against the recording's own peak, as a model fed per-utterance
    normalized features judges it: on a noise floor alone it spells words."""

    def forward(self, waves, wave_lengths):
        peaks = waves.abs().amax(1, keepdim=True).clamp(min=1e-12)
        return super().forward(0.02 * waves / peaks, wave_lengths)


def read_or_empty(path):
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""



# Another alphabet for the same tones: letters with accents and strokes, Turkish's dotless i, German's ß.
FOREIGN = dict(zip(LETTERS, "àđếñßıéäöü"))


def foreign_corpus(folder, n, seed):
    """A manifest of n tone-burst recordings whose transcripts spell the tones in FOREIGN; returns it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        text = random_text(rng)
        soundfile.write(folder / f"{i:04d}.flac", tones(text), data.SAMPLE_RATE)
        lines.append(f"{i:04d}.flac\t{''.join(FOREIGN[c] for c in text)}\n")
    (folder / "list.tsv").write_text("".join(lines), encoding="utf-8")
    return folder / "list.tsv"


@pytest.fixture(scope="session")
def foreign_run(tmp_path_factory):
    """A small model trained once, in --alphabet auto, on tone bursts spelled in FOREIGN: (its
    best.pt, a test manifest)."""
    root = tmp_path_factory.mktemp("foreign_run")
    train_list, dev_list = foreign_corpus(root / "train", 150, 0), foreign_corpus(root / "dev", 10, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        train.train(["--data", str(train_list), "--dev", str(dev_list), "--run-dir", str(root / "run"),
                     "--alphabet", "auto", "--rnn-layers", "2", "--rnn-hidden", "64", "--conv-channels", "8",
                     "--workers", "0", "--freq-warp", "0", "--freq-masks", "0", "--time-masks", "0",
                     "--batch-seconds", "6", "--epochs", "6", "--lr", "5e-3", "--warmup-steps", "20",
                     "--eval-every", "1000", "--log-every", "25", "--ema-decay", "0"])
    return root / "run/best.pt", foreign_corpus(root / "test", 12, 2)


@pytest.fixture(scope="session")
def trained_once(tmp_path_factory):
    """One tiny run, trained once for the tests that only need some checkpoint: a corpus (train, dev)
    and a run stopped by --max-minutes after its first step (so its last.pt can be resumed)."""
    root = tmp_path_factory.mktemp("trained_once")
    train_dir, dev_dir = make_corpus(root, 10, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        train.train(train_flags(train_dir, dev_dir, root / "run", "--epochs", "2", "--eval-every", "100",
                                "--max-minutes", "1e-9"))
    return root


@pytest.fixture
def stopped_run(trained_once, tmp_path):
    """A copy of trained_once's run folder in this test's tmp_path, free to change: its path."""
    shutil.copytree(trained_once / "run", tmp_path / "run")
    (tmp_path / "run/train.lock").unlink(missing_ok=True)
    return tmp_path / "run"
