"""Corpora, text, audio, batches and the error rates they are scored by; and the error users see
(InputError). download.py gets the corpora. Imports only model.py: with it, this file works alone.

    corpus = read_corpus(["LibriSpeech/train-clean-100", "my_corpus.tsv"], ENGLISH)   # or one path
    corpus = filter_trainable(corpus, max_seconds=30, output_frames=model.output_lengths)
    batches = BucketBatches([u["seconds"] for u in corpus], batch_seconds=800, seed=0)
    loader = batch_loader(corpus, batches, ENGLISH, workers=2, pin_memory=False)   # model.config.alphabet
    for epoch in range(epochs):
        batches.set_epoch(epoch)                  # else every epoch repeats epoch 0's order
        for batch in loader: ...                  # a None batch: every file in it was unusable
    wer, cer = error_rates(references, hypotheses)                        # corpus-level, in %

A corpus is a LibriSpeech-layout directory (<root>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
with the .flac files beside it) or a TSV manifest (audio path<TAB>transcript, paths relative to
the manifest). Utterances are batched by total padded audio seconds from length-sorted
buckets; the batch order is reshuffled every epoch from (seed, epoch), so it can be replayed.
"""
import collections
import functools
import hashlib
import json
import math
import os
import stat
import sys
import unicodedata
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from model import ENGLISH, HOP, SAMPLE_RATE, VOCAB, WINDOW, vocabulary  # its input and output symbols

CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}  # English's
# A recording is a file soundfile opens (FLAC, WAV, MP3, Ogg Vorbis, Opus, AIFF, ...), whatever its name,
# or one named as audio or video is: a file so named that soundfile cannot read is told so, with this.
SOUNDFILE_NAMES = (".flac", ".wav", ".mp3", ".ogg", ".oga", ".opus", ".aiff", ".aif")  # formats it reads
AUDIO_NAMES = SOUNDFILE_NAMES + (".m4a", ".aac", ".mp4", ".webm", ".wma", ".amr", ".3gp", ".mov", ".mkv")
CONVERT = "M4A/AAC or video converts with: ffmpeg -i IN -ar 16000 -ac 1 OUT.flac"
TOO_SHORT = f"shorter than one analysis window ({1000 * WINDOW // SAMPLE_RATE} ms)"
# A recording whose loudest 10 ms frames are within this of its quietest holds nothing to decode: digital
# silence or a steady noise floor. Speech, however quiet, spans 20 dB and more between its syllables and
# its pauses. Level cannot tell them apart: per-utterance normalization lifts a -98 dBFS dither floor to
# the level of speech (the model read 873 words into one), and quiet speech is as clear as loud.
SILENCE_RANGE_DB = 6.0
SILENT = f"silent (digital silence or a steady noise floor: its levels span under {SILENCE_RANGE_DB:.0f} dB)"
LAYOUTS = ("a LibriSpeech-layout directory (<speaker>/<chapter>/<speaker>-<chapter>.trans.txt "
           "beside the .flac files) or a TSV manifest (audio path<TAB>transcript)")
# Characters that separate words in running text become spaces rather than vanishing.
SEPARATORS = str.maketrans({"-": " ", "\u2014": " ", "\u2013": " ", "_": " ", "/": " ", "\u2019": "'"})
TURKISH_LETTERS = frozenset("ıİğĞşŞ")


class InputError(Exception):
    """Bad input the user can fix (a flag, a corpus, a checkpoint, an LM file, a diverged run's settings):
    the message names it and says what to do. Helpers raise it; each script's main() prints it as
    'error: ...' and exits with status 1."""


def normalize(text, alphabet):
    """Lowercase, keep only the alphabet's symbols and single spaces, in Unicode NFC (an é typed as e +
    accent is the one symbol é). Returns (text, characters dropped, characters folded). A letter the
    alphabet lacks is written without one of its accents (ệ -> ê), without all (é -> e: English's a-z)
    or as its case folding (ß -> ss) if the alphabet has those, else dropped; a separator it lacks (-,
    /, dashes) is a space. İ is i; I is ı in a transcript that writes a letter only Turkish has, when
    the alphabet holds ı."""
    symbols, separators = spelling_tables(alphabet)
    kept, dropped, folded = [], 0, 0
    for c in lowercase(text, turkish_casing(text, alphabet), separators):
        spelling = c if c in symbols or c.isspace() else fold(c, symbols)
        if spelling is None and not unicodedata.combining(c):
            dropped += 1  # a mark with no letter of the alphabet to sit on goes with its letter
        folded += spelling is not None and spelling != c
        kept.append(" " if c.isspace() else spelling or "")
    return " ".join("".join(kept).split()), dropped, folded


