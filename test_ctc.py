"""Tests for ctc-baseline. CPU only, no network: every corpus is generated here with numpy.

    pytest test_ctc.py
"""
import argparse
import dataclasses
import fcntl
import functools
import gzip
import hashlib
import http.server
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import create_word_dict

import ablation
import data
import runs
import decode
import download
import lm
import plot
import train
from model import BLANK, TIME_STRIDES, CTCModel, ModelConfig, greedy_decode, greedy_spans
from data import InputError
from runs import build_from_checkpoint, model_checkpoint

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
            for spans in decode.beam_search_spans(decoder, log_probs, lengths)]


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


# ---------------------------------------------------------------------- text and scoring
def test_vocabulary_has_blank_first_then_space_apostrophe_letters():
    assert data.VOCAB[BLANK] == data.VOCAB[0] and len(data.VOCAB) == 29
    assert data.VOCAB[1:3] == [" ", "'"] and "".join(data.VOCAB[3:]) == "abcdefghijklmnopqrstuvwxyz"


def test_normalize_lowercases_and_counts_what_it_drops():
    assert data.normalize("IT'S  Café-au-lait,\tno. 42!") == ("it's cafe au lait no", 5)
    assert data.normalize("Don\u2019t") == ("don't", 0)
    assert data.normalize("  ") == ("", 0)
    assert [data.VOCAB[i] for i in data.encode("it's a b")] == list("it's a b")


def test_greedy_collapses_repeats_but_keeps_a_double_letter_split_by_blank():
    h, e, l, o, b = (data.CHAR_TO_ID[c] for c in "helo_")
    frames = [[h, h, e, b, l, l, b, l, o, o, b], [l, b, l, l, o, b, b, b, b, h, h]]
    log_probs = torch.nn.functional.one_hot(torch.tensor(frames), len(data.VOCAB)).float().log()
    assert greedy_decode(log_probs, torch.tensor([11, 5])) == ["hello", "llo"]


def test_error_rates_are_corpus_level_edits_over_reference_length():
    assert data.edit_distance("kitten", "sitting") == 3
    assert data.edit_distance("", "abc") == 3 and data.edit_distance("abc", "abc") == 0
    assert data.edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    # 1 word edit in 4 words + 0 edits in 1 word = 20% (the mean of per-utterance WERs is 12.5%)
    wer, cer = data.error_rates(["a b c d", "e"], ["a x c d", "e"])
    assert wer == pytest.approx(20.0)
    assert cer == pytest.approx(100 * 1 / 8)


# ------------------------------------------------------------------------- corpus reading
def test_librispeech_reader_and_tsv_manifest_resample_and_downmix(tmp_path):
    ids = write_librispeech(tmp_path / "ls", ["abc", "ija"])
    # A TSV corpus with an 8 kHz 24-bit file, a 44.1 kHz stereo file and a relative path.
    (tmp_path / "tsv").mkdir()
    soundfile.write(tmp_path / "tsv/low.wav", tones("abc", 8000), 8000, subtype="PCM_24")
    stereo = np.stack([tones("dead", 44100), np.zeros(len(tones("dead", 44100)), np.float32)], 1)
    soundfile.write(tmp_path / "tsv/stereo.flac", stereo, 44100)
    (tmp_path / "tsv/list.tsv").write_text("low.wav\tLow!\n" + f"{tmp_path}/tsv/stereo.flac\tStereo?\n")
    corpus = data.read_corpus([tmp_path / "ls", tmp_path / "tsv/list.tsv"], log=lambda m: None)
    assert [u["id"] for u in corpus] == ids + ["low", "stereo"]
    assert [u["text"] for u in corpus] == ["abc", "ija", "low", "stereo"]
    low, stereo_wave = data.load_audio(corpus[2]["path"]), data.load_audio(corpus[3]["path"])
    assert low.dtype == torch.float32 and low.ndim == 1
    assert len(low) == pytest.approx(len(tones("abc")), abs=2)
    assert len(stereo_wave) == pytest.approx(len(tones("dead")), abs=2)
    assert stereo_wave.abs().max() == pytest.approx(0.15, abs=0.01)  # averaged with silence
    # The 8 kHz file resampled to 16 kHz still carries the 300 Hz tone of "a" at the right rate.
    spectrum = np.abs(np.fft.rfft(low[480:480 + 1440].numpy()))
    assert np.fft.rfftfreq(1440, 1 / 16000)[spectrum.argmax()] == pytest.approx(300, abs=15)
    assert corpus[0]["seconds"] == pytest.approx(len(tones("abc")) / 16000)


def test_durations_are_cached_between_starts(tmp_path, monkeypatch):
    write_librispeech(tmp_path / "ls", ["abc", "de"])
    data.read_corpus([tmp_path / "ls"], log=lambda m: None)
    monkeypatch.setattr(soundfile, "info", lambda path: pytest.fail(f"header reread: {path}"))
    assert len(data.read_corpus([tmp_path / "ls"], log=lambda m: None)) == 2


# ---------------------------------------------------------------------------------- model
@pytest.mark.parametrize("stride", sorted(TIME_STRIDES))
def test_output_lengths_match_real_tensor_shapes(stride):
    model = CTCModel(ModelConfig(time_stride=stride, rnn_layers=1, rnn_hidden=8, conv_channels=2)).eval()
    for samples in [400, 401, 559, 560, 561, 719, 1234, 1600, 3999, 16000, 16161, 23457]:
        log_probs, out_lengths = model(torch.randn(1, samples), torch.tensor([samples]))
        from_arithmetic = model.output_lengths(torch.tensor([samples]))[0]
        assert log_probs.shape[1] == out_lengths[0] == from_arithmetic, samples


def test_an_utterance_gets_the_same_log_probs_alone_and_in_a_padded_batch():
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(rnn_layers=2, rnn_hidden=16, conv_channels=4)).eval()
    lengths = torch.tensor([5000, 16000, 9001])
    waves = torch.randn(3, 16000) * (torch.arange(16000)[None, :] < lengths[:, None])
    batch_log_probs, batch_lengths = model(waves, lengths)
    for i in range(3):
        alone, alone_lengths = model(waves[i:i + 1, :lengths[i]], lengths[i:i + 1])
        assert alone_lengths[0] == batch_lengths[i]
        torch.testing.assert_close(alone[0], batch_log_probs[i, :batch_lengths[i]], atol=1e-5, rtol=1e-5)


def test_spec_augment_only_in_training():
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2, dropout=0.0))
    wave, length = torch.randn(1, 32000), torch.tensor([32000])
    model.eval()
    torch.testing.assert_close(model(wave, length)[0], model(wave, length)[0])
    model.train()
    assert not torch.equal(model(wave, length)[0], model(wave, length)[0])


def test_speed_perturbation_plays_a_batch_faster_or_slower_and_its_lengths_follow(monkeypatch):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2, speed_perturb=True,
                                 freq_warp=0.0, freq_masks=0, time_masks=0))
    t = np.arange(16000) / 16000
    waves = torch.from_numpy(np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 500 * t)])).float()
    waves[1, 12000:] = 0
    lengths = torch.tensor([16000, 12000])
    for speed in (0.9, 1.1):
        monkeypatch.setattr("model.SPEEDS", (speed,))
        faster, new_lengths = model.perturb_speed(waves, lengths)
        assert new_lengths.tolist() == [int(np.ceil(16000 / speed)), int(np.ceil(12000 / speed))]
        assert faster.shape[1] == new_lengths[0]
        peak_hz = np.argmax(np.abs(np.fft.rfft(faster[0].numpy()))) * 16000 / faster.shape[1]
        assert peak_hz == pytest.approx(1000 * speed, abs=2)  # tempo and pitch move together
        model.train()
        log_probs, out_lengths = model(waves, lengths)
        assert torch.equal(out_lengths, model.output_lengths(new_lengths))
        assert log_probs.shape[1] == out_lengths.max()
        model.eval()  # decoding is never perturbed
        assert torch.equal(model(waves, lengths)[1], model.output_lengths(lengths))


def test_frequency_warp_moves_tones_as_a_scaled_vocal_tract_would():
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    t = torch.arange(16000) / data.SAMPLE_RATE

    def log_mel(*hz):  # (1, T, n_mels), before the per-bin normalization that would flatten a steady tone
        wave = sum(torch.sin(2 * torch.pi * f * t) for f in hz)[None]
        return torch.log(model.mel(wave) + 1e-6).transpose(1, 2)

    def peak_bin(features, bins=slice(None)):
        return int(features[0].mean(0)[bins].argmax())

    for hz, factor in [(1000, 1.2), (2500, 0.85), (500, 1.1)]:
        warped = model.warp_frequencies(log_mel(hz), torch.tensor([[factor]]))
        assert abs(peak_bin(warped) - peak_bin(log_mel(hz * factor))) <= 1
        assert abs(peak_bin(warped) - peak_bin(log_mel(hz))) >= 2
    # A factor per bin moves each region by its own: here a low tone down and a high tone up.
    curve = torch.where(torch.arange(model.config.n_mels) < 40, 0.85, 1.15)[None]
    warped = model.warp_frequencies(log_mel(500, 4000), curve)
    for hz, factor, bins in [(500, 0.85, slice(0, 40)), (4000, 1.15, slice(40, None))]:
        assert abs(peak_bin(warped, bins) - peak_bin(log_mel(hz * factor), bins)) <= 1
        assert abs(peak_bin(warped, bins) - peak_bin(log_mel(hz), bins)) >= 2


def test_checkpoint_round_trip_rebuilds_an_identical_model(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=2, rnn_hidden=16, conv_channels=4)).eval()
    runs.save_checkpoint({**model_checkpoint(model, data.VOCAB), "note": [1, "x"]}, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)  # plain types and tensors only
    rebuilt, _ = build_from_checkpoint(tmp_path / "m.pt")
    wave = torch.randn(2, 12000)
    lengths = torch.tensor([12000, 8000])
    torch.testing.assert_close(rebuilt.eval()(wave, lengths)[0], model(wave, lengths)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------- training
def test_resume_continues_model_optimizer_schedule_and_data_order_exactly(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 40, 6)
    flags = ["--epochs", "2", "--eval-every", "4", "--freq-warp", "0.1", "--freq-masks", "1",
             "--time-masks", "1",
             "--rnn-layers", "2"]
    trace = []  # (lr, utterance ids) per step
    real_lr, real_collate = train.learning_rate, data.collate
    monkeypatch.setattr(data, "collate",
                        lambda items: trace.append([it[3] for it in items]) or real_collate(items))

    def lr_then_maybe_interrupt(step, total, args):
        if interrupt_at == step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, in the middle of the run
        trace.append(real_lr(step, total, args))
        return trace[-1]
    monkeypatch.setattr(train, "learning_rate", lr_then_maybe_interrupt)

    interrupt_at = None
    train.train(train_flags(train_dir, dev_dir, tmp_path / "straight", *flags))
    straight, trace[:] = list(trace), []
    interrupt_at = 5
    with pytest.raises(train.Stopped):  # not a finished run: a caller such as ablation.py must know
        train.train(train_flags(train_dir, dev_dir, tmp_path / "split", *flags))
    stopped = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert stopped["step"] == 6 and stopped["epoch"] == 0
    interrupt_at = None
    # A flag that changes only how often it logs may be given (a flag that changes the run may not).
    train.train(["--resume", str(tmp_path / "split/last.pt"), "--log-every", "3"])
    # Each step's lr, then its batch: the same sequence straight and across the resume
    # (dev batches included, since evaluation happens at the same steps).
    assert trace == straight
    a = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for weights in ("model", "trained_model"):  # the moving average (the default) and what AdamW trains
        for name in a[weights]:
            torch.testing.assert_close(a[weights][name], b[weights][name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], atol=1e-6, rtol=1e-5)


def test_the_moving_average_is_what_is_evaluated_saved_and_decoded(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 20, 4)
    flags = train_flags(train_dir, dev_dir, tmp_path / "run", "--ema-decay", "0.5", "--max-minutes", "1e-9")
    average = train.train(flags)  # one step
    # Weights that require grad get their bf16 casts cached: a CPU GRU's evaluation is 3.6x faster.
    assert all(p.requires_grad for p in average.parameters())
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = CTCModel(train.model_config(train.build_parser().parse_args(flags))).state_dict()
    last = torch.load(tmp_path / "run/last.pt", weights_only=True)
    trained = last["trained_model"]
    assert any(not torch.equal(initial[name], trained[name]) for name in trained)
    # After step 0 the average's decay is min(0.5, 1 / 10): early weights are soon forgotten.
    for name, value in last["model"].items():
        torch.testing.assert_close(value, torch.lerp(initial[name], trained[name], 0.9))
    best = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert all(torch.equal(best["model"][name], last["model"][name]) for name in last["model"])
    # The dev WER logged is the average's, and decoding a checkpoint uses the average.
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    model, _ = build_from_checkpoint(tmp_path / "run/best.pt")
    paths = sorted(dev_dir.rglob("*.flac"))
    hyps = [text for text, _ in decode.transcribe(model.eval(), [data.load_audio(p) for p in paths],
                                                  torch.device("cpu"), 60, 30)]
    refs = [line.split(" ", 1)[1].strip().lower() for line in next(dev_dir.rglob("*.trans.txt")).open()]
    assert logged[-1]["dev_wer"] == pytest.approx(data.error_rates(refs, hyps)[0])


def test_best_pt_has_the_best_dev_wer_and_a_tie_goes_to_the_better_cer(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    # Scripted dev scores (WER, CER) for the evaluations, then worse ones.
    scores = iter([(60.0, 30.0), (50.0, 30.0), (50.0, 20.0), (50.0, 25.0), (55.0, 10.0)])
    monkeypatch.setattr(data, "error_rates", lambda refs, hyps: next(scores, (90.0, 90.0)))
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "3", "--eval-every", "1"))
    evaluations = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in evaluations if "dev_wer" in r]
    assert len(evaluations) >= 5
    best = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert (best["step"], best["best_wer"], best["best_cer"]) == (evaluations[2]["step"], 50.0, 20.0)


