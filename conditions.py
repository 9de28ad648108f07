"""Copies of a corpus under a recording condition, to see what it costs a model: quieter or louder
(clipped), a pause around each utterance, a click or a door slam in it, or a folder's utterances joined
into one long recording. Writes 24-bit FLAC files and
a manifest (audio path<TAB>transcript) that decode.py and train.py read; nothing is changed in place.

    python conditions.py AN4/test AN4/test-quiet50 --gain-db -50           # a far, quiet microphone
    python conditions.py AN4/test AN4/test-loud --gain-db 20                # clipped at full scale
    python conditions.py AN4/test AN4/test-pause2 --pause 2 --floor-dbfs -80   # 2 s of a noise floor
    python conditions.py AN4/test AN4/test-click --speech-dbfs -45 --click-dbfs 0   # a 20 ms burst
    python conditions.py AN4/test AN4/test-slam --speech-dbfs -26 --slam-dbfs 0     # a decaying knock
    python conditions.py AN4/test AN4/test-joined --join 0.3       # each speaker's utterances in one file
    python decode.py runs/<run>/best.pt AN4/test-quiet50/list.tsv

Levels are dBFS: a signal's RMS for --speech-dbfs and --floor-dbfs, a burst's peak for --click-dbfs
and --slam-dbfs. Random draws (noise, where a burst falls) come from --seed and the utterance's id.
"""
import argparse
import sys
import zlib
from pathlib import Path

import numpy as np
import soundfile

import data


def dbfs(level):
    return 10 ** (level / 20)


def burst(rng, seconds, peak_dbfs, decay_seconds=None):
    """White noise of this peak, flat or decaying exponentially (a knock or a slam)."""
    noise = rng.standard_normal(int(seconds * data.SAMPLE_RATE))
    if decay_seconds:
        noise *= np.exp(-np.arange(len(noise)) / (decay_seconds * data.SAMPLE_RATE))
    return noise / np.abs(noise).max() * dbfs(peak_dbfs)


def room_tone(wave, seconds):
    """The quietest stretch of this many seconds of a recording (none for 0 or None): the pause that joins it
    to the next one."""
    length = int((seconds or 0) * data.SAMPLE_RATE)
    if not length or length >= len(wave):
        return wave[:0]
    power = np.convolve(wave ** 2, np.ones(length), mode="valid")
    start = int(power[::data.HOP].argmin()) * data.HOP
    return wave[start:start + length]


def apply(wave, args, rng):
    """The waveform (float64, 16 kHz) under the condition the flags describe."""
    if args.speech_dbfs is not None:
        wave = wave / max(np.sqrt(np.mean(wave ** 2)), 1e-9) * dbfs(args.speech_dbfs)
    wave = wave * dbfs(args.gain_db)
    for peak, seconds, decay in ((args.click_dbfs, args.click_ms / 1000, None), (args.slam_dbfs, 0.5, 0.1)):
        if peak is not None:
            added = burst(rng, seconds, peak, decay)
            start = rng.integers(0, max(1, len(wave) - len(added)))
            wave = wave.copy()
            wave[start:start + len(added)] += added[:len(wave) - start]
    if args.pause:
        pause = np.zeros(int(args.pause * data.SAMPLE_RATE))
        before, after = [pause + rng.standard_normal(len(pause)) * dbfs(args.floor_dbfs)
                         if args.floor_dbfs is not None else pause for _ in range(2)]
        wave = np.concatenate([before, wave, after])
    return np.clip(wave, -1, 1 - 2 ** -23)  # what a recorder at full scale writes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", help="a LibriSpeech-layout folder or a TSV manifest")
    p.add_argument("out", type=Path, help="a new folder for the copies and their list.tsv")
    p.add_argument("--gain-db", type=float, default=0.0, help="scale by this (louder: clipped at full scale)")
    p.add_argument("--speech-dbfs", type=float, help="first scale each utterance to this RMS level")
    p.add_argument("--pause", type=float, default=0.0, metavar="SECONDS", help="before and after each")
    p.add_argument("--floor-dbfs", type=float, help="the pause holds white noise at this level (else zeros)")
    p.add_argument("--click-dbfs", type=float, help="add a burst of white noise with this peak")
    p.add_argument("--click-ms", type=float, default=20.0)
    p.add_argument("--slam-dbfs", type=float, help="add a knock: noise with this peak, decaying in 0.1 s")
    p.add_argument("--join", type=float, metavar="SECONDS", help="join each folder's utterances into one "
                   "recording, each followed by its quietest this many seconds")
    p.add_argument("--alphabet", metavar="FILE", help="the transcripts' alphabet, one symbol a line "
                   "(default: English's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        alphabet = data.read_alphabet(args.alphabet) if args.alphabet else data.ENGLISH
        corpus = data.read_corpus(args.corpus, alphabet, log=lambda line: print(line, file=sys.stderr))
        args.out.mkdir(parents=True, exist_ok=False)
    except data.InputError as e:
        sys.exit(f"error: {e}")
    except FileExistsError:
        sys.exit(f"error: {args.out} exists; name a new folder")
    groups = {}  # with --join, a folder's utterances (an AN4 speaker's, a LibriSpeech chapter's) in order
    for u in corpus:
        groups.setdefault(str(Path(u["path"]).parent) if args.join is not None else u["id"], []).append(u)
    lines = []
    for group in groups.values():
        waves = [data.load_usable_audio(u["path"])[0] for u in group]
        kept = [(u, wave.double().numpy()) for u, wave in zip(group, waves) if wave is not None]
        if not kept:
            continue
        utt_id, text = kept[0][0]["id"], " ".join(u["text"] for u, _ in kept)
        if args.join is not None:
            utt_id = f"{utt_id}-joined{len(kept)}"
        wave = np.concatenate([part for _, w in kept for part in (w, room_tone(w, args.join))])
        rng = np.random.default_rng([args.seed, zlib.crc32(utt_id.encode())])
        soundfile.write(args.out / f"{utt_id}.flac", apply(wave, args, rng), data.SAMPLE_RATE,
                        subtype="PCM_24")
        lines.append(f"{utt_id}.flac\t{text}\n")
    (args.out / "list.tsv").write_text("".join(lines), encoding="utf-8")
    print(f"{args.out}/list.tsv: {len(lines)} utterances", file=sys.stderr)


if __name__ == "__main__":
    main()