@functools.cache
def spelling_tables(alphabet):
    """(the alphabet's symbols as a set, the separators it does not list, for str.translate)."""
    return frozenset(alphabet), {k: v for k, v in SEPARATORS.items() if chr(k) not in alphabet}


def fold(c, symbols):
    """c in the alphabet's symbols: without one of its accents, without all, or as its case folding; or
    None."""
    decomposed = unicodedata.normalize("NFD", c)
    fewer = [unicodedata.normalize("NFC", decomposed[:i] + decomposed[i + 1:])
             for i, d in enumerate(decomposed) if unicodedata.combining(d)]
    plain = "".join(d for d in unicodedata.normalize("NFKD", c) if not unicodedata.combining(d))
    return next((s for s in (*fewer, plain, c.casefold()) if s and set(s) <= symbols), None)


def turkish_casing(raw, alphabet=None):
    """Whether this transcript's I is dotless ı: it writes a letter only Turkish (and Azerbaijani) has, and
    the alphabet (None: not yet known) holds ı. Decided per transcript: one Turkish line must not
    change how the rest of a corpus is read."""
    return (alphabet is None or "ı" in alphabet) and not TURKISH_LETTERS.isdisjoint(raw)


def lowercase(text, turkish, separators=SEPARATORS):
    """Lowercased in Unicode NFC, separators as spaces; İ is i (not i + a combining dot); turkish: I, ı."""
    if turkish:
        text = text.replace("I", "ı")
    return unicodedata.normalize("NFC", text.replace("İ", "i").lower().translate(separators))


def encode(text, alphabet):
    ids = {c: i for i, c in enumerate(vocabulary(alphabet))}
    return [ids[c] for c in text]


def read_alphabet(path):
    """The symbols of an alphabet file: UTF-8, one character a line (blank lines skipped); the blank
    and the space are every model's, so neither is written. InputError naming the file and line."""
    try:
        lines = Path(path).read_bytes().decode("utf-8-sig").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror}); give an alphabet file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 (byte {e.start}); save it as UTF-8") from None
    symbols = {}  # symbol: its line
    for number, line in enumerate(lines, 1):
        symbol = unicodedata.normalize("NFC", line.strip())
        where = f"{path} line {number}"
        if not symbol:
            continue
        if len(symbol) > 1:
            raise InputError(f"{where}: {symbol!r} is {len(symbol)} characters; write one symbol a line")
        if symbol in (VOCAB[0], "|"):
            raise InputError(f"{where}: {symbol!r} is taken: CTC's blank is written _, the beam search's "
                             f"word boundary |; remove it")
        if symbol != lowercase(symbol, turkish=False):
            raise InputError(f"{where}: {symbol!r} is upper case, and transcripts are lowercased; write "
                             f"{lowercase(symbol, turkish=False)!r}")
        if symbol in symbols:
            raise InputError(f"{where}: {symbol!r} is there twice (also line {symbols[symbol]})")
        symbols[symbol] = number
    if not symbols:
        raise InputError(f"{path}: no symbols in it; write one character a line")
    return "".join(symbols)


def alphabet_of(paths, log=print):
    """--alphabet auto: the characters the transcripts of these corpora would be labelled with (letters,
    marks and the apostrophe, lowercased, in NFC; not digits, which are to be spelled out, nor
    punctuation), logged with their counts; rare ones are named, since a typo in a transcript makes one."""
    lines = []
    for path in map(Path, [paths] if isinstance(paths, (str, os.PathLike)) else paths):
        if not path.exists():
            raise InputError(f"{path}: no such file or directory. Expected {LAYOUTS}.")
        if is_recording(path):
            raise InputError(f"{path} is an audio file, not a corpus. Expected {LAYOUTS}.")
        lines += [(utt_id, raw) for utt_id, _, raw in transcript_lines(path, skip=lambda reason, what: None)
                  if raw is not None and not any(c.isdigit() for c in raw)]
    counts, example, turkish = collections.Counter(), {}, 0
    for utt_id, raw in lines:
        turkish += turkish_casing(raw)
        for c in lowercase(raw, turkish_casing(raw)):
            if c == "'" or unicodedata.category(c)[0] in "LM":
                counts[c] += 1
                example.setdefault(c, utt_id)
    if not counts:
        raise InputError(f"--alphabet auto: no letters in the transcripts of {' '.join(map(str, paths))}")
    listed = sorted(counts.most_common(200))  # a logographic script has thousands: the commonest
    log(f"alphabet: {len(counts)} symbols in the training transcripts"
        + (": " if len(listed) == len(counts) else f", the {len(listed)} commonest: ")
        + " ".join(f"{symbol}:{count}" for symbol, count in listed))
    if turkish:
        log(f"alphabet: {turkish} transcripts write Turkish letters (ı ğ ş): their I is read as ı")
    rare = [symbol for symbol, count in sorted(counts.items()) if count < max(5, counts.total() / 100_000)]
    if rare:
        log(f"alphabet: {len(rare)} rare, so hard to learn (a typo in a transcript?): "
            + ", ".join(f"{symbol!r} (in {example[symbol]})" for symbol in rare[:20])
            + (", ..." if len(rare) > 20 else ""))
    return "".join(sorted(counts))