def test_train_and_decode_end_to_end_as_the_user_runs_them(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 30, 5)
    result = run_script("train.py", *train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1",
                                                 "--eval-every", "2"))
    assert result.returncode == 0, result.stderr
    assert "dev WER" in result.stdout and "blank" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = {"loss", "lr", "grad_norm", "x_realtime", "blank_share", "data_wait", "peak_memory_gb"}
    assert any(logged <= m.keys() for m in metrics)
    assert all(0.05 < m["peak_memory_gb"] < 24 for m in metrics if "loss" in m)  # GB, not KiB or bytes
    assert any("dev_cer" in m for m in metrics)
    checkpoint = torch.load(tmp_path / "run/best.pt", weights_only=True)
    assert checkpoint["train_config"]["rnn_hidden"] == 32 and checkpoint["vocab"] == data.VOCAB

    one = run_script("decode.py", tmp_path / "run/best.pt", dev_dir / "2/198/2-198-0000.flac")
    assert one.returncode == 0, one.stderr
    assert len(one.stdout.splitlines()) == 1 and "\t" not in one.stdout
    many = run_script("decode.py", tmp_path / "run/best.pt", dev_dir)
    assert many.returncode == 0, many.stderr
    lines = [line.split("\t") for line in many.stdout.splitlines()]
    assert [utt for utt, _ in lines] == [f"2-198-{i:04d}" for i in range(5)]
    assert "WER" in many.stderr and "CER" in many.stderr

    built = run_script("lm.py", "build", train_dir, "--out", tmp_path / "train.arpa")
    assert built.returncode == 0, built.stderr
    beam = run_script("decode.py", tmp_path / "run/best.pt", dev_dir, "--lm", tmp_path / "train.arpa")
    assert beam.returncode == 0, beam.stderr
    known = {gram[0] for gram in read_arpa(tmp_path / "train.arpa")}
    assert all(w in known for line in beam.stdout.splitlines() for w in line.split("\t")[1].split())
    assert len(beam.stdout.splitlines()) == 5 and "WER" in beam.stderr


def test_decode_scores_equal_an_independent_scorer():
    rng = np.random.default_rng(1)
    words = ["a", "the", "cat", "sat", "on", "mat", "it's"]
    refs = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(50)]
    hyps = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(50)]
    wer, cer = data.error_rates(refs, hyps)
    word_edits = sum(independent_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    char_edits = sum(independent_distance(r, h) for r, h in zip(refs, hyps))
    assert wer == pytest.approx(100 * word_edits / sum(len(r.split()) for r in refs))
    assert cer == pytest.approx(100 * char_edits / sum(len(r) for r in refs))


@pytest.mark.parametrize("precision", ["--bf16", "--no-bf16"])
def test_a_small_model_learns_to_read_tone_bursts(tmp_path, precision):
    """The learning test: a working CTC pipeline masters this task in about a minute of CPU,
    training under bf16 autocast (the default on CUDA and on CPUs with bf16) or in float32."""
    train_dir, dev_dir = make_corpus(tmp_path, 300, 30)
    rng = np.random.default_rng(7)
    test_texts = [random_text(rng) for _ in range(40)]
    test_dir = tmp_path / "test"
    write_librispeech(test_dir, test_texts, speaker=3)
    train.train(["--data", str(train_dir), "--dev", str(dev_dir), "--run-dir", str(tmp_path / "run"),
                "--rnn-layers", "2", "--rnn-hidden", "64", "--conv-channels", "8", "--workers", "0",
                "--freq-warp", "0", "--freq-masks", "0", "--time-masks", "0", "--batch-seconds", "8",
                "--epochs", "4",
                "--lr", "3e-3", "--warmup-steps", "30", "--eval-every", "50", "--log-every", "50", precision])
    model, _ = build_from_checkpoint(tmp_path / "run/best.pt")
    waves = [data.load_audio(p) for p in sorted(test_dir.rglob("*.flac"))]
    hyps = [text for text, _ in decode.transcribe(model.eval(), waves, torch.device("cpu"), 60, 30)]
    assert data.error_rates(test_texts, hyps)[1] < 10.0, list(zip(test_texts, hyps))[:5]
    # A recording longer than a chunk is cut in pauses, decoded piece by piece, joined in order.
    long_wave = torch.cat(waves[:12])
    joined = decode.transcribe(model, [long_wave], torch.device("cpu"), 60, chunk_seconds=3.0)[0][0]
    assert data.error_rates(["".join(test_texts[:12])], [joined.replace(" ", "")])[1] < 10.0


# --------------------------------------------------------- bad input and interruptions
def test_missing_or_empty_data_paths_exit_naming_the_path_and_layouts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _, dev_dir = make_corpus(tmp_path, 1, 2)
    for bad in [tmp_path / "nowhere", tmp_path / "empty"]:
        with pytest.raises(InputError) as exit_info:
            train.train(["--data", str(bad), "--dev", str(dev_dir), "--run-dir", str(tmp_path / "run"),
                         *TINY])
        assert str(bad) in str(exit_info.value) and "LibriSpeech-layout" in str(exit_info.value)
        assert "TSV manifest" in str(exit_info.value)


def test_bad_files_are_skipped_counted_and_named_and_training_goes_on(tmp_path, capsys):
    rng = np.random.default_rng(3)
    train_dir, dev_dir = make_corpus(tmp_path, 20, 3)
    folder = train_dir / "5" / "50"
    folder.mkdir(parents=True)
    soundfile.write(folder / "5-50-0000.flac", tones("abc"), 16000)
    good = (folder / "5-50-0000.flac").read_bytes()
    (folder / "5-50-0001.flac").write_bytes(good[:len(good) // 2])              # truncated body
    (folder / "5-50-0002.flac").write_bytes(b"this is not audio at all")
    soundfile.write(folder / "5-50-0003.flac", np.zeros(0, np.float32), 16000)   # libsndfile: unreadable
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)      # zero length
    soundfile.write(tmp_path / "fine.wav", tones("abc"), 16000)
    (tmp_path / "more.tsv").write_text("empty.wav\tABC\nfine.wav\tABC\n")
    soundfile.write(folder / "5-50-0004.flac", np.zeros(16000, np.float32), 16000)  # silent
    soundfile.write(folder / "5-50-0005.flac", tones("ab"), 16000)               # empty transcript
    soundfile.write(folder / "5-50-0006.flac", tones("a"), 16000)                # transcript too long
    soundfile.write(folder / "5-50-0007.flac", tones(random_text(rng) * 8), 16000)  # over --max-seconds
    soundfile.write(folder / "5-50-0099.flac", tones("abc"), 16000)              # no transcript line
    (folder / "5-50.trans.txt").write_text(
        "5-50-0000 ABC #$% ÀB\n5-50-0001 ABC\n5-50-0002 ABC\n5-50-0003 ABC\n5-50-0004 ABC\n"
        "5-50-0005 %% ...\n5-50-0006 " + "ABCDEFGHIJ" * 8 + "\n5-50-0007 ABCD\n5-50-0008 ABC\n")
    flags = train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--max-seconds", "5",
                        "--eval-every", "100")
    train.train([*flags, "--data", str(train_dir), str(tmp_path / "more.tsv")])
    out = capsys.readouterr()
    assert "audio file missing (or not a regular file): 1" in out.out and "5-50-0008.flac" in out.out
    assert "audio without transcript (ignored): 1" in out.out and "5-50-0099.flac" in out.out
    assert "not readable as audio: 2" in out.out and "5-50-0002.flac" in out.out
    assert "zero-length audio: 1" in out.out and "empty.wav" in out.out
    assert "empty transcript: 1" in out.out
    assert "characters dropped by normalization: 8" in out.out
    assert "skipped 1 utterances longer than --max-seconds 5.0 and 1 whose transcript is too long" in out.out
    # Broken or silent bodies are only found when read: named once per read, training goes on.
    assert "5-50-0001.flac" in out.err and data.SILENT in out.err and "5-50-0004.flac" in out.err
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 2


def test_a_run_folder_that_holds_a_run_is_refused_and_a_live_run_locks_its_folder(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    flags = train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--eval-every", "100")
    train.train(flags)
    before = {p: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix != ".lock"}
    with pytest.raises(InputError) as again:  # say, --resume forgotten: the run is kept, not replaced
        train.train(flags)
    assert "already holds a run" in str(again.value)
    assert f"--resume {tmp_path / 'run/last.pt'}" in str(again.value)
    assert {p: p.read_bytes() for p in before} == before
    # A folder locked by a live process is refused, naming it; once that process is gone (even by
    # kill -9, which releases the lock), the same folder can be used.
    (tmp_path / "live").mkdir()
    with open(tmp_path / "live/train.lock", "w") as held:
        held.write("pid 4242 on elsewhere\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError) as busy:
            train.train(train_flags(train_dir, dev_dir, tmp_path / "live", "--epochs", "1"))
        assert "in use by another training process (pid 4242 on elsewhere" in str(busy.value)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "live", "--epochs", "1", "--eval-every", "100"))
    assert (tmp_path / "live/last.pt").exists()
    # Default names never collide, even for runs started in the same second.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "runs/20260101-000000")
    names = []
    for _ in range(3):
        args = argparse.Namespace(run_dir=None)
        runs.claim_run_dir(args, None).close()
        names.append(args.run_dir)
    assert names == ["runs/20260101-000000", "runs/20260101-000000-2", "runs/20260101-000000-3"]


def test_flags_are_checked_before_any_work_and_resume_refuses_what_was_typed(tmp_path, capsys):
    nowhere = ["--data", str(tmp_path / "nowhere"), "--dev", str(tmp_path / "nowhere")]
    for flag, value in [("--eval-every", "0"), ("--log-every", "0"), ("--save-every", "0"), ("--lr", "-1"),
                        ("--lr", "0"), ("--epochs", "0"), ("--workers", "-1"), ("--batch-seconds", "0"),
                        ("--dropout", "1"), ("--lr", "nan")]:
        with pytest.raises(SystemExit):
            train.train([*nowhere, flag, value])
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and value in err and "nowhere" not in err
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError) as unwritable:  # found before the data scan, which would fail
        train.train([*nowhere, "--run-dir", str(tmp_path / "file/run")])
    assert "cannot write there" in str(unwritable.value)
    # --resume refuses a typed flag even when its value is the parser's default.
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--lr", "3e-3",
                           "--eval-every", "100"))
    for flag, default in [("--epochs", "40"), ("--lr", "1.5e-3")]:
        with pytest.raises(InputError) as refused:
            train.train(["--resume", str(tmp_path / "run/last.pt"), flag, default])
        assert f"{flag} cannot change" in str(refused.value)


