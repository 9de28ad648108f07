"""Transcribe recordings with a trained model: greedy or beam-search CTC decoding, word times,
and corpus-level WER/CER when the inputs have transcripts.

    python decode.py runs/<run>/best.pt file.flac                  # prints the transcript
    python decode.py runs/<run>/best.pt LibriSpeech/test-clean     # id<TAB>hypothesis lines,
    python decode.py runs/<run>/best.pt a.wav b.flac corpus.tsv    # then WER/CER on stderr
    python decode.py runs/<run>/best.pt AN4/test --lm AN4/train.3gram.arpa   # beam search + LM

Greedy decoding takes the best symbol of every frame. With --lm or --lexicon, a beam search
(torchaudio's CTC decoder, flashlight's lexicon beam search with KenLM) keeps the --beam-size
best partial transcripts, spells only words of the lexicon, and scores each finished word with
the n-gram LM: score = log p_CTC + --lm-weight * log p_LM + --word-score * words.

Inputs are audio files (FLAC or WAV, any rate, mono or stereo), LibriSpeech-layout
directories, directories of audio files and TSV manifests (audio path<TAB>transcript).
Recordings longer than --chunk-seconds are cut at their quietest point near each chunk's
end, decoded chunk by chunk, and the text joined in order.
"""
import argparse
import collections
import functools
import gzip
import json
import math
import os
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import runs
from data import InputError
from model import (BLANK, ENGLISH, FRAMES_PER_SECOND, HOP, SAMPLE_RATE, SPACE, WINDOW, greedy_spans,
                   lengths_mask, vocabulary)

SEARCH_SECONDS = 2.0  # how far back from a chunk's end to look for a pause to cut at
PAUSE_SECONDS = 0.7   # a pause that ends a sentence: where recordings far longer than the model's are cut
PROGRESS_SECONDS = 30  # how often the progress line is written when stderr is not a terminal
WINDOW_BATCHES = 32   # inputs are sorted by length up to this many batches at a time, then written in order
# Beam search settings, tuned on AN4's and the synthetic corpus's dev sets (README).
BEAM_DEFAULTS = {"beam_size": 100, "lm_weight": 1.5, "word_score": 0.5}
KENLM_MAX_ORDER = 6  # flashlight-text's KenLM is built with the default KENLM_MAX_ORDER
# Past a few thousand hypotheses a wider beam only costs memory (1e9 took 24 GB before it was
# killed); LibriSpeech recipes search with beams of 50-1,500.
MAX_BEAM = 10_000


def read_lm_words(path):
    """The words of an ARPA file's unigrams (plain or gzipped), for the default lexicon, or None
    for a KenLM binary, whose words cannot be listed."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            if f.read(8) == b"mmap lm ":
                return None
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return arpa_unigrams(f, path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # cut short, or not gzip under a .gz name
        raise InputError(f"{path}: not a complete gzip file ({e}); download or build it again") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None


def arpa_unigrams(lines, path):
    """The words of the 1-grams section of an ARPA file's lines."""
    words, section, order = [], None, 0
    for line_no, line in enumerate(lines, 1):
        line = line.strip()
        if section is None and line.startswith("\ufeff"):
            raise InputError(f"{path}: starts with a UTF-8 byte-order mark, which KenLM cannot read: "
                             f"save it without one")
        if section is None and line and line != "\\data\\":
            raise InputError(f"{path}:{line_no}: expected an ARPA file, which opens with \\data\\")
        if section == "\\data\\" and line.startswith("ngram ") and line[6:].partition("=")[0].isdigit():
            order = max(order, int(line[6:].partition("=")[0]))
        if line.startswith("\\"):
            if section == "\\1-grams:":
                break
            section = line
        elif section == "\\1-grams:" and line:
            fields = line.split()
            if len(fields) < 2:
                raise InputError(f"{path}:{line_no}: expected 'log10 p<TAB>word', got {line[:60]!r}")
            words.append(fields[1])
    if section is None:
        raise InputError(f"{path} is empty: expected an ARPA file")
    if order > KENLM_MAX_ORDER:
        raise InputError(f"{path} is a {order}-gram LM; the KenLM in flashlight-text reads up to "
                         f"{KENLM_MAX_ORDER}-grams: build it again with a lower order (lm.py build --order "
                         f"{KENLM_MAX_ORDER})")
    return [w for w in words if w not in ("<s>", "</s>", "<unk>")]