# ---------------------------------------------------------------------------------- corpus
def files_under(root, skip):
    """Every file under root, sorted, following links to folders (each real folder once, so a
    link to an ancestor cannot loop); a folder that cannot be read is passed to skip."""
    seen = set()
    walk = os.walk(root, followlinks=True, onerror=lambda e: skip("folder not readable", e.filename))
    for folder, subfolders, files in walk:
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        yield from (Path(folder) / name for name in sorted(files))


def read_lines(path, expected=LAYOUTS):
    """The lines of a UTF-8 text file (a byte-order mark is dropped), or InputError naming the
    file and the line that is not UTF-8, or that it is binary, and what was expected."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}), nor audio that "
                         f"soundfile reads; save text as UTF-8. Expected {expected}. {CONVERT}") from None
    if "\0" in text:
        raise InputError(f"{path}: a binary file, neither audio that soundfile reads nor text. Expected "
                         f"{expected}. {CONVERT}")
    return text.splitlines()


def _read_librispeech(files, skip):
    """(utt_id, audio path, raw transcript) for every line of the .trans.txt files. An id's audio is the
    <id>.flac beside it, or a file of another audio name (.wav, .mp3, ...); of several (an .m4a kept beside
    the .wav made from it), the first in sorted order that soundfile reads, named through skip."""
    items, audio_named = [], {}
    for f in files:
        if f.suffix.lower() in AUDIO_NAMES:
            audio_named.setdefault((f.parent, f.stem), []).append(f)
    for key, named in audio_named.items():
        audio_named[key] = next((f for f in named if len(named) == 1 or is_audio(f)), named[0])
        if len(named) > 1:
            skip("ids with several audio files (the one used is named)", audio_named[key])
    for trans in (f for f in files if f.name.endswith(".trans.txt")):
        try:
            lines = read_lines(trans)
        except OSError:
            skip("transcript file not readable", trans)
            continue
        for line in lines:
            if line.strip():
                utt_id, _, text = line.strip().partition(" ")
                audio = audio_named.get((trans.parent, utt_id), trans.parent / f"{utt_id}.flac")
                items.append((utt_id, audio, text))
    return items


def transcript_lines(path, skip):
    """(utterance id, audio path, raw transcript) for every transcript line of a corpus (a folder or
    a manifest) and, in a folder, for every audio file that no line names (transcript None)."""
    if not path.is_dir():
        return _read_manifest(path)
    files = list(files_under(path, skip))
    items = _read_librispeech(files, skip)
    listed = {(audio.parent, audio.stem) for _, audio, _ in items}  # with the other files of a listed id
    unlisted = [f for f in files if (f.parent, f.stem) not in listed and not f.name.endswith(".trans.txt")
                and is_recording(f)]
    return items + [(f.stem, f, None) for f in unlisted]


def _read_manifest(path):
    items = []
    try:
        lines = read_lines(path)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        columns = line.split("\t")
        if len(columns) != 2:  # a third column would otherwise end up in the transcript
            raise InputError(f"{path}:{line_no}: expected two tab-separated columns, 'audio path<TAB>"
                            f"transcript', got {len(columns)}: {line[:80]!r}")
        audio, text = columns
        audio = Path(audio)
        audio = audio if audio.is_absolute() else path.parent / audio
        items.append((audio.stem, audio, text))
    return items


def audio_info(paths, cache_dir=None):
    """{path: (frames, sample_rate) or None if unreadable} from file headers; with cache_dir, cached
    there by (path, size, mtime), so that the second start on a large corpus does not reopen every file."""
    cache, cache_file = {}, None
    if cache_dir is not None:
        key = hashlib.sha1("\n".join(sorted(str(p) for p in paths)).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"durations-{key}.json"
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    cache = cache if isinstance(cache, dict) else {}  # valid JSON of another shape: rebuilt
    info, changed = {}, False
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):  # missing, or a pipe that would block the read
            info[p] = None
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        entry = cache.get(str(p))
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp
                and (entry[1] is None or isinstance(entry[1], list) and len(entry[1]) == 2)):
            try:
                header = soundfile.info(str(p))
                entry = [stamp, [header.frames, header.samplerate]]
            except RuntimeError:  # soundfile.LibsndfileError: not audio, or a broken header
                entry = [stamp, None]
            cache[str(p)], changed = entry, True
        info[p] = entry[1]
    if changed and cache_file:
        try:  # a cache we cannot write only costs time on the next start
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)  # whole or not at all: another start may read it meanwhile
        except OSError:
            pass
    return info


def label_problem(raw, text, alphabet):
    """Why a transcript (raw, and normalized: text) can be neither a training label nor a reference
    to score, or None."""
    if any(c.isdigit() and c not in alphabet for c in raw):  # dropped, the label would not be what is said
        return "transcript holds digits (spell numbers out)"
    return None if text else "empty transcript"


def header_problem(header):
    """Why audio with this audio_info() entry cannot be used, or None."""
    if header is None:
        return "not readable as audio"
    if header[0] == 0:
        return "zero-length audio"
    return TOO_SHORT if header[0] / header[1] < WINDOW / SAMPLE_RATE else None


def read_corpus(paths, alphabet, log=print, cache_dir=None):
    """Read corpora (a path or a list of them) into a list of dicts {id, path, text, seconds}, the text
    normalized to the alphabet; log what was skipped and why; cache_dir: see audio_info. Raises
    InputError naming the path when one holds no usable transcripts."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    stats, named = collections.Counter(), collections.defaultdict(list)

    def skip(reason, what):
        stats[reason] += 1
        if len(named[reason]) < 3:
            named[reason].append(str(what))

    utterances = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path}: no such file or directory. Expected {LAYOUTS}.")
        if is_recording(path):
            raise InputError(f"{path} is an audio file, not a corpus. Expected {LAYOUTS}.")
        items, present = [], []
        for item in transcript_lines(path, skip):
            if item[2] is None:
                skip("audio without transcript (ignored)", item[1])
            elif item[1].is_file():
                items.append(item)
                present.append(item)
            else:
                items.append(item)
                skip("audio file missing (or not a regular file)", item[1])
        if not items:
            raise InputError(f"{path}: no transcripts found. Expected {LAYOUTS}.")
        info, usable_before = audio_info([a for _, a, _ in present], cache_dir), len(utterances)
        for utt_id, audio, raw in present:
            text, dropped, folded = normalize(raw, alphabet)
            stats["characters dropped by normalization"] += dropped
            stats["characters written without an accent (or case-folded)"] += folded
            stats["transcripts with Turkish letters, whose I is read as ı"] += turkish_casing(raw, alphabet)
            problem = label_problem(raw, text, alphabet) or header_problem(info[audio])
            if problem:
                skip(problem, audio)
            else:
                frames, rate = info[audio]
                utterances.append({"id": utt_id, "path": str(audio), "text": text,
                                   "seconds": frames / rate})
        if len(utterances) == usable_before:
            raise InputError(f"{path}: none of its {len(items)} transcript lines has usable audio "
                            f"({dict(+stats)}). Expected {LAYOUTS}.")
    log(f"data: {len(utterances)} utterances, {sum(u['seconds'] for u in utterances) / 3600:.1f} h "
        f"from {', '.join(map(str, paths))}")
    for reason, count in stats.items():
        if count:
            examples = f" (e.g. {', '.join(named[reason])})" if named[reason] else ""
            log(f"data: {reason}: {count}{examples}")
    return utterances