def test_a_batch_of_only_unusable_files_is_a_counted_skipped_step(tmp_path, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 20, 3)
    folder = train_dir / "6" / "60"
    folder.mkdir(parents=True)
    for i in range(10):  # the ten longest files, so they sort into one batch of their own
        soundfile.write(folder / f"6-60-{i:04d}.flac", np.zeros(10 * 16000, np.float32), 16000)
    (folder / "6-60.trans.txt").write_text("".join(f"6-60-{i:04d} ABC\n" for i in range(10)))
    soundfile.write(dev_dir / "2/198/2-198-0099.flac", tones("a")[:300], 16000)  # under 25 ms
    with open(dev_dir / "2/198/2-198.trans.txt", "a") as f:
        f.write("2-198-0099 A\n")
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--batch-seconds", "100",
                           "--eval-every", "1", "--log-every", "1"))
    out = capsys.readouterr().out
    assert "shorter than one analysis window (25 ms): 1" in out and "2-198-0099.flac" in out
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) == 2  # once per epoch
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 2
    assert data.collate([None, None]) is None


def test_unusable_audio_says_why_and_decode_skips_too_short_clips(tmp_path):
    soundfile.write(tmp_path / "nan.wav", np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    soundfile.write(tmp_path / "short.flac", tones("a")[:160], 16000)  # 10 ms
    problems = {name: data.load_usable_audio(tmp_path / name)[1]
                for name in ["nan.wav", "silent.wav", "short.flac"]}
    assert problems == {"nan.wav": "NaN or infinite samples", "silent.wav": data.SILENT,
                        "short.flac": data.TOO_SHORT}
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "m.pt")
    short = run_script("decode.py", tmp_path / "m.pt", tmp_path / "short.flac")
    assert short.returncode != 0 and "Traceback" not in short.stderr
    assert "short.flac" in short.stderr and "shorter than one analysis window" in short.stderr
    not_a_checkpoint = run_script("decode.py", tmp_path / "short.flac", tmp_path / "short.flac")
    assert not_a_checkpoint.returncode != 0 and "Traceback" not in not_a_checkpoint.stderr
    assert "not a checkpoint written by train.py" in not_a_checkpoint.stderr


def test_text_files_linked_folders_and_unreadable_folders(tmp_path, monkeypatch):
    write_librispeech(tmp_path / "real/7", ["abc", "de"], speaker=7)
    write_librispeech(tmp_path / "real/8", ["fg"], speaker=8)
    (tmp_path / "corpus/9").mkdir(parents=True)
    (tmp_path / "corpus/7").symlink_to(tmp_path / "real/7/7")      # linked speaker folders are read
    (tmp_path / "corpus/8").symlink_to(tmp_path / "real/8/8")
    (tmp_path / "real/7/7/198/loop").symlink_to(tmp_path / "corpus")  # and a loop is not followed
    sentences = lm.read_sentences([tmp_path / "corpus"])
    assert sorted(" ".join(words) for words in sentences) == ["abc", "de", "fg"]
    real_scandir, log = os.scandir, []

    def scandir(path="."):
        if str(path).endswith("/9"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    corpus = data.read_corpus([tmp_path / "corpus"], log=log.append)
    assert sorted(u["text"] for u in corpus) == ["abc", "de", "fg"]
    assert any("folder not readable: 1" in m and str(tmp_path / "corpus/9") in m for m in log)
    # Manifests: a byte-order mark is ignored; text that is not UTF-8 names its file and line.
    soundfile.write(tmp_path / "a.wav", tones("abc"), 16000)
    (tmp_path / "bom.tsv").write_text("\ufeffa.wav\tABC\n", encoding="utf-8")
    assert [u["text"] for u in data.read_corpus([tmp_path / "bom.tsv"], log=lambda m: None)] == ["abc"]
    (tmp_path / "latin1.tsv").write_bytes("a.wav\tABC\na.wav\tCAF\u00c9\n".encode("latin-1"))
    (tmp_path / "binary.tsv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for path, line in [(tmp_path / "latin1.tsv", 2), (tmp_path / "binary.tsv", 1)]:
        with pytest.raises(data.InputError) as error:
            data.read_corpus([path], log=lambda m: None)
        assert f"{path}:{line}: not UTF-8" in str(error.value)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(lines)
                                       + '{"step": 9, "lo')  # cut short by a kill -9
    runs.keep_metrics_until(5, run / "metrics.jsonl", run)
    kept = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2, 3, 4, 5]


def test_a_stop_on_an_evaluation_step_still_evaluates(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 30, 3)
    real_lr = train.learning_rate

    def interrupt_during_step_3(step, total, args):
        if step == 2:  # the third step, which ends in an evaluation (--eval-every 3)
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, total, args)
    monkeypatch.setattr(train, "learning_rate", interrupt_during_step_3)
    with pytest.raises(train.Stopped):
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "5", "--eval-every", "3"))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_cer" in r] == [3]
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 3
    assert (tmp_path / "run/best.pt").exists()


def test_non_finite_steps_are_skipped_and_a_diverged_run_stops_with_advice(tmp_path, monkeypatch, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 40, 3)
    real_forward, calls = torch.nn.CTCLoss.forward, []

    def sometimes_nan(self, *args):
        calls.append(1)
        loss = real_forward(self, *args)
        return loss * float("nan") if len(calls) % 3 == 0 or always_nan else loss
    monkeypatch.setattr(torch.nn.CTCLoss, "forward", sometimes_nan)
    always_nan = False
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "100"))
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in records) > 0
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 2
    always_nan = True
    capsys.readouterr()
    with pytest.raises(InputError) as diverged:
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run2", "--epochs", "3",
                                "--eval-every", "100"))
    assert f"{train.MAX_BAD_STEPS_IN_A_ROW + 1} steps in a row had a non-finite loss" in str(diverged.value)
    assert "Lower --lr" in str(diverged.value)


def test_out_of_memory_on_one_batch_skips_it_with_advice(tmp_path, monkeypatch, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 20, 3)
    real_forward, calls = CTCModel.forward, []

    def out_of_memory_once(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, *args)
    monkeypatch.setattr(CTCModel, "forward", out_of_memory_once)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--eval-every", "100"))
    out = capsys.readouterr().out
    assert "out of memory" in out and "--batch-seconds" in out
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 1


def test_ctrl_c_saves_last_checkpoint_and_prints_the_resume_command(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 200, 3)
    process = subprocess.Popen(
        [sys.executable, "train.py", *train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "50",
                                                  "--log-every", "1")],
        cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch 0 step 2/"):
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    # stopped, not finished: as the shell reports Ctrl-C
    assert process.returncode == 128 + signal.SIGINT, err
    assert "python train.py --resume" in out and str(tmp_path / "run/last.pt") in out
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] >= 2


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    runs.save_checkpoint({"step": 1}, path)

    def crash_midway(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        runs.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


def test_resume_refuses_missing_corrupt_or_incompatible_checkpoints_untouched(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--eval-every", "100"))
    good = torch.load(tmp_path / "run/last.pt", weights_only=True)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((tmp_path / "run/last.pt").read_bytes()[:1000])
    other_vocab, other_shape = tmp_path / "vocab/last.pt", tmp_path / "shape/last.pt"
    for path, change in [(other_vocab, {"vocab": data.VOCAB[:-1]}),
                         (other_shape, {"model_config": {**good["model_config"], "rnn_hidden": 64}})]:
        path.parent.mkdir()
        torch.save({**good, **change}, path)
    cases = [(tmp_path / "missing.pt", [], "no such file"), (corrupt, [], "not a readable"),
             (other_vocab, [], "vocabulary"), (other_shape, [], "model shape"),
             # A flag that would change the run is refused, not silently ignored.
             (tmp_path / "run/last.pt", ["--lr", "0.5", "--eval-every", "7"], "--lr cannot change")]
    files_before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for path, flags, problem in cases:
        with pytest.raises(InputError) as exit_info:
            train.train(["--resume", str(path), *flags])
        assert str(path) in str(exit_info.value) and problem in str(exit_info.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files_before


def test_decode_reports_each_bad_input_and_fails_only_if_nothing_decoded(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    checkpoint = tmp_path / "m.pt"
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), checkpoint)
    (tmp_path / "no_audio").mkdir()
    (tmp_path / "broken.flac").write_bytes(b"not audio")
    soundfile.write(tmp_path / "good.wav", tones("abc"), 16000)
    bad = [tmp_path / "missing.flac", tmp_path / "no_audio", tmp_path / "broken.flac"]
    result = run_script("decode.py", checkpoint, *bad)
    assert result.returncode != 0
    for path in bad:
        assert str(path) in result.stderr
    result = run_script("decode.py", checkpoint, *bad, tmp_path / "good.wav")
    assert result.returncode == 0 and result.stdout.startswith("good\t")


def test_a_ten_minute_recording_is_decoded_in_chunks_cut_at_pauses():
    bursts = [tones(random_text(np.random.default_rng(i))) for i in range(800)]
    minutes = torch.from_numpy(np.concatenate(bursts))
    assert len(minutes) > 10 * 60 * data.SAMPLE_RATE
    pieces = decode.split_chunks(minutes, 30.0)
    assert torch.equal(torch.cat(pieces), minutes)
    assert all(len(p) <= 30 * data.SAMPLE_RATE for p in pieces)
    assert all(float(p[-80:].abs().max()) < 0.01 for p in pieces[:-1])  # cut in a gap between bursts
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2)).eval()
    assert isinstance(decode.transcribe(model, [minutes], torch.device("cpu"), 120, 30.0)[0][0], str)
    # A piece under one 25 ms analysis window (say, cut just before the end) is not sent to the STFT.
    assert decode.transcribe(model, [torch.randn(300)], torch.device("cpu"), 120, 30.0) == [("", [])]


# ---------------------------------------------------------- beam search and language models
def test_an_lm_fixes_a_spelling_the_acoustics_alone_get_wrong(tmp_path):
    log_probs = letter_frames({"c": 0.9}, {}, {"o": 0.5, "a": 0.4}, {}, {"t": 0.9})
    lengths = torch.tensor([log_probs.shape[1]])
    assert greedy_decode(log_probs, lengths) == ["cot"]
    (tmp_path / "words.txt").write_text("cat\tc a t\ncot\tc o t\n")
    (tmp_path / "lm.arpa").write_text(tiny_arpa({"cat": -0.1, "cot": -2.0}))
    settings = {"beam_size": 10, "lm_weight": 1.0, "word_score": 0.0}
    lexicon_only = decode.build_beam_search(None, tmp_path / "words.txt", **settings)
    assert beam_texts(lexicon_only, log_probs, lengths) == ["cot"]
    with_lm = decode.build_beam_search(tmp_path / "lm.arpa", None, **settings)  # lexicon: the LM's words
    assert beam_texts(with_lm, log_probs, lengths) == ["cat"]


def test_lexicon_constrained_output_is_always_in_the_lexicon(tmp_path):
    torch.manual_seed(0)
    log_probs = (3 * torch.randn(6, 60, len(data.VOCAB))).log_softmax(-1)
    lengths = torch.tensor([60, 55, 50, 40, 30, 20])
    lexicon = {"a", "bad", "cab", "it's", "dead"}
    (tmp_path / "words.txt").write_text("".join(f"{w}\n" for w in sorted(lexicon)))
    decoder = decode.build_beam_search(None, tmp_path / "words.txt", 20, 1.0, 2.0)
    words = [w for text in beam_texts(decoder, log_probs, lengths) for w in text.split()]
    assert words and set(words) <= lexicon
    greedy = {w for text in greedy_decode(log_probs, lengths) for w in text.split()}
    assert greedy - lexicon  # unconstrained, the same frames spell other words