def read_lexicon(path):
    """The first field of each line: a character model spells a word by its letters, so other
    fields (librispeech-lexicon.txt's pronunciations, our lexicon's spellings) are not needed."""
    try:
        lines = data.read_lines(path, expected="a lexicon: a word first on each line")
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    if next((line.strip() for line in lines if line.strip()), None) == "\\data\\":
        raise InputError(f"--lexicon {path} is an ARPA language model, not a lexicon: pass it as --lm "
                         f"(its words are the default lexicon), and as --lexicon a file of words, one a line")
    return [line.split()[0] for line in lines if line.strip()]


def build_beam_search(lm, lexicon, beam_size, lm_weight, word_score, alphabet, note=print):
    """torchaudio's CTC beam search over the words of the lexicon (default: the LM's words), spelled in
    the model's alphabet. Every file is read and checked here, before any audio is decoded; note(message)
    tells of the words it leaves out and of a lexicon spelled in another alphabet."""
    from torchaudio.models.decoder import ctc_decoder  # needs flashlight-text
    source = lexicon or lm
    lm_words = read_lm_words(lm) if lm else None
    if not lexicon and lm_words is None:
        raise InputError(f"{lm} is a KenLM binary, whose words cannot be listed here: pass the words it "
                         f"may output with --lexicon")
    words = read_lexicon(lexicon) if lexicon else lm_words
    if lexicon and lm_words is not None:  # a word the LM lacks is scored as <unk>, as if misspelled
        known = set(lm_words)
        unknown = [w for w in words if w not in known]
        if len(unknown) > len(words) / 2:
            raise InputError(f"{len(unknown):,} of the {len(words):,} words of {lexicon} are not in {lm} "
                             f"(e.g. {', '.join(unknown[:3])}; the LM has {', '.join(lm_words[:3])}): one in "
                             f"upper case and the other in lower? Use a lexicon written in the LM's spelling")
    # Decoder words stay as the LM writes them ("HELLO" in LibriSpeech's); spelled in the model's symbols.
    spellings = {w: data.normalize(w, alphabet)[0] for w in words}
    left_out = [w for w, s in spellings.items() if not s or " " in s]
    spellings = {w: s for w, s in spellings.items() if s and " " not in s}
    if not spellings:
        raise InputError(f"{source} holds no words spelled with the model's alphabet ({alphabet})")
    if left_out:
        note(f"note: {source}: {len(left_out):,} words are left out, spelled as nothing or as several words "
             f"in the model's alphabet (e.g. {', '.join(left_out[:3])})")
    own_letters = {c for c in alphabet if c.isalpha()} - set(ENGLISH)
    if own_letters and not own_letters & set("".join(spellings.values())):
        note(f"note: {source} never uses the model's own letters ({' '.join(sorted(own_letters)[:10])}): "
             f"written for another alphabet? Build it for this model: lm.py build --alphabet CHECKPOINT")
    vocab = vocabulary(alphabet)
    tokens = ["|" if symbol == " " else symbol for symbol in vocab]  # "|": the decoder's word boundary
    with tempfile.TemporaryDirectory() as folder:
        lexicon_file = Path(folder) / "lexicon.txt"
        # A word ends at the boundary token "|", as the decoder's lexicons spell it.
        lexicon_file.write_text("".join(f"{w}\t{' '.join(s)} |\n" for w, s in spellings.items()),
                                encoding="utf-8")
        try:
            return ctc_decoder(str(lexicon_file), tokens, lm=str(lm) if lm else None, beam_size=beam_size,
                               lm_weight=lm_weight, word_score=word_score,
                               blank_token=vocab[BLANK], sil_token="|")
        except RuntimeError as e:  # KenLM's message says what it could not parse
            raise InputError(f"{lm}: KenLM cannot load it: {' '.join(str(e).split())[:400]}") from None