def filter_trainable(utterances, max_seconds, output_frames, log=print):
    """Drop what CTC cannot train on: audio over max_seconds, and transcripts that need more
    output frames than the model produces (each repeated letter costs an extra blank frame)."""
    kept, too_long, unalignable = [], 0, 0
    for u, frames in zip(utterances, output_frames([round(u["seconds"] * SAMPLE_RATE) for u in utterances])):
        text = u["text"]  # one symbol a character
        needed = len(text) + sum(a == b for a, b in zip(text, text[1:]))
        if u["seconds"] > max_seconds:
            too_long += 1
        elif needed > frames:
            unalignable += 1
        else:
            kept.append(u)
    if too_long or unalignable:
        log(f"data: skipped {too_long} utterances longer than --max-seconds {max_seconds} and "
            f"{unalignable} whose transcript is too long for the model's output frames")
    return kept


# ----------------------------------------------------------------------------------- audio
def load_audio(path):
    """Mono float32 waveform at 16 kHz: channels averaged, any other rate resampled. The resampling
    filter has (16000 / g) x (rate / g) phases and taps, g = gcd(rate, 16000): 70,560 at 44,100 Hz,
    282,240 at 11,025, but 768 million at 47,999 (13 GB for 3 s). Past a million, the rate is read as
    the nearest multiple of 100 Hz: at most 0.6% off in speed and pitch, a tenth of what training's
    speed perturbation varies."""
    samples, rate = soundfile.read(path, dtype="float32")  # 1-D when mono: no copy of a long file
    wave = torch.from_numpy(samples if samples.ndim == 1 else samples.mean(axis=1))
    if SAMPLE_RATE * rate // math.gcd(rate, SAMPLE_RATE) ** 2 > 1_000_000:
        rate = max(100, round(rate / 100) * 100)
    if rate != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, rate, SAMPLE_RATE)
    return wave