def test_an_lm_built_from_text_loads_in_kenlm_sums_to_one_and_scores_as_kenlm_does(tmp_path):
    (tmp_path / "corpus/7/1").mkdir(parents=True)
    (tmp_path / "corpus/7/1/7-1.trans.txt").write_text("7-1-0 ABC\n7-1-1 ABC DE\n7-1-2 DE ABC FG\n")
    (tmp_path / "more.tsv").write_text("# audio\ttranscript\nx.flac\tDe fg, ABC!\n")
    (tmp_path / "book.txt").write_text("fg de abc de\n\nabc fg\n")
    out = tmp_path / "lm.arpa"
    texts = [str(tmp_path / name) for name in ("corpus", "more.tsv", "book.txt")]
    lm.main(["build", *texts, "--out", str(out), "--order", "3"])
    assert (tmp_path / "lm.lexicon.txt").read_text() == "abc\ta b c\nde\td e\nfg\tf g\n"
    model = read_arpa(out)
    vocabulary = ["abc", "de", "fg", "</s>", "<unk>"]
    assert {g[0] for g in model if len(g) == 1} == {*vocabulary, "<s>"} and max(map(len, model)) == 3
    for history in [(), *(g for g in model if len(g) < 3 and g[-1] != "</s>")]:
        total = sum(10 ** arpa_log10(model, history, w) for w in vocabulary)
        assert total == pytest.approx(1, abs=1e-5), history
    # KenLM reads the file and gives every word of a sentence the probability computed here.
    words = create_word_dict({w: [[w]] for w in vocabulary})
    kenlm = KenLM(str(out), words)
    state, history = kenlm.start(False), ("<s>",)
    for word in ["fg", "fg", "abc", "<unk>", "de", "</s>"]:
        state, score = kenlm.finish(state) if word == "</s>" else kenlm.score(state, words.get_index(word))
        assert score == pytest.approx(arpa_log10(model, history[-2:], word), abs=1e-4), word
        history += (word,)
    with pytest.raises(SystemExit) as exists:  # an existing file is never overwritten
        lm.main(["build", str(tmp_path / "book.txt"), "--out", str(out)])
    assert str(out) in str(exists.value) and read_arpa(out) == model


def test_lm_build_vocab_adds_the_words_the_text_lacks_at_the_unknown_words_probability(tmp_path):
    (tmp_path / "book.txt").write_text("fg de abc de\nabc fg\n")
    (tmp_path / "vocab.txt").write_text("ABC\nGH\nI'D\n")  # a word list as LibriSpeech's: upper case
    out = tmp_path / "lm.arpa"
    lm.main(["build", str(tmp_path / "book.txt"), "--vocab", str(tmp_path / "vocab.txt"), "--out", str(out)])
    assert (tmp_path / "lm.lexicon.txt").read_text() == "abc\ta b c\nde\td e\nfg\tf g\ngh\tg h\ni'd\ti ' d\n"
    model = read_arpa(out)
    vocabulary = ["abc", "de", "fg", "gh", "i'd", "</s>", "<unk>"]
    for history in [(), *(g for g in model if len(g) < 3 and g[-1] != "</s>")]:
        total = sum(10 ** arpa_log10(model, history, w) for w in vocabulary)
        assert total == pytest.approx(1, abs=1e-5), history
    assert arpa_log10(model, ("abc",), "gh") == arpa_log10(model, ("abc",), "<unk>") < arpa_log10(
        model, ("abc",), "de")


def test_a_bad_lm_or_lexicon_is_named_before_any_audio_is_decoded(tmp_path, capsys):
    short = tiny_arpa({"abc": -1}).replace("ngram 1=4", "ngram 1=5")  # one unigram fewer than it says
    files = {"empty.arpa": "", "words.arpa": "hello world\n", "short.arpa": short,
             "empty.txt": "\n", "digits.txt": "123\n42 x\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.lm").write_bytes(b"mmap lm http://kheafield.com/code format version 5\0")
    cases = [("--lm", "missing.arpa", "No such file"), ("--lm", "empty.arpa", "is empty"),
             ("--lm", "words.arpa", "expected an ARPA file"), ("--lm", "short.arpa", "KenLM cannot load it"),
             ("--lm", "binary.lm", "pass the words it may output with --lexicon"),
             ("--lexicon", "missing.txt", "No such file"), ("--lexicon", "empty.txt", "holds no words"),
             ("--lexicon", "digits.txt", "holds no words")]
    for flag, name, problem in cases:
        # The checkpoint and audio do not exist: the LM and lexicon are checked before either is read.
        with pytest.raises(SystemExit) as failed:
            decode.main([str(tmp_path / "missing.pt"), "missing.flac", flag, str(tmp_path / name)])
        assert str(tmp_path / name) in str(failed.value) and problem in str(failed.value), name
    with pytest.raises(SystemExit):
        decode.main([str(tmp_path / "missing.pt"), "x.flac", "--lm-weight", "2"])  # beam flags need --lm
    assert "need --lm or --lexicon" in capsys.readouterr().err


# ------------------------------------------------------------------ scale and download
def test_two_ranks_with_gloo_end_with_identical_weights_and_one_checkpoint(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 30, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "3")
    torch.multiprocessing.spawn(train_one_rank, args=(flags, port, tmp_path), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.weights", weights_only=True) for r in (0, 1))
    initial = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=32, conv_channels=4)).state_dict()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0)
    assert any(not torch.equal(rank0[n], initial[n]) for n in rank0)
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == ["best.pt", "last.pt", "metrics.jsonl", "train.lock"]
    # Each rank took its own half of every epoch's batches: the steps are half the batches.
    seconds = [u["seconds"] for u in data.read_corpus([train_dir], log=lambda m: None)]
    sampler = data.BucketBatches(seconds, 6.0, world_size=2)
    assert len(sampler) == len(data.BucketBatches(seconds, 6.0)) // 2
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 2 * len(sampler)