def beam_search_spans(decoder, log_probs, out_lengths, vocab):
    """Per utterance, the beam search's best transcript as [(symbol, frame, frame)], spelled in our
    letters (the lexicon spells each word so) at the frame where each letter is emitted."""
    # A word is complete only at a word boundary, and the model (trained on transcripts without a
    # trailing space) emits none after the last word: append one frame that is surely a boundary.
    batch, frames, symbols = log_probs.shape
    boundary = torch.full((symbols,), -1e4)
    boundary[SPACE] = 0.0
    emissions = boundary.expand(batch, frames + 1, symbols).clone()
    out_lengths = out_lengths.cpu()
    real_frames = log_probs.float().cpu()[lengths_mask(out_lengths, frames)]
    emissions[lengths_mask(out_lengths, frames + 1)] = real_frames  # the boundary frame right after
    spans = []
    for nbest in decoder(emissions, (out_lengths + 1).int()):
        tokens, times = (nbest[0].tokens.tolist(), nbest[0].timesteps.tolist()) if nbest else ([], [])
        kept, words = [], 0
        # Flashlight counts frames from 1: its step 0 is the start of the search, before any frame.
        for symbol, frame in ((vocab[t], f - 1) for t, f in zip(tokens, times) if t != BLANK):
            if words == len(nbest[0].words):  # the path may end inside a word it never finished
                break
            words += symbol == " " and bool(kept) and kept[-1][0] != " "
            kept.append((symbol, frame, frame))
        spans.append(kept)
    return spans


def words_with_times(spans, seconds_per_frame, offset=0.0):
    """[{"word", "start", "end"}] from one utterance's spans: a word lasts from the first frame
    of its first letter to the end of the last frame of its last, in seconds after offset."""
    words, letters = [], []
    for symbol, first, last in spans + [(" ", None, None)]:
        if symbol != " ":
            letters.append((symbol, first, last))
        elif letters:
            words.append({"word": "".join(s for s, _, _ in letters),
                          "start": round(offset + letters[0][1] * seconds_per_frame, 3),
                          "end": round(offset + (letters[-1][2] + 1) * seconds_per_frame, 3)})
            letters = []
    return words