def is_recording(path):
    """Whether a file is a recording: named as audio (AUDIO_NAMES), or audio that soundfile opens."""
    return Path(path).suffix.lower() in AUDIO_NAMES or is_audio(path)


def is_audio(path):
    """Whether soundfile opens this regular file as audio, whatever its name."""
    if not Path(path).is_file():  # a named pipe would block the read
        return False
    try:
        soundfile.info(str(path))
    except (RuntimeError, TypeError):  # soundfile.LibsndfileError, or a header it cannot parse
        return False
    return True


def is_silent(wave):
    """Whether a waveform holds nothing to decode (see SILENCE_RANGE_DB): no energy, or the 99th percentile
    of its 10 ms frames' energy within SILENCE_RANGE_DB of the 10th. Energy is measured after a high-pass:
    the samples less their 2.5 ms moving average, which removes a DC offset, lowers mains hum (50-60 Hz)
    by 30 dB and passes everything above 500 Hz within 1.5 dB, so that neither a cheap converter's offset,
    a hum louder than the speech, nor a hiss above the formants makes speech "silent"."""
    average = torch.nn.functional.avg_pool1d(wave[None, None], 41, 1, 20, count_include_pad=False)[0, 0]
    change = wave - average
    frames = change[:len(change) // HOP * HOP].reshape(-1, HOP).square_().mean(1)
    if len(frames) == 0 or not bool(frames.max() > 0):
        return True
    loud, quiet = torch.quantile(frames, torch.tensor([0.99, 0.10]))
    return bool(loud < quiet * 10 ** (SILENCE_RANGE_DB / 10))


def load_usable_audio(path):
    """(waveform, None), or (None, why the file cannot be trained on, scored or decoded). A float
    file past full scale is scaled down to it: the features do not depend on the scale, but its
    power can overflow float32."""
    path = Path(path)
    if path.is_dir():
        return None, "a folder, not a recording"
    if path.is_symlink() and not path.exists():
        return None, "a link that leads nowhere (or around in a loop)"
    if not path.is_file():  # a named pipe would block the read
        return None, "not a regular file (a pipe or a device)" if path.exists() else "no such file"
    try:
        wave = load_audio(path)
    except (RuntimeError, ValueError) as e:  # soundfile's errors are RuntimeErrors
        hint = f"; {CONVERT}" if path.suffix.lower() not in SOUNDFILE_NAMES else ""  # a format it never reads
        return None, f"unreadable audio ({e}){hint}"
    if len(wave) < WINDOW:
        return None, TOO_SHORT
    if not bool(torch.isfinite(wave).all()):
        return None, "NaN or infinite samples"
    peak = wave.abs().max()
    wave = wave / peak if peak > 1 else wave
    if is_silent(wave):
        return None, SILENT
    return wave, None


class AudioDataset(torch.utils.data.Dataset):
    """Item i -> (waveform, token ids, text, id), or None when the file cannot be used;
    collate() drops those, so one bad file costs one utterance, not the run."""

    def __init__(self, utterances, alphabet):
        self.utterances, self.alphabet = utterances, alphabet

    def __len__(self):
        return len(self.utterances)

    def __getitem__(self, i):
        u = self.utterances[i]
        wave, problem = load_usable_audio(u["path"])
        if problem:
            print(f"warning: skipping {u['path']}: {problem}", file=sys.stderr)
            return None
        return wave, torch.tensor(encode(u["text"], self.alphabet), dtype=torch.long), u["text"], u["id"]


def collate(items):
    """Pad a list of dataset items into one batch dict (waves zero-padded at the end), or None
    when every file in it was unusable: the training loop counts that as a skipped step."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    waves, targets, texts, ids = zip(*items)
    return {
        "waves": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True),
        "wave_lengths": torch.tensor([len(w) for w in waves], dtype=torch.long),
        "targets": torch.nn.utils.rnn.pad_sequence(targets, batch_first=True),
        "target_lengths": torch.tensor([len(t) for t in targets], dtype=torch.long),
        "texts": list(texts), "ids": list(ids),
    }


# --------------------------------------------------------------------------------- batches
def batch_loader(utterances, batches, alphabet, workers, pin_memory, worker_init_fn=None):
    """Padded batches (collate) of utterances, batches: a BucketBatches, their targets in the model's
    alphabet, read by workers processes. It has its own generator: a loader must not draw from the global
    RNG, or a resume would shift it."""
    return torch.utils.data.DataLoader(
        AudioDataset(utterances, alphabet), batch_sampler=batches, collate_fn=collate, num_workers=workers,
        pin_memory=pin_memory, worker_init_fn=worker_init_fn, persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None, generator=torch.Generator())


class BucketBatches(torch.utils.data.Sampler):
    """Batches of similar-length utterances, each at most batch_seconds of padded audio.

    The batches are fixed (sorted by length, so little padding); only their order changes:
    shortest first in epoch 0, then reshuffled each epoch from (seed, epoch). set_epoch(epoch,
    start) replays an epoch from its start-th batch, which is how resume continues the same
    data order. With several ranks each
    takes every world_size-th batch of the same order, trimmed so all ranks take equal steps.
    """

    def __init__(self, seconds, batch_seconds, seed=0, shuffle=True, rank=0, world_size=1):
        order = np.argsort(seconds, kind="stable")
        self.batches, batch = [], []
        for i in order:
            if batch and (len(batch) + 1) * seconds[i] > batch_seconds:  # sorted: i is the longest
                self.batches.append(batch)
                batch = []
            batch.append(int(i))
        if batch:
            self.batches.append(batch)
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def epoch_order(self):
        if not self.shuffle:
            return self.batches
        if self.epoch == 0:  # SortaGrad (DeepSpeech 2): short utterances first ease the start
            order = self.batches
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = [self.batches[i] for i in torch.randperm(len(self.batches), generator=generator)]
        per_rank = len(order) // self.world_size
        return order[self.rank::self.world_size][:per_rank]

    def __len__(self):
        return len(self.batches) // self.world_size if self.shuffle else len(self.batches)

    def __iter__(self):
        return iter(self.epoch_order()[self.start:])



# ------------------------------------------------------------------------------ error rates
def edit_distance(ref, hyp):
    """Levenshtein distance between two sequences, one numpy row at a time."""
    ref, hyp = list(ref), list(hyp)
    if not ref or not hyp:
        return len(ref) + len(hyp)
    positions = np.arange(len(hyp) + 1)
    row = positions.copy()
    for r in ref:
        substitute = row[:-1] + np.array([r != h for h in hyp])
        candidates = np.concatenate([[row[0] + 1], np.minimum(substitute, row[1:] + 1)])
        # An insertion moves one cell right at cost 1: cur[j] = min_k<=j cand[k] + (j - k).
        row = np.minimum.accumulate(candidates - positions) + positions
    return int(row[-1])


def error_rates(refs, hyps):
    """Corpus WER and CER: total edits over total reference words (characters), in percent."""
    word_edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    char_edits = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    words = sum(len(r.split()) for r in refs)
    chars = sum(len(r) for r in refs)
    return 100.0 * word_edits / max(words, 1), 100.0 * char_edits / max(chars, 1)