def test_batches_are_split_across_ranks_without_duplicates():
    seconds = list(np.random.default_rng(0).uniform(1, 15, 500))
    ranks = [data.BucketBatches(seconds, 60, seed=3, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(4)
    taken = [i for sampler in ranks for batch in sampler for i in batch]
    assert len(taken) == len(set(taken)) and len({len(list(s)) for s in ranks}) == 1
    single = data.BucketBatches(seconds, 60, seed=3)
    assert sorted(i for b in single for i in b) == list(range(500))
    assert all(sum(1 for _ in b) * max(seconds[i] for i in b) <= 60 for b in single if len(b) > 1)


def test_download_resumes_verifies_md5_extracts_and_skips_present_subsets(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_librispeech(source / "LibriSpeech" / "dev-clean", ["abc", "de"])
    (source / "LibriSpeech" / "README.TXT").write_text("LibriSpeech stand-in\n")
    with tarfile.open(tmp_path / "dev-clean.tar.gz", "w:gz") as tar:
        tar.add(source / "LibriSpeech", arcname="LibriSpeech")
    archive = (tmp_path / "dev-clean.tar.gz").read_bytes()
    server = ArchiveServer({"dev-clean.tar.gz": archive})
    root = tmp_path / "root"
    command = ["download.py", "dev-clean", "--root", root, "--base-url", server.url]
    # The archive is not OpenSLR's, so the published MD5 refuses it, after a complete download.
    refused = run_script(*command)
    assert refused.returncode != 0 and download.PUBLISHED_MD5["dev-clean"][1] in refused.stderr
    assert not list(root.iterdir())
    monkeypatch.setattr(download, "PUBLISHED_MD5", {**download.PUBLISHED_MD5,
                                                    "dev-clean": (12, hashlib.md5(archive).hexdigest())})
    server.ranges.clear()
    server.cut_after = len(archive) // 2
    with pytest.raises(SystemExit) as cut:
        download.main(list(map(str, command[1:])))
    assert "Run the same command again" in str(cut.value)
    assert not (root / "LibriSpeech").exists()
    download.main(list(map(str, command[1:])))
    assert server.ranges == [0, len(archive) // 2]  # the second request continued the first
    corpus = data.read_corpus([root / "LibriSpeech" / "dev-clean"], log=lambda m: None)
    assert [u["text"] for u in corpus] == ["abc", "de"]
    assert (root / "LibriSpeech" / "README.TXT").exists() and not list(root.glob("*.part"))
    again = run_script(*command)
    assert again.returncode == 0 and "already there" in again.stderr and len(server.ranges) == 2

    # A mirror that serves a tampered archive with its own matching md5sum.txt: still refused.
    tampered = archive[:-1] + bytes([archive[-1] ^ 1])
    server.files.update({"dev-clean.tar.gz": tampered,
                         "md5sum.txt": f"{hashlib.md5(tampered).hexdigest()} dev-clean.tar.gz\n".encode()})
    other = tmp_path / "other"
    with pytest.raises(SystemExit) as bad:
        download.main(["dev-clean", "--root", str(other), "--base-url", server.url])
    assert "MD5" in str(bad.value) and "nothing was extracted" in str(bad.value)
    assert not (other / "LibriSpeech").exists() and not list(other.iterdir())


@pytest.mark.parametrize("subset", ["train-clean-5", "dev-clean-2"])
def test_mini_librispeech_comes_from_openslr_31_and_only_with_its_published_md5(tmp_path, monkeypatch,
                                                                               subset):
    root, urls = tmp_path / "root", []

    def unreachable(url, target):
        urls.append(url)
        raise OSError("no network")
    with monkeypatch.context() as offline:
        offline.setattr(download, "fetch", unreachable)
        with pytest.raises(SystemExit):
            download.main([subset, "--root", str(root)])
    assert urls == [f"https://www.openslr.org/resources/31/{subset}.tar.gz"]
    (root / f"{subset}.tar.gz.part").unlink(missing_ok=True)
    write_librispeech(tmp_path / "src/LibriSpeech" / subset, ["abc", "de"])
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src/LibriSpeech", arcname="LibriSpeech")
    archive = (tmp_path / "a.tar.gz").read_bytes()
    server = ArchiveServer({f"{subset}.tar.gz": archive})
    command = [subset, "--root", str(root), "--base-url", server.url]
    with pytest.raises(SystemExit) as refused:  # built here, so not OpenSLR's archive
        download.main(command)
    assert download.PUBLISHED_MD5[subset][1] in str(refused.value) and not list(root.iterdir())
    monkeypatch.setattr(download, "PUBLISHED_MD5", {**download.PUBLISHED_MD5,
                                                    subset: (31, hashlib.md5(archive).hexdigest())})
    for bad in (archive[:len(archive) // 2], archive[:-1] + bytes([archive[-1] ^ 1])):  # truncated, tampered
        server.files[f"{subset}.tar.gz"] = bad
        with pytest.raises(SystemExit) as refused:
            download.main(command)
        assert "MD5" in str(refused.value) and not list(root.iterdir())
    server.files[f"{subset}.tar.gz"] = archive
    download.main(command)
    corpus = data.read_corpus([root / "LibriSpeech" / subset], log=lambda m: None)
    assert [u["text"] for u in corpus] == ["abc", "de"]


def test_a_mirror_that_is_unreachable_or_a_root_that_cannot_be_written_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_script("download.py", "dev-clean", "--root", tmp_path / "root", "--base-url", closed)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{closed}/dev-clean.tar.gz" in result.stderr and "Run the same command again" in result.stderr
    (tmp_path / "file").write_text("")
    result = run_script("download.py", "an4", "--root", tmp_path / "file/root", "--base-url", closed)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--root" in result.stderr and "cannot write there" in result.stderr
    assert "continues" not in result.stderr


def test_download_an4_writes_librispeech_layout_splits_by_speaker_and_resumes(tmp_path, monkeypatch):
    archive, samples = an4_archive(tmp_path)
    server = ArchiveServer({download.AN4_ARCHIVE: archive})
    command = ["an4", "--root", str(tmp_path / "root"), "--base-url", server.url]
    # The fake is not CMU's AN4 (6 utterances, not 948 + 130): refused, nothing left behind.
    with pytest.raises(SystemExit) as refused:
        download.main(command)
    assert "it is not CMU's AN4" in str(refused.value) and not list((tmp_path / "root").iterdir())

    monkeypatch.setattr(download, "AN4_UTTERANCES", {"train": 4, "test": 2})
    monkeypatch.setattr(download, "AN4_TEST_WORDS", 8)
    monkeypatch.setattr(download, "AN4_SHA256", download.an4_digest(tmp_path / "an4src/an4"))
    listing = tmp_path / "an4src/an4/etc/an4_train.transcription"
    listing.write_text(listing.read_text().replace("<s> YES </s>", "<s> NO </s>"))  # same counts, one word
    with tarfile.open(tmp_path / "edited.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "an4src/an4", arcname="an4")
    edited = ArchiveServer({download.AN4_ARCHIVE: (tmp_path / "edited.tar.gz").read_bytes()})
    with pytest.raises(SystemExit) as refused:
        download.main(["an4", "--root", str(tmp_path / "root"), "--base-url", edited.url])
    assert "differ from CMU's AN4" in str(refused.value) and not list((tmp_path / "root").iterdir())
    server.cut_after = len(archive) // 3
    with pytest.raises(SystemExit) as cut:
        download.main(command)
    assert "Run the same command again" in str(cut.value) and not (tmp_path / "root/AN4").exists()
    download.main(command)
    assert server.ranges[-2:] == [0, len(archive) // 3]  # the second request continued the first
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["AN4"]

    splits = {split: data.read_corpus([tmp_path / "root/AN4" / split], log=lambda m: None)
              for split in ("train", "dev", "test")}
    texts = {u["id"]: u["text"] for corpus in splits.values() for u in corpus}
    assert texts == {"an251-fash-b": "yes", "cen1-fash-b": "p i t t s b u r g h",
                     "an11-mblb-b": "enter six two",
                     f"an7-{download.AN4_DEV_SPEAKERS[0]}-b": "rubout",
                     "an406-fcaw-b": "rubout g m e f three nine", "cen4-mjwl-b": "fifty"}
    speakers = {split: {u["id"].split("-")[1] for u in corpus} for split, corpus in splits.items()}
    assert speakers == {"train": {"fash", "mblb"}, "dev": {download.AN4_DEV_SPEAKERS[0]},
                        "test": {"fcaw", "mjwl"}}
    for corpus in splits.values():
        for u in corpus:  # lossless: the FLAC holds exactly the raw file's samples, at 16 kHz
            flac, rate = soundfile.read(u["path"], dtype="int16")
            assert rate == 16000 and np.array_equal(flac, samples[u["id"]])
            assert u["seconds"] == pytest.approx(len(samples[u["id"]]) / 16000)
    again = run_script("download.py", *command)
    assert again.returncode == 0 and "already there" in again.stderr


def test_a_truncated_an4_archive_is_removed_and_nothing_is_half_written(tmp_path, monkeypatch):
    archive, _ = an4_archive(tmp_path)
    server = ArchiveServer({download.AN4_ARCHIVE: archive[:len(archive) * 2 // 3]})  # complete as HTTP goes
    monkeypatch.setattr(download, "AN4_UTTERANCES", {"train": 4, "test": 2})
    with pytest.raises(SystemExit) as failed:
        download.main(["an4", "--root", str(tmp_path / "root"), "--base-url", server.url])
    assert "cannot be extracted" in str(failed.value) and "download it anew" in str(failed.value)
    assert not list((tmp_path / "root").iterdir())


def test_lm_librispeech_checks_sizes_and_sha256_resumes_and_keeps_files_as_published(tmp_path, monkeypatch):
    arpa = gzip.compress(tiny_arpa({"HELLO": -0.5}).encode())
    lexicon = b"HELLO HH AH0 L OW1\nWORLD W ER1 L D\n"
    server = ArchiveServer({"3-gram.pruned.1e-7.arpa.gz": arpa, "librispeech-lexicon.txt": lexicon})
    monkeypatch.setattr(lm, "LIBRISPEECH_LM_FILES", {"pruned": {
        "3-gram.pruned.1e-7.arpa.gz": (len(arpa), hashlib.sha256(arpa).hexdigest()),
        "librispeech-lexicon.txt": (len(lexicon), hashlib.sha256(lexicon).hexdigest())}})
    command = ["librispeech", "--root", str(tmp_path), "--base-url", server.url]
    server.cut_after = len(arpa) // 2
    with pytest.raises(SystemExit) as cut:
        lm.main(command)
    folder = tmp_path / "LibriSpeech" / "lm"
    assert "Run the same command again" in str(cut.value)
    assert not (folder / "3-gram.pruned.1e-7.arpa.gz").exists()
    lm.main(command)
    assert server.ranges == [0, len(arpa) // 2]
    assert sorted(p.name for p in folder.iterdir()) == ["3-gram.pruned.1e-7.arpa.gz",
                                                        "librispeech-lexicon.txt"]
    assert decode.read_lm_words(folder / "3-gram.pruned.1e-7.arpa.gz") == ["HELLO"]
    assert decode.read_lexicon(folder / "librispeech-lexicon.txt") == ["HELLO", "WORLD"]
    decoder = decode.build_beam_search(folder / "3-gram.pruned.1e-7.arpa.gz", None, 5, 1.0, 0.0)
    log_probs = letter_frames(*({c: 0.9} if c != "_" else {} for c in "h_e_l_l_o"))
    assert beam_texts(decoder, log_probs, torch.tensor([9])) == ["hello"]  # our spelling

    for tampered in (b"not the file OpenSLR publishes\n", lexicon.replace(b"HELLO", b"HALLO")):  # same size
        server.files["librispeech-lexicon.txt"] = tampered
        with pytest.raises(SystemExit) as wrong:
            lm.main(["librispeech", "--root", str(tmp_path / "other"), "--base-url", server.url])
        assert "SHA-256" in str(wrong.value)
        assert not list((tmp_path / "other/LibriSpeech/lm").glob("*lexicon*"))
    (folder / "librispeech-lexicon.txt").write_bytes(bytes(len(lexicon)))  # zero-filled, the right size
    with pytest.raises(SystemExit) as zeros:  # a file already there is checked as a download is
        lm.main(command)
    assert "is there but is not OpenSLR's" in str(zeros.value)
    assert "Move it out of the way" in str(zeros.value)
    assert (folder / "librispeech-lexicon.txt").read_bytes() == bytes(len(lexicon))  # the user's file stays


def test_ctrl_c_during_lm_build_says_nothing_was_written(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text("a b c\n")

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(lm, "kneser_ney", interrupted)
    with pytest.raises(SystemExit) as stopped:
        lm.main(["build", str(tmp_path / "text.txt"), "--out", str(tmp_path / "x.arpa")])
    assert "nothing was written" in str(stopped.value) and "download" not in str(stopped.value)
    assert not (tmp_path / "x.arpa").exists()


# ------------------------------------------------------------------------ health checks
def test_overfit_trains_and_scores_n_utterances_without_augmentation(tmp_path, capsys):
    train_dir, _ = make_corpus(tmp_path, 30, 1)
    train.train(["--data", str(train_dir), "--overfit", "4", "--run-dir", str(tmp_path / "run"), *TINY,
                "--freq-warp", "0.1", "--freq-masks", "2", "--batch-seconds", "60", "--epochs", "3",
                "--eval-every", "1"])
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert checkpoint["step"] == 3  # 4 utterances: one batch per epoch
    assert checkpoint["model_config"]["freq_masks"] == checkpoint["model_config"]["time_masks"] == 0
    assert checkpoint["model_config"]["freq_warp"] == 0.0
    assert checkpoint["model_config"]["dropout"] == 0.0
    assert checkpoint["train_config"]["ema_decay"] == 0.0 and "trained_model" not in checkpoint
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("  ref:")]) == 3 * 3


def test_diagnose_names_a_stuck_run_and_stays_quiet_on_a_healthy_one():
    args = train.build_parser().parse_args(["--warmup-steps", "100"])
    assert train.diagnose(["", ""], [100.0], 50, args) is None            # in warmup
    assert train.diagnose(["", ""], [100.0, 100.0], 200, args) is None   # blank plateau: normal
    assert train.diagnose(["s", "ss"], [100.0, 96.0], 200, args) is None  # its first letters: normal
    assert "all blank" in train.diagnose(["", ""], [100.0] * 2, 301, args)
    assert "collapsed to 'ht'" in train.diagnose(["ttthhh", "th"], [90.0, 80.0], 400, args)
    stalled = train.diagnose(["the cat"], [90.0, 50.0, 51.0, 52.0, 50.5], 900, args)
    assert "not improved in 3 evaluations" in stalled and "--overfit" in stalled
    assert train.diagnose(["the cat"], [90.0, 50.0, 51.0, 52.0, 49.0], 900, args) is None
    # A run at (or within a point of) 0% has converged: no stalled-run warning and list of bugs.
    assert train.diagnose(["the cat"], [90.0, 0.0, 0.0, 0.0, 0.0], 900, args) is None
    assert train.diagnose(["the cat"], [90.0, 0.8, 0.9, 0.8, 0.8], 900, args) is None


# ------------------------------------------------------------------------------ ablation.py
# What each row must change, relative to the row it is compared with: the recipe for direction b,
# the previous row for direction a (its first row, the reported model, against the recipe).
ABLATION_CHANGES = {
    "a0-reported": {"features", "front_end", "rnn", "hidden", "letters_only", "time_stride", "rnn_layers",
                    "rnn_hidden", "speed_perturb", "freq_warp", "lr", "warmup_steps", "grad_clip",
                    "weight_decay"},
    "a1-log-norm": {"features"}, "a2-relu": {"hidden"}, "a3-space": {"letters_only"},
    "a4-stride": {"time_stride"}, "a5-lr": {"lr", "warmup_steps", "grad_clip", "weight_decay"},
    "a6-bigru": {"rnn"}, "a7-size": {"rnn_layers", "rnn_hidden"},
    "recipe": {"front_end", "hidden", "speed_perturb", "freq_warp"},
    "b-softmax": {"hidden"}, "b-power": {"features"}, "b-no-norm": {"features"},
    "b-no-space": {"letters_only"}, "b-stride1": {"time_stride"}, "b-adam1e-4": {"lr", "warmup_steps"},
    "b-no-clip": {"grad_clip"}, "b-len-padded": {"ctc_lengths"}, "b-len-stride": {"ctc_lengths"},
    "b-len-halved": {"ctc_lengths"}, "b-time-major": {"rnn"}, "b-lr-3e-2": {"lr"}, "b-dropout": {"dropout"},
}


def ablation_settings(name):
    """A row's model config and train.py flags as one flat dict."""
    model, flags = ablation.build(name)
    config = model.config if model is not None else ablation.AblationConfig(
        **dataclasses.asdict(train.model_config(train.build_parser().parse_args(flags))))
    return {**vars(train.build_parser().parse_args(flags)), **dataclasses.asdict(config)}


def test_each_ablation_row_changes_exactly_the_cause_it_names():
    names = list(ablation.all_rows())
    assert set(names) == set(ABLATION_CHANGES)
    for name in names:
        before = "recipe" if name.startswith("b-") or name == "a0-reported" else \
            names[names.index(name) - 1]
        now, then = ablation_settings(name), ablation_settings(before)
        changed = {k for k in now if now[k] != then[k]}
        assert changed == ABLATION_CHANGES[name], name


@pytest.mark.parametrize("name", list(ablation.all_rows()))
def test_each_ablation_variant_trains_a_step_and_carries_its_mistake(name):
    torch.manual_seed(0)
    model, flags = ablation.build(name)
    model = model or CTCModel(train.model_config(train.build_parser().parse_args(flags)))
    texts = ["abcabc", "cab", "ba"]
    waves = [torch.from_numpy(tones(t)) for t in texts]
    batch = data.collate([(w, torch.tensor([data.CHAR_TO_ID[c] for c in t]), t, t)
                          for w, t in zip(waves, texts)])
    model.eval()  # no speed perturbation: the lengths below are the conv arithmetic's
    log_probs, lengths = model(batch["waves"], batch["wave_lengths"])
    alone = [model(w[None], torch.tensor([len(w)]))[0].shape[1] for w in waves]
    mistake = getattr(model.config, "ctc_lengths", "conv")
    expected = {"conv": alone, "padded": [log_probs.shape[1]] * 3, "halved": [n // 2 for n in alone],
                "frames": [n * math.prod(TIME_STRIDES[model.config.time_stride]) for n in alone]}[mistake]
    assert lengths.tolist() == expected
    assert model.output_lengths(batch["wave_lengths"]).tolist() == alone  # what filter_trainable uses
    if getattr(model.config, "letters_only", False):  # space and apostrophe can never be emitted
        assert (log_probs[:, :, [data.CHAR_TO_ID[" "], data.CHAR_TO_ID["'"]]] == ablation.IMPOSSIBLE).all()
    if mistake == "frames":  # PyTorch itself refuses lengths past the output
        with pytest.raises(RuntimeError, match="input_lengths"):
            torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths,
                                         batch["target_lengths"])
        return
    model.train()
    log_probs, lengths = model(batch["waves"], batch["wave_lengths"])
    loss = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), batch["targets"], lengths,
                                        batch["target_lengths"], zero_infinity=True)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)
    hidden = getattr(model.config, "hidden", "")
    assert any(isinstance(m, torch.nn.Softmax) for m in model.modules()) == (hidden == "softmax")
    if getattr(model.config, "rnn", "bigru") == "time-major":
        assert not any(m.batch_first for m in model.modules() if isinstance(m, torch.nn.GRU))


def test_ablation_features_are_what_each_row_says():
    wave = torch.from_numpy(tones("abcdef"))[None]
    features = {}
    for name in ("recipe", "b-power", "b-no-norm"):
        model, flags = ablation.build(name)
        model = (model or CTCModel(train.model_config(train.build_parser().parse_args(flags)))).eval()
        features[name] = model.features(wave, torch.tensor([wave.shape[1]]))[0]
    assert abs(float(features["recipe"].mean())) < 1e-3  # normalized per utterance and per bin
    assert float(features["b-power"].min()) >= 0 and float(features["b-power"].max()) < 1e4
    assert float(features["b-no-norm"].mean()) < -3  # log energies, not centred
    assert torch.allclose(features["b-no-norm"].exp() - 1e-6, features["b-power"], rtol=1e-3, atol=1e-6)


def test_the_ablation_table_and_the_readme_train_the_an4_recipe_file(monkeypatch):
    readme = (HERE / "README.md").read_text()
    assert "python train.py @recipes/an4.args --data AN4/train --dev AN4/dev" in readme
    monkeypatch.chdir(HERE / "recipes")  # ablation.py finds the file wherever it is run from
    recipe = train.build_parser().parse_args(ablation.RECIPE)
    assert (recipe.rnn_layers, recipe.rnn_hidden, recipe.time_stride, recipe.epochs) == (3, 256, 4, 36)
    assert recipe.speed_perturb and (recipe.dropout, recipe.freq_masks, recipe.time_masks) == (0, 0, 0)


def test_a_recipe_file_is_flags_with_comments_and_a_flag_typed_after_it_wins(tmp_path):
    recipe = tmp_path / "my.args"
    recipe.write_text("# a comment line\n--rnn-layers 2  # and one after the flags\n--lr 1e-3 --speed-perturb\n")
    args = train.build_parser().parse_args([f"@{recipe}", "--lr", "2e-3", "--no-speed-perturb"])
    assert (args.rnn_layers, args.lr, args.speed_perturb) == (2, 2e-3, False)
    defaults = vars(train.build_parser().parse_args([]))  # the GPU recipe's file is the defaults, written out
    assert vars(train.build_parser().parse_args([f"@{HERE / 'recipes/librispeech-100.args'}"])) == defaults


def readme_commands(script):
    """The README's `python SCRIPT ...` command lines, continuations joined, comments dropped."""
    lines = (HERE / "README.md").read_text().replace("\\\n", " ").splitlines()
    commands = [line.split("#")[0].split() for line in lines if line.startswith("    ")]
    runners = ("python", "time", "torchrun")
    return [c[c.index(script) + 1:] for c in commands if script in c and c[0] in runners]


def test_every_train_and_decode_command_in_the_readme_parses(monkeypatch):
    """A recipe a user copies from the README must not stop at a misspelt or removed flag."""
    monkeypatch.chdir(HERE)  # where the README's @recipes/ paths are
    trains, decodes = readme_commands("train.py"), readme_commands("decode.py")
    assert len(trains) >= 4 and len(decodes) >= 4  # AN4, Mini LibriSpeech, LibriSpeech, torchrun
    assert any("train-clean-5" in " ".join(argv) for argv in trains)
    for argv in trains:
        train.build_parser().parse_args(argv)
    for argv in decodes:
        decode.build_parser().parse_args(argv)


def test_ablation_writes_its_table_and_continues_a_stopped_one(tmp_path, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 8, 3)
    out = tmp_path / "ablation"
    argv = ["--data", str(train_dir), "--dev", str(dev_dir), "--out", str(out), "--eval-every", "2",
            "--rows", "b-no-space", "b-len-stride", "--minutes"]
    ablation.main(argv + ["0.01"])
    results = json.loads((out / "results.json").read_text())
    no_space, crashed = results["rows"]
    assert no_space["row"] == "b-no-space" and no_space["steps"] >= 1 and 0 <= no_space["letter_cer"]
    assert len(no_space["gru_std"]) == 3 and "rnn0" in no_space["grad_norms"]
    targets = (out / "letters-only" / "train.tsv").read_text().splitlines()
    assert targets and all(line.split("\t")[1].isalpha() for line in targets)  # no space, no apostrophe
    assert "input_lengths" in crashed["error"]
    table = (out / "table.md").read_text()
    assert "| b-no-space |" in table and "| b-len-stride |" in table and "RuntimeError" in table
    metrics = [json.loads(line) for line in (out / "b-no-space" / "metrics.jsonl").read_text().splitlines()]
    assert "dev_cer" in metrics[-1] and (out / "b-no-space" / "last.pt").exists()  # ended by the clock
    assert "--max-minutes 0.01 reached" in (out / "b-no-space" / "train.log").read_text()
    ablation.main(argv + ["0.01"])  # a second run keeps the rows it has
    assert "already in" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results
    with pytest.raises(SystemExit, match="--minutes 0.01"):  # rows of another budget do not mix
        ablation.main(argv + ["0.02"])
    for other in (["--seed", "1"], ["--eval-every", "3"], ["--dev", str(train_dir)]):  # nor of other settings
        with pytest.raises(SystemExit, match="holds rows run with"):
            ablation.main(argv + ["0.01", *other])
    assert json.loads((out / "results.json").read_text()) == results


def test_ablation_refuses_bad_outs_and_typos_and_stores_no_interrupted_row(tmp_path, monkeypatch, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 8, 3)
    row = ["--rows", "b-no-space", "--minutes", "0.01", "--eval-every", "2"]
    (tmp_path / "file").write_text("x")
    (tmp_path / "cut/").mkdir()
    (tmp_path / "cut/results.json").write_text('{"minutes": 0.01, "ro')
    cases = [(["--out", str(train_dir / "table")], "inside the corpus"),
             (["--out", str(tmp_path / "file")], "is a file"),
             (["--out", str(tmp_path / "cut")], "not a table ablation.py wrote"),
             (["--out", str(tmp_path / "typo"), "--dev", str(tmp_path / "dve")], "no such file")]
    for extra, problem in cases:
        with pytest.raises(SystemExit, match=problem):
            ablation.main(["--data", str(train_dir), "--dev", str(dev_dir), *row, *extra])
    assert not (train_dir / "table").exists() and not (tmp_path / "typo").exists()
    real_lr = train.learning_rate

    def ctrl_c(step, total, args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, total, args)
    monkeypatch.setattr(train, "learning_rate", ctrl_c)
    out = tmp_path / "table"
    with pytest.raises(SystemExit, match="interrupted"):
        ablation.main(["--data", str(train_dir), "--dev", str(dev_dir), "--out", str(out), *row])
    assert not (out / "b-no-space").exists() and not (out / "results.json").exists()
    monkeypatch.setattr(train, "learning_rate", real_lr)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    ablation.main(["--data", str(train_dir), "--dev", str(dev_dir), "--out", str(out), *row])
    assert "b-no-space" in (out / "results.json").read_text()
    err = capsys.readouterr().err
    assert "cannot draw" not in err and "pip install matplotlib" in err
    assert "cer.png" not in err.splitlines()[-1]


# --------------------------------------------------------- hostile input, second round
def test_lm_out_refuses_what_exists_and_what_cannot_be_written_before_any_work(tmp_path):
    text = tmp_path / "X.lexicon.txt"  # the input text has the name of the lexicon --out would write
    text.write_text("hello world\nhello there\n")
    with pytest.raises(SystemExit) as taken:
        lm.main(["build", str(text), "--out", str(tmp_path / "X.arpa")])
    assert str(text) in str(taken.value) and "nothing was written" in str(taken.value)
    assert text.read_text() == "hello world\nhello there\n" and not (tmp_path / "X.arpa").exists()
    with pytest.raises(SystemExit) as no_folder:
        lm.main(["build", str(text), "--out", str(tmp_path / "missing/x.arpa")])
    assert "does not exist" in str(no_folder.value)
    (tmp_path / "digits.txt").write_text("123\n4 5\n")
    with pytest.raises(SystemExit) as no_words:
        lm.main(["build", str(tmp_path / "digits.txt"), "--out", str(tmp_path / "d.arpa")])
    assert str(tmp_path / "digits.txt") in str(no_words.value) and not (tmp_path / "d.arpa").exists()
    lm.main(["build", str(text), "--out", str(tmp_path / "g.arpa.gz")])  # gzip, as named
    assert gzip.decompress((tmp_path / "g.arpa.gz").read_bytes()).startswith(b"\n\\data\\")
    assert sorted(decode.read_lm_words(tmp_path / "g.arpa.gz")) == ["hello", "there", "world"]


def test_resume_from_an_older_checkpoint_never_rewinds_and_branches_into_a_new_folder(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 12, 2)
    run = tmp_path / "my run"  # a space: every printed command is quoted for the shell
    train.train(train_flags(train_dir, dev_dir, run, "--epochs", "2", "--eval-every", "100",
                           "--max-minutes", "1e-9"))  # stops after its first step
    (run / "early.pt").write_bytes((run / "last.pt").read_bytes())
    train.train(["--resume", str(run / "last.pt"), "--max-minutes", "1e-9"])  # one step more
    before = {p: p.read_bytes() for p in run.iterdir() if p.suffix != ".lock"}
    with pytest.raises(InputError) as rewind:
        train.train(["--resume", str(run / "early.pt")])
    assert "would rewind" in str(rewind.value) and f"'{run}/last.pt'" in str(rewind.value)
    assert "--run-dir" in str(rewind.value)
    assert {p: p.read_bytes() for p in before} == before
    train.train(["--resume", str(run / "early.pt"), "--run-dir", str(tmp_path / "branch"),
                 "--max-minutes", "60"])
    assert {p: p.read_bytes() for p in before} == before  # the original run is untouched
    branch = [json.loads(line) for line in (tmp_path / "branch/metrics.jsonl").read_text().splitlines()]
    assert branch[0]["step"] == 1 and torch.load(tmp_path / "branch/last.pt", weights_only=True)["epoch"] == 2
    with pytest.raises(InputError) as finished:  # a finished run says so instead of evaluating again
        train.train(["--resume", str(tmp_path / "branch/last.pt")])
    assert "finished its 2 epochs" in str(finished.value)
    # A run killed before its first save holds only metrics.jsonl: the advice must work.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed/metrics.jsonl").write_text('{"step": 5, "loss": 2.0}\n')
    with pytest.raises(InputError) as killed:
        train.train(train_flags(train_dir, dev_dir, tmp_path / "killed", "--epochs", "1"))
    assert "holds no checkpoint" in str(killed.value) and "--resume" not in str(killed.value)
    with pytest.raises(InputError) as nothing:
        train.train(["--resume", str(tmp_path / "killed")])
    assert "stopped before its first save" in str(nothing.value)


def test_resume_refuses_changed_data_another_world_size_and_finds_relative_paths(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 12, 2)
    monkeypatch.chdir(tmp_path)  # relative corpus paths, then a resume from another directory
    train.train(train_flags(train_dir.relative_to(tmp_path), dev_dir.relative_to(tmp_path), tmp_path / "run",
                           "--epochs", "2", "--eval-every", "100", "--max-minutes", "1e-9"))
    monkeypatch.chdir(HERE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # as torchrun sets them
    with pytest.raises(InputError) as size:
        train.train(["--resume", str(tmp_path / "run/last.pt")])
    assert "trained in 1 processes, this is 2" in str(size.value)
    assert "python train.py --resume" in str(size.value)
    monkeypatch.delenv("RANK")  # a WORLD_SIZE left exported in the shell: not torchrun, one process
    write_librispeech(train_dir, ["abc"], speaker=7)  # one utterance more
    folder = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()}
    with pytest.raises(InputError) as changed:
        train.train(["--resume", str(tmp_path / "run/last.pt")])
    assert "training data (--data) changed" in str(changed.value) and "'utterances': 13" in str(changed.value)
    # Refused before the run folder is touched: not even train.lock is written.
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()} == folder
    (train_dir / "7").rename(tmp_path / "moved")  # the data as it was: the run continues
    assert train.train(["--resume", str(tmp_path / "run/last.pt"), "--max-minutes", "1e-9"]) is not None
    # One machine, any free port: the command works beside another run and whatever launched this one.
    assert runs.resume_command(Path("r/last.pt"), 4) == "torchrun --standalone --nproc_per_node=4 " \
                                                         "train.py --resume r/last.pt"


def test_resume_checks_weights_and_optimizer_before_the_folder_is_touched(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "100",
                           "--max-minutes", "1e-9"))
    good = torch.load(tmp_path / "run/last.pt", weights_only=True)
    renamed = {("renamed" if k.endswith("output.weight") else k): v for k, v in good["model"].items()}
    state = good["optimizer"]
    cases = {"renamed": {"model": renamed}, "optimizer": {"optimizer": {**state, "param_groups": []}},
             "missing": {"rng_cpu": "delete"}}
    for name, change in cases.items():
        checkpoint = {k: v for k, v in {**good, **change}.items() if not isinstance(v, str) or v != "delete"}
        torch.save(checkpoint, tmp_path / "run" / f"{name}.pt")
    before = {p: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    cases = [("renamed", "do not fit"), ("optimizer", "do not fit"), ("missing", "lacks rng_cpu")]
    for name, problem in cases:
        with pytest.raises(InputError) as refused:
            train.train(["--resume", str(tmp_path / "run" / f"{name}.pt")])
        assert problem in str(refused.value), name
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_devices_and_decode_numbers_are_checked_when_the_flags_are_read(tmp_path, capsys):
    missing = [str(tmp_path / "missing.pt"), "x.flac"]
    cases = [["--device", "foo"], ["--chunk-seconds", "nan"], ["--chunk-seconds", "inf"],
             ["--lm", "x.arpa", "--lm-weight", "nan"], ["--lm", "x.arpa", "--lm-weight", "inf"],
             ["--lm", "x.arpa", "--word-score", "nan"], ["--lm", "x.arpa", "--beam-size", "100000000000"],
             ["--batch-seconds", "inf"]]
    if not torch.cuda.is_available():
        cases.append(["--device", "cuda"])
    for flags in cases:
        with pytest.raises(SystemExit) as refused:
            decode.main(missing + flags)
        assert refused.value.code == 2 and f"argument {flags[-2]}" in capsys.readouterr().err, flags
    for device in ["foo"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(SystemExit):
            train.train(["--data", "x", "--dev", "y", "--run-dir", str(tmp_path / "run"), "--device", device])
        assert "argument --device" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_lexicon_or_lm_that_would_be_read_wrong_is_named(tmp_path):
    (tmp_path / "upper.arpa").write_text(tiny_arpa({"HELLO": -0.5, "WORLD": -0.5}))
    (tmp_path / "lower.txt").write_text("hello\nworld\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"PK\x03\x04\x00\x00archive/data.pkl\n")
    whole = gzip.compress(tiny_arpa({"abc": -1}).encode())
    (tmp_path / "cut.arpa.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "plain.arpa.gz").write_text(tiny_arpa({"abc": -1}))
    (tmp_path / "bom.arpa").write_text("\ufeff" + tiny_arpa({"abc": -1}), encoding="utf-8")
    (tmp_path / "seven.arpa").write_text(tiny_arpa({"abc": -1}).replace("ngram 2=", "ngram 7=0\nngram 2="))
    cases = [("upper.arpa", "upper.arpa", "is an ARPA language model, not a lexicon: pass it as --lm"),
             (None, "upper.arpa", "is an ARPA language model"),
             ("seven.arpa", None, "7-gram LM.*lm.py build --order 6"),
             ("upper.arpa", "lower.txt", "upper case"),
             (None, "latin1.txt", "latin1.txt:1: not UTF-8"),
             (None, "binary.txt", "binary"), ("cut.arpa.gz", None, "not a complete gzip file"),
             ("plain.arpa.gz", None, "not a complete gzip file"), ("bom.arpa", None, "byte-order mark")]
    for arpa, lexicon, problem in cases:
        with pytest.raises(InputError, match=problem):
            decode.build_beam_search(arpa and tmp_path / arpa, lexicon and tmp_path / lexicon, 10, 1.0, 0.0)
    decode.build_beam_search(tmp_path / "upper.arpa", None, 10, 1.0, 0.0)  # the LM's own words: fine


def test_manifests_have_two_columns_digits_are_skipped_and_ids_are_unique(tmp_path, capsys):
    soundfile.write(tmp_path / "a.flac", tones("abc"), 16000)
    (tmp_path / "three.tsv").write_text("a.flac\t3.40\tabc\n")
    with pytest.raises(data.InputError, match=r"three.tsv:1: expected two tab-separated columns"):
        data.read_corpus([tmp_path / "three.tsv"])
    with pytest.raises(data.InputError, match="is an audio file"):
        data.read_corpus([tmp_path / "a.flac"])
    (tmp_path / "mixed.txt").write_text("a.flac\tabc\na.flac\troom 101\n")  # any name but .flac/.wav
    corpus = data.read_corpus([tmp_path / "mixed.txt"])
    assert [u["text"] for u in corpus] == ["abc"]
    assert "transcript holds digits (spell numbers out): 1" in capsys.readouterr().out
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "m.pt")
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        soundfile.write(tmp_path / folder / "same.wav", tones("ab"), 16000)
    result = run_script("decode.py", tmp_path / "m.pt", tmp_path / "mixed.txt", tmp_path / "x/same.wav",
                        tmp_path / "y/same.wav")
    ids = [line.split("\t")[0] for line in result.stdout.splitlines()]
    a = str(tmp_path / "a.flac")  # listed twice: decoded twice, scored once (the digits are not)
    assert result.returncode == 0
    assert ids == [a, a + "#2", str(tmp_path / "x/same.wav"), str(tmp_path / "y/same.wav")]
    assert "(1 utterances with references)" in result.stderr and "digits" in result.stderr


def test_interrupts_at_start_up_and_a_bad_duration_cache_are_handled(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)
    cache = tmp_path / "cache" / "ctc-baseline"
    data.read_corpus([train_dir], log=lambda m: None)
    for cache_file in cache.iterdir():
        cache_file.write_text("[]")  # valid JSON of the wrong shape: ignored and rewritten
    assert len(data.read_corpus([train_dir], log=lambda m: None)) == 4
    assert all(isinstance(json.loads(f.read_text()), dict) for f in cache.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "read_corpus", interrupted)
    with pytest.raises(SystemExit) as train_stop:
        train.main(train_flags(train_dir, dev_dir, tmp_path / "run"))
    assert "interrupted while starting" in str(train_stop.value)
    monkeypatch.setattr(download, "fetch", interrupted)
    with pytest.raises(SystemExit) as download_stop:
        download.main(["an4", "--root", str(tmp_path / "root"), "--base-url", "http://127.0.0.1:9"])
    assert "Run the same command again" in str(download_stop.value)


def test_an4_is_written_exactly_as_listed_and_a_target_in_the_way_is_found_first(tmp_path, monkeypatch):
    archive, _ = an4_archive(tmp_path)
    with tarfile.open(tmp_path / "an4.tar.gz", "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    extra = tmp_path / "AN4/train/evil/an4/evil.flac"  # an archive member shaped like the corpus
    extra.parent.mkdir(parents=True)
    soundfile.write(extra, tones("ab"), 16000)
    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        tar.add(tmp_path / "AN4", arcname="AN4")
    monkeypatch.setattr(download, "AN4_UTTERANCES", {"train": 4, "test": 2})
    monkeypatch.setattr(download, "AN4_TEST_WORDS", 8)
    monkeypatch.setattr(download, "AN4_SHA256", download.an4_digest(tmp_path / "an4src/an4"))
    server = ArchiveServer({download.AN4_ARCHIVE: (tmp_path / "evil.tar.gz").read_bytes()})
    root = tmp_path / "root"
    (root / "AN4").mkdir(parents=True)  # empty: not taken for a finished download
    download.main(["an4", "--root", str(root), "--base-url", server.url])
    flacs = sorted(p.name for p in (root / "AN4").rglob("*.flac"))
    assert len(flacs) == 6 and "evil.flac" not in flacs
    (tmp_path / "other").mkdir()
    (tmp_path / "other/AN4").write_text("a file in the way")
    server.ranges.clear()
    with pytest.raises(SystemExit) as in_the_way:
        download.main(["an4", "--root", str(tmp_path / "other"), "--base-url", server.url])
    assert "is not a finished download" in str(in_the_way.value) and server.ranges == []


def test_decode_of_a_best_pt_not_yet_written_points_to_last_pt(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/last.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as missing:
        decode.main([str(tmp_path / "run/best.pt"), "x.flac"])
    assert "no evaluation has run yet" in str(missing.value)
    assert str(tmp_path / "run/last.pt") in str(missing.value)


# ------------------------------------------------------------------------------- plot.py
def test_plot_reads_a_resumed_and_a_killed_run_and_draws_them(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 5, "loss": 3.0, "wall_seconds": 30.0},
               {"step": 10, "dev_wer": 90.0, "dev_cer": 60.0, "wall_seconds": 62.0},
               {"step": 15, "loss": 1.0, "wall_seconds": 10.0},  # resumed: the clock starts again
               {"step": 20, "dev_wer": 40.0, "dev_cer": 20.0, "wall_seconds": 40.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 25, "lo')
    steps, evals = plot.read_metrics(run)
    assert [r["minutes"] for r in steps] == [0.5, 72 / 60]
    assert [r["minutes"] for r in evals] == [62 / 60, 102 / 60]
    pytest.importorskip("matplotlib")
    plot.main([str(run), str(run / "metrics.jsonl"), "--out", str(tmp_path / "curve.png"), "--x", "steps"])
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        plot.main([str(run), "--labels", "a", "b", "--out", str(tmp_path / "x.png")])
    assert "2 labels for 1 runs" in capsys.readouterr().err
    torch.save({"x": torch.ones(3)}, tmp_path / "last.pt")
    (tmp_path / "other.jsonl").write_text('{"step": 1}\n[1, 2]\n{"loss": "x", "wall_seconds": 1}\n')
    for name in ("last.pt", "other.jsonl"):  # not train.py's metrics: named, no traceback
        with pytest.raises(SystemExit) as refused:
            plot.main([str(tmp_path / name), "--out", str(tmp_path / "y.png")])
        assert str(tmp_path / name) in str(refused.value) and "give a run folder" in str(refused.value)
    plot.main([str(run), "--out", str(tmp_path / "named")])  # no suffix: written and reported as .png
    assert (tmp_path / "named.png").exists() and f"{tmp_path / 'named.png'}: 1 run" in capsys.readouterr().err


# ----------------------------------------------------------------------- word timestamps
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


def test_word_times_are_where_the_words_are_chunked_or_not_greedy_or_beam(tmp_path):
    spoken = [(3.0, 3.5), (10.0, 11.0), (15.24, 15.6), (31.0, 31.4)]  # seconds
    wave = torch.zeros(40 * data.SAMPLE_RATE)
    for start, end in spoken:
        wave[int(start * data.SAMPLE_RATE):int(end * data.SAMPLE_RATE)] = 0.5
    (tmp_path / "words.txt").write_text("ab\n")
    beam = functools.partial(decode.beam_search_spans, decode.build_beam_search(None, tmp_path / "words.txt",
                                                                                 10, 1.0, 0.0))
    frame = 1 / 25
    cpu = torch.device("cpu")
    results = {(chunk, name): decode.transcribe(LoudnessModel(), [wave], cpu, 100, chunk, spans)[0]
               for chunk in (60.0, 7.0) for name, spans in (("greedy", greedy_spans), ("beam", beam))}
    for (chunk, name), (text, words) in results.items():
        assert text == "ab ab ab ab", (chunk, name)
        for word, (start, end) in zip(words, spoken):
            assert abs(word["start"] - start) <= frame, (chunk, name, word)
            assert abs(word["end"] - end) <= frame, (chunk, name, word)
    assert results[(60.0, "greedy")] == results[(7.0, "greedy")]  # chunked: times from the recording's start


def test_decode_timestamps_are_json_lines_in_input_order_for_a_single_file_too(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "m.pt")
    names = ["long.wav", "short.wav", "mid.wav"]  # not in length order: the output still is in input order
    for name, text in zip(names, ["abcabcabcabc", "ab", "abcab"]):
        soundfile.write(tmp_path / name, tones(text), 16000)
    many = run_script("decode.py", tmp_path / "m.pt", *(tmp_path / n for n in names), "--timestamps")
    lines = [json.loads(line) for line in many.stdout.splitlines()]
    assert many.returncode == 0 and [line["id"] for line in lines] == ["long", "short", "mid"]
    for line in lines:
        assert line["text"] == " ".join(w["word"] for w in line["words"])
        assert all(0 <= w["start"] < w["end"] <= 2.0 for w in line["words"])
    one = run_script("decode.py", tmp_path / "m.pt", tmp_path / "short.wav", "--timestamps", "--workers", "0")
    assert one.returncode == 0 and json.loads(one.stdout)["id"] == "short"


def test_a_checkpoint_continues_only_its_own_run_and_a_damaged_last_pt_is_named(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 12, 2)
    one_step = ["--epochs", "2", "--eval-every", "100", "--max-minutes", "1e-9"]
    for name in ("a", "b"):
        train.train(train_flags(train_dir, dev_dir, tmp_path / name, *one_step))
    run = tmp_path / "a"
    (run / "early.pt").write_bytes((run / "last.pt").read_bytes())
    (run / "foreign.pt").write_bytes((tmp_path / "b/last.pt").read_bytes())
    before = {p: p.read_bytes() for p in run.iterdir() if p.suffix != ".lock"}
    with pytest.raises(InputError) as foreign:  # B's checkpoint at A's step: the step alone cannot tell
        train.train(["--resume", str(run / "foreign.pt")])
    assert "another run" in str(foreign.value) and "--run-dir NEW_FOLDER" in str(foreign.value)
    (run / "last.pt").write_bytes(before[run / "last.pt"][:1000])  # damaged
    with pytest.raises(InputError) as damaged:
        train.train(["--resume", str(run / "early.pt")])
    assert f"{run / 'last.pt'}: not a readable" in str(damaged.value)
    assert "out of the way" in str(damaged.value)
    (run / "last.pt").write_bytes(before[run / "last.pt"])
    assert {p: p.read_bytes() for p in run.iterdir() if p.suffix != ".lock"} == before
    train.train(["--resume", str(run / "last.pt"), "--max-minutes", "60"])  # to the end of the run
    with pytest.raises(InputError) as finished:  # a rewind of a finished run: only a branch makes sense
        train.train(["--resume", str(run / "early.pt")])
    assert "finished the run at step 6" in str(finished.value) and "Continue it" not in str(finished.value)
    assert "--run-dir NEW_FOLDER" in str(finished.value)


def test_resume_checks_transcripts_and_follows_a_moved_corpus(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 12, 2)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "100",
                            "--max-minutes", "1e-9"))
    resume = ["--resume", str(tmp_path / "run/last.pt"), "--max-minutes", "1e-9"]
    trans = next(train_dir.rglob("*.trans.txt"))
    original = trans.read_text()
    trans.write_text(original.replace(original.split()[1], "JJJ", 1))  # same ids and audio, a new text
    with pytest.raises(InputError) as edited:
        train.train(resume)
    assert "training data (--data) changed" in str(edited.value)
    trans.write_text(original)
    train_dir.rename(tmp_path / "moved-train")
    with pytest.raises(InputError) as moved:
        train.train(resume)
    assert "no such file" in str(moved.value) and "If they moved" in str(moved.value)
    with pytest.raises(InputError) as other:  # another corpus at the new place is refused
        train.train(resume + ["--data", str(dev_dir)])
    assert "changed" in str(other.value)
    train.train(resume + ["--data", str(tmp_path / "moved-train")])
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 2


def test_resume_refuses_a_checkpoint_of_an_older_train_py_or_a_foreign_pickle(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 10, 2)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "100",
                            "--max-minutes", "1e-9"))
    old = torch.load(tmp_path / "run/last.pt", weights_only=True)
    del old["train_config"]["max_minutes"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(InputError) as older:
        train.train(["--resume", str(tmp_path / "old.pt"), "--run-dir", str(tmp_path / "branch")])
    assert "older train.py, before --max-minutes existed" in str(older.value)
    assert not (tmp_path / "branch").exists()
    torch.save({"config": argparse.Namespace(lr=1)}, tmp_path / "pickle.pt")  # runs code when unpickled
    for command in (lambda: train.train(["--resume", str(tmp_path / "pickle.pt")]),
                    lambda: runs.build_from_checkpoint(tmp_path / "pickle.pt")):
        with pytest.raises(InputError) as foreign:
            command()
        assert "not a checkpoint written by train.py" in str(foreign.value)
        assert "weights_only=False" not in str(foreign.value)


def test_a_time_limit_on_the_last_step_finishes_the_run_and_a_raising_loop_gives_signals_back(
        tmp_path, monkeypatch, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)  # 4 short utterances: one step per epoch
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--max-minutes", "1e-9"))
    assert "Continue with" not in capsys.readouterr().out
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(InputError, match="finished its 1 epochs"):
        train.train(["--resume", str(tmp_path / "run/last.pt")])

    def broken_forward(*args):
        raise RuntimeError("a mistake inside the loop")
    monkeypatch.setattr(train, "forward", broken_forward)
    with pytest.raises(RuntimeError):
        train.train(train_flags(train_dir, dev_dir, tmp_path / "raised", "--epochs", "1"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_dev_set_of_only_unusable_files_is_refused_not_scored_zero(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 8, 2)
    for flac in dev_dir.rglob("*.flac"):
        soundfile.write(flac, np.zeros(16000, np.float32), data.SAMPLE_RATE)  # digital silence
    with pytest.raises(InputError) as nothing:
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--eval-every", "1"))
    assert "none of its utterances could be scored" in str(nothing.value)
    assert not (tmp_path / "run/best.pt").exists()


class RelativeLoudnessModel(LoudnessModel):
    """LoudnessModel with loudness judged against the recording's own peak, as a model fed per-utterance
    normalized features judges it: on a noise floor alone it spells words."""

    def forward(self, waves, wave_lengths):
        peaks = waves.abs().amax(1, keepdim=True).clamp(min=1e-12)
        return super().forward(0.02 * waves / peaks, wave_lengths)


def test_silence_and_near_silence_decode_to_nothing_greedy_or_beam(tmp_path):
    rng = np.random.default_rng(0)
    dither = torch.from_numpy((rng.random(40 * 16000) - rng.random(40 * 16000)) / 32768).float()  # -98 dBFS
    speech = dither.clone()
    speech[3 * 16000:4 * 16000] += 0.3  # a word at 3-4 s, then 36 s of the noise floor
    (tmp_path / "words.txt").write_text("ab\n")
    beam = functools.partial(decode.beam_search_spans, decode.build_beam_search(None, tmp_path / "words.txt",
                                                                                 10, 1.0, 0.0))
    for spans in (greedy_spans, beam):
        texts = [text for text, _ in decode.transcribe(RelativeLoudnessModel(), [dither, speech, torch.zeros(
            16000)], torch.device("cpu"), 100, 10.0, spans)]
        assert texts == ["", "ab", ""]  # the noise floor's chunks give no words; the word is kept
    assert not data.is_silent(speech[:10 * 16000]) and data.is_silent(dither)
    # The quietest real recordings are far above the line (RESULTS.md: AN4 -48 dBFS, LibriSpeech -40).
    assert not data.is_silent(torch.full((16000,), 10 ** (-60 / 20)))


def test_decode_decodes_every_recording_whatever_its_transcript_and_counts_what_it_cannot(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "m.pt")
    names = ["digits", "empty", "symbols", "good", "odd\tname\nforged"]
    for name in names:
        soundfile.write(tmp_path / f"{name}.wav", tones("abc"), 16000)
    (tmp_path / "m.tsv").write_text("".join(f"{name}.wav\t{text}\n" for name, text in zip(
        names[:4], ["call 911", "", "?!", "abc"])))
    folder = tmp_path / "corpus"
    write_librispeech(folder, ["abc"])
    soundfile.write(folder / "19/198/untranscribed.wav", tones("ab"), 16000)
    os.mkfifo(folder / "19/198/pipe.wav")  # would block a read
    huge = tmp_path / "huge.wav"
    soundfile.write(huge, tones("abc") * 1e20, 16000, subtype="FLOAT")
    wave, problem = data.load_usable_audio(huge)
    assert problem is None and torch.isfinite(model(wave[None], torch.tensor([len(wave)]))[0]).all()
    result = run_script("decode.py", tmp_path / "m.pt", tmp_path / "m.tsv", folder, tmp_path / "missing.wav",
                        tmp_path / "odd\tname\nforged.wav", huge, timeout=120)
    assert result.returncode == 0, result.stderr
    ids = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert ids == ["digits", "empty", "symbols", "good", "19-198-0000", "untranscribed",
                   "odd\\tname\\nforged", "huge"]  # one line each; the odd name escaped, not splitting lines
    assert "(2 utterances with references)" in result.stderr  # good and 19-198-0000
    assert "not scored" in result.stderr and "digits" in result.stderr
    assert "empty transcript': 2" in result.stderr
    assert "pipe.wav: not a regular file" in result.stderr and "missing.wav: no such file" in result.stderr
    assert "error" not in result.stderr  # a file skipped among others that decode is a warning, exit 0
    assert "2 of 10 recordings could not be decoded" in result.stderr


def read_or_empty(path):
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""


def test_decode_interrupted_or_cut_off_by_head_ends_without_a_traceback(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "m.pt")
    soundfile.write(tmp_path / "a.wav", tones("abc"), 16000)
    (tmp_path / "many.tsv").write_text("a.wav\tabc\n" * 3000)
    command = [sys.executable, "decode.py", tmp_path / "m.pt", tmp_path / "many.tsv", "--batch-seconds", "3"]
    reader = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # as `| head -1` does once it has its line
    assert reader.wait(timeout=120) == 141 and b"Traceback" not in reader.stderr.read()
    process = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "interrupted" in err and "Traceback" not in err, err
    process = subprocess.Popen(command + ["--workers", "2"], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.terminate()  # kill's SIGTERM: the workers, which ignore it, must not outlive the decoder
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "interrupted" in err and "Traceback" not in err, err
    left = [c for c in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path).encode() in read_or_empty(c)]
    assert not left, "decode.py's workers outlived it"
    with pytest.raises(SystemExit):
        decode.main([str(tmp_path / "m.pt"), str(tmp_path / "missing.wav")])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back to a caller in Python


def test_decode_names_an_ablation_rows_checkpoint_and_how_to_load_it(tmp_path):
    model, _ = ablation.build("b-softmax")
    runs.save_checkpoint(model_checkpoint(model, data.VOCAB), tmp_path / "row.pt")
    with pytest.raises(InputError) as row:
        runs.build_from_checkpoint(tmp_path / "row.pt")
    assert "ablation.py row" in str(row.value) and "ablation.build(<row>)[0]" in str(row.value)


def test_ctrl_c_that_reaches_workers_as_they_start_does_not_break_the_run(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 6, 2)
    real = data.ignore_signals

    def interrupted_first(worker_id):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches the new worker before it can ignore it
        real(worker_id)
    monkeypatch.setattr(data, "ignore_signals", interrupted_first)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--workers", "1"))
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 1