def split_at_pauses(wave, typical):
    """A recording longer than four times typical seconds (the model's mean training utterance, about
    twice its longest), cut in the middle of pauses of PAUSE_SECONDS or more (50 ms levels below the
    midpoint, in dB, of its 5th and 95th percentile levels) into pieces of up to about typical seconds.
    A model reads a recording far longer than its training utterances worse than the same words one
    utterance at a time (its GRUs run past the lengths they learned): AN4 joined per speaker lost 4.6
    points in 30 s chunks, 0.8 so. None: the recording whole."""
    if typical is None or len(wave) <= 4 * typical * SAMPLE_RATE:
        return [wave]
    frames = wave[:len(wave) // HOP * HOP].reshape(-1, HOP).square().mean(1)
    level = 10 * torch.log10(frames.clamp(min=1e-20))
    level = F.avg_pool1d(level[None, None], 5, 1, 2, count_include_pad=False)[0, 0]  # over 50 ms
    low, high = torch.quantile(level, torch.tensor([0.05, 0.95]))
    quiet = (level < (low + high) / 2).float()
    span = round(PAUSE_SECONDS * FRAMES_PER_SECOND)
    paused = F.avg_pool1d(quiet[None, None], span, 1)[0, 0] == 1  # frames i to i + span - 1 all quiet
    none = torch.zeros(1, dtype=torch.int)
    edges = torch.diff(paused.int(), prepend=none, append=none)
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0] + span - 1  # a pause's frames
    pauses = [0, *(((starts + ends) // 2) * HOP).tolist(), len(wave)]
    cuts = [0]
    for start, end in zip(pauses, pauses[1:]):  # a piece grows by the next until it would pass typical
        if end - cuts[-1] > typical * SAMPLE_RATE and start > cuts[-1]:
            cuts.append(start)
    cuts.append(len(wave))
    return [wave[a:b] for a, b in zip(cuts, cuts[1:])]


def split_chunks(wave, chunk_seconds):
    """Cut a long waveform into pieces of at most chunk_seconds, each cut placed at the
    quietest 10 ms in the last SEARCH_SECONDS before the chunk's end."""
    chunk, search = int(chunk_seconds * SAMPLE_RATE), int(SEARCH_SECONDS * SAMPLE_RATE)
    pieces, start = [], 0
    while len(wave) - start > chunk:
        tail = wave[start + chunk - search:start + chunk]
        energy = tail[: len(tail) // HOP * HOP].reshape(-1, HOP).pow(2).sum(1)   # per 10 ms
        cut = start + chunk - search + int(energy.argmin()) * HOP
        pieces.append(wave[start:cut])
        start = cut
    pieces.append(wave[start:])
    return pieces


def resolve_inputs(paths, alphabet):
    """Inputs -> ([(id, audio path, reference text or None)], inputs that name no recording). Every
    recording is decoded; its transcript only decides whether it is scored: not when train.py
    would not train on it (digits, nothing to say). A file is a recording if soundfile opens it or
    its name says audio (data.is_recording), else a manifest. An id is the file's name (or the
    corpus's utterance id); ids that two recordings share become their paths. Problems go to stderr."""
    utterances, unusable, unscored = [], 0, collections.Counter()
    for path in map(Path, paths):
        if not (path.is_dir() or path.is_file() and not data.is_recording(path)):
            utterances.append((path.stem, path, None))  # audio, or what its loading will name
            continue
        try:
            lines = data.transcript_lines(path, skip=lambda why, what: print(f"error: {what}: {why}",
                                                                              file=sys.stderr))
            if not lines:
                raise InputError(f"{path}: no audio files that soundfile reads and no transcripts")
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            unusable += 1
            continue
        for utt_id, audio, raw in lines:
            text = data.normalize(raw, alphabet)[0] if raw is not None else None
            problem = data.label_problem(raw, text, alphabet) if raw is not None else None
            unscored[problem] += bool(problem)
            utterances.append((utt_id, audio, None if problem else text))
    if +unscored:
        print(f"note: decoded, not scored (the reference cannot be): {dict(+unscored)}", file=sys.stderr)
    shared = {i for i, count in collections.Counter(i for i, _, _ in utterances).items() if count > 1}
    named, seen = [], collections.Counter()
    for i, path, ref in utterances:
        name = str(path) if i in shared else i
        seen[name] += 1  # a file that a manifest lists twice: its second line is <path>#2
        named.append((name + f"#{seen[name]}" * (seen[name] > 1), str(path), ref))
    return named, unusable


@torch.no_grad()
def transcribe(model, waves, device, batch_seconds, chunk_seconds, spans=None, bf16=False, typical=None):
    """[(text, words with times)] for a list of 1-D waveforms, batched by length; spans(log_probs,
    out_lengths) reads a batch's model output (default: greedy, in the model's symbols). A recording far
    over typical seconds is cut at its pauses (split_at_pauses), a piece over chunk_seconds into chunks;
    each keeps its times from the recording's start."""
    if spans is None:
        spans = functools.partial(greedy_spans, vocab=model.vocab)
    seconds_per_frame = model.config.time_stride / FRAMES_PER_SECOND
    pieces = []  # (recording, its first sample, samples)
    for i, wave in enumerate(waves):
        start = 0
        parts = split_at_pauses(wave, typical)
        for piece in (chunk for part in parts for chunk in split_chunks(part, chunk_seconds)):
            # Under one analysis window (a cut just before the end) there are no frames; in a silent
            # chunk no words (the per-utterance normalization would make speech of its noise floor).
            if len(piece) >= WINDOW and not data.is_silent(piece):
                pieces.append((i, start, piece))
            start += len(piece)
    words = [[] for _ in pieces]
    seconds = [len(p) / SAMPLE_RATE for _, _, p in pieces]
    for batch in data.BucketBatches(seconds, batch_seconds, shuffle=False):
        chunk = [pieces[j][2] for j in batch]
        wave_lengths = torch.tensor([len(c) for c in chunk])
        padded = torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            log_probs, out_lengths = model(padded, wave_lengths)
        for j, found in zip(batch, spans(log_probs, out_lengths)):
            words[j] = words_with_times(found, seconds_per_frame, pieces[j][1] / SAMPLE_RATE)
    joined = [[] for _ in waves]
    for (i, _, _), piece_words in zip(pieces, words):
        joined[i] += piece_words
    return [(" ".join(w["word"] for w in recording), recording) for recording in joined]


class Inputs(torch.utils.data.Dataset):
    """Input i -> (i, waveform or None, why not), read in a DataLoader worker. The waveform is a numpy
    array: it comes back through the pipe, where a tensor would come through a shared-memory handle
    whose hand-over a Ctrl-C can cut (a traceback from multiprocessing's resource sharer)."""

    def __init__(self, paths, pause_seconds=0.0):
        self.paths, self.pause = paths, torch.zeros(round(pause_seconds * SAMPLE_RATE))

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        wave, problem = data.load_usable_audio(self.paths[i])
        return i, None if wave is None else torch.cat([self.pause, wave, self.pause]).numpy(), problem


def decode_in_order(model, paths, seconds, device, args, spans, progress, typical=None):
    """(input index, text, words, problem) for every input, in input order, as each window of
    consecutive inputs is done (the first of one batch, each next twice as long, up to WINDOW_BATCHES).
    Workers read the audio while the model decodes; within a window the inputs are batched by length
    (seconds: each input's, 0 where unknown). Memory does not grow with the number of inputs. progress (a
    ProgressLine) advances as each batch is decoded. On Ctrl-C the inputs decoded but held back for their
    order come first, out of order, then the interrupt."""
    batches, start, size = [], 0, 1
    while start < len(paths):  # a window: about size batches of consecutive inputs
        end, total = start + 1, seconds[start]
        while end < len(paths) and total + seconds[end] <= size * args.batch_seconds:
            total, end = total + seconds[end], end + 1
        window = data.BucketBatches(seconds[start:end], args.batch_seconds, shuffle=False).batches
        batches += [[start + i for i in batch] for batch in window]
        start, size = end, min(2 * size, WINDOW_BATCHES)  # the first transcripts come out soon
    loader = torch.utils.data.DataLoader(Inputs(paths, args.pause), batch_sampler=batches, collate_fn=list,
                                         num_workers=args.workers, worker_init_fn=runs.ignore_signals)
    done, next_index = {}, 0
    try:
        for items in loader:
            usable = [(i, torch.from_numpy(wave)) for i, wave, problem in items if wave is not None]
            results = transcribe(model, [wave for _, wave in usable], device, args.batch_seconds,
                                 args.chunk_seconds, spans, args.bf16, typical) if usable else []
            done.update({i: (i, None, None, problem) for i, _, problem in items if problem})
            silent = {i: (i, "", [], problem) for i, _, problem in items if problem == data.SILENT}
            done.update(silent)  # no words, and the reason
            done.update({i: (i, text, words, None) for (i, _), (text, words) in zip(usable, results)})
            progress.advance(len(items), sum(seconds[i] for i, _, _ in items))
            while next_index in done:
                yield done.pop(next_index)
                next_index += 1
    except KeyboardInterrupt:
        for i in sorted(done):  # decoded: printed out of order rather than lost
            yield done[i]
        raise


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=runs.named_path, help="best.pt or last.pt written by train.py")
    parser.add_argument("inputs", nargs="+", help="audio files, directories or TSV manifests")
    finite = runs.in_range(float, -math.inf, low_open=True)
    parser.add_argument("--device", type=runs.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-seconds", type=runs.in_range(float, 0, low_open=True), default=300.0,
                        help="padded audio per batch")
    parser.add_argument("--chunk-seconds", type=runs.in_range(float, SEARCH_SECONDS, 86400, low_open=True),
                        default=30.0, help="longer audio is decoded in chunks cut at pauses")
    parser.add_argument("--workers", type=runs.in_range(int, 0), default=1, help="processes reading audio")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast; default: on for CUDA only (on a CPU with AVX512-BF16 it is "
                             "1.4x faster but moved AN4 test WER by 0.4 points: RESULTS.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr (it is never on "
                        "stdout)")
    parser.add_argument("--pause", type=runs.in_range(float, 0, 60), default=0.0, metavar="SECONDS",
                        help="add this much digital silence before and after each recording: a check that a "
                             "pause leaves the words (word times then count from the pause's start)")
    parser.add_argument("--timestamps", action="store_true",
                        help='JSON lines: {"id", "text", "words": [{"word", "start", "end"}]}, seconds')
    beam = parser.add_argument_group("beam search (with --lm or --lexicon; the default is greedy)")
    beam.add_argument("--lm", type=Path, help="word n-gram LM: ARPA (.arpa, .arpa.gz) or KenLM binary")
    beam.add_argument("--lexicon", type=Path, help="the words it may output, the first on each line "
                                                   "(default: the LM's words)")
    beam.add_argument("--beam-size", type=runs.in_range(int, 1, MAX_BEAM + 1),
                      help=f"default {BEAM_DEFAULTS['beam_size']}, at most {MAX_BEAM:,}")
    beam.add_argument("--lm-weight", type=finite, help=f"default {BEAM_DEFAULTS['lm_weight']}")
    beam.add_argument("--word-score", type=finite, help=f"per word; default {BEAM_DEFAULTS['word_score']}")
    return parser


def decode_inputs(args):
    """Decode as the parsed command line says, printing each transcript as it is ready. Raises
    InputError for a bad checkpoint, LM or lexicon (before any audio), or when nothing was decoded."""
    model, checkpoint = runs.build_from_checkpoint(args.checkpoint)
    typical = utterance_seconds(checkpoint)
    spans = None  # greedy
    if args.lm or args.lexicon:
        settings = {name: BEAM_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)
                    for name in BEAM_DEFAULTS}
        decoder = build_beam_search(args.lm, args.lexicon, alphabet=model.config.alphabet,
                                    note=functools.partial(print, file=sys.stderr), **settings)
        spans = functools.partial(beam_search_spans, decoder, vocab=model.vocab)
    device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    model.to(device).eval()

    utterances, unusable = resolve_inputs(args.inputs, model.config.alphabet)
    single = len(args.inputs) == len(utterances) == 1 and Path(args.inputs[0]).is_file() \
        and utterances[0][2] is None
    paths = [p for _, p, _ in utterances]
    info = data.audio_info([Path(p) for p in paths], runs.cache_dir())
    seconds = [info[Path(p)][0] / info[Path(p)][1] if info[Path(p)] else 0.0 for p in paths]
    progress = ProgressLine(seconds, quiet=args.quiet or len(paths) < 2)
    scored, failed, silent = [], 0, 0
    for i, text, words, problem in decode_in_order(model, paths, seconds, device, args, spans, progress,
                                                   typical):
        utt_id, path, ref = utterances[i]
        progress.clear()  # a transcript on a terminal that shows stderr too starts a line of its own
        if problem == data.SILENT:  # nothing to say: an empty transcript, and why on stderr
            progress.say(f"note: {printable(path)}: {problem}; no words")
            silent += 1
        elif problem:
            progress.say(f"warning: {printable(path)}: {problem}; skipped")
            failed += 1
            continue
        if args.timestamps:
            print(json.dumps({"id": utt_id, "text": text, "words": words}), flush=True)
        else:
            print(text if single else f"{printable(utt_id)}\t{text}", flush=True)
        if ref is not None:
            scored.append((ref, text))
    progress.close()
    if failed == len(utterances):
        raise InputError("nothing was decoded")
    if scored:
        wer, cer = data.error_rates(*zip(*scored))
        print(f"WER {wer:.2f}%  CER {cer:.2f}%  ({len(scored)} utterances with references)", file=sys.stderr)
    if silent and len(utterances) > 1:
        print(f"note: {silent} of {len(utterances)} recordings were silent and decoded to nothing"
              f"{' (each scored as all deletions)' if scored else ''}", file=sys.stderr)
    if failed or unusable:
        named_none = f"; {unusable} inputs named no recording" if unusable else ""
        print(f"warning: {failed} of {len(utterances)} recordings could not be decoded{named_none}",
              file=sys.stderr)


def utterance_seconds(checkpoint):
    """The mean length of the model's training utterances (AN4: 2.7 s, the longest 6.4 s), or None for a
    checkpoint that does not say (every recording whole)."""
    train_set = checkpoint.get("train_set") or {}
    if not train_set.get("utterances"):
        return None
    return train_set["seconds"] / train_set["utterances"]


class ProgressLine:
    """How far decoding is, on stderr only (stdout stays the transcripts): on a terminal one line
    rewritten in place, otherwise a plain line every PROGRESS_SECONDS; nothing when quiet."""

    def __init__(self, seconds, quiet):
        self.total, self.total_audio, self.quiet = len(seconds), sum(seconds), quiet
        self.terminal = sys.stderr.isatty()
        self.done, self.audio, self.started, self.shown, self.drawn = 0, 0.0, time.time(), time.time(), False

    def advance(self, recordings, audio_seconds):
        """recordings more, of audio_seconds in all, are decoded."""
        self.done, self.audio, now = self.done + recordings, self.audio + audio_seconds, time.time()
        wait = 0.2 if self.terminal else PROGRESS_SECONDS
        if self.quiet or (now - self.shown < wait and self.done < self.total):
            return
        self.shown, speed = now, self.audio / max(now - self.started, 1e-6)
        eta = (self.total_audio - self.audio) / max(speed, 1e-6)
        line = (f"decoded {self.done}/{self.total} recordings, {self.audio / 60:.1f} of "
                f"{self.total_audio / 60:.1f} min of audio, {speed:.0f}x realtime, ETA {eta / 60:.1f} min")
        if self.terminal:
            print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
            self.drawn = True
        else:
            print(line, file=sys.stderr, flush=True)

    def say(self, message):
        """A message on stderr, on a line of its own."""
        self.close()
        print(message, file=sys.stderr, flush=True)

    def clear(self):
        """Erase the progress line, drawn again at the next advance."""
        if self.drawn:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            self.drawn = False

    def close(self):
        if self.drawn:  # the cursor is at the end of the progress line
            print(file=sys.stderr, flush=True)
            self.drawn = False


def printable(name):
    """A file name as one field of a line: a tab, newline or other control character in it, which
    would split or forge lines, is written as an escape (\\t, \\n, \\x1b)."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)


def main(argv=None):
    """The command line: decode_inputs() with its InputError printed as 'error: ...' and exit status 1."""
    runs.utf8_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.lm or args.lexicon) and any(getattr(args, name) is not None for name in BEAM_DEFAULTS):
        parser.error("--beam-size, --lm-weight and --word-score need --lm or --lexicon")
    # A kill stops decoding as Ctrl-C does, so that the loader shuts its workers down; they ignore
    # both signals, and the default death of this process alone left them blocked on a full queue.
    kill_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        decode_inputs(args)
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; every recording decoded so far is above (the last out of input order), "
                 "the rest were not decoded")
    except BrokenPipeError:  # a reader such as `head` stopped reading: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        sys.exit(141)  # 128 + SIGPIPE, as the shell reports it
    finally:
        signal.signal(signal.SIGTERM, kill_handler)


if __name__ == "__main__":
    main()
