"""Tests of the core: model.py, data.py, runs.py, train.py, decode.py and the recipes. CPU only,
no network; the tools' tests are in test_tools.py.

    pytest test_ctc.py
"""
import argparse
import contextlib
import inspect
import ast
import fcntl
import functools
import gzip
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

import data
import decode
import download
import health
import lm
import model as model_module
import runs
import train
from data import InputError
from model import BLANK, ENGLISH, TIME_STRIDES, CTCModel, ModelConfig, greedy_decode, greedy_spans, vocabulary
from runs import build_from_checkpoint, model_checkpoint

from conftest import (HERE, TINY, tones, random_text, write_librispeech, run_script, make_corpus,
                      train_flags, independent_distance, read_arpa, tiny_arpa, letter_frames, beam_texts,
                      train_one_rank, readme_commands, LoudnessModel, RelativeLoudnessModel, read_or_empty,
                      FOREIGN)


# ------------------------------ model.py: features, lengths, padding, augmentation, greedy decoding
def test_vocabulary_has_blank_first_then_space_apostrophe_letters():
    assert data.VOCAB[BLANK] == data.VOCAB[0] and len(data.VOCAB) == 29
    assert data.VOCAB[1:3] == [" ", "'"] and "".join(data.VOCAB[3:]) == "abcdefghijklmnopqrstuvwxyz"


def test_greedy_collapses_repeats_but_keeps_a_double_letter_split_by_blank():
    h, e, l, o, b = (data.CHAR_TO_ID[c] for c in "helo_")
    frames = [[h, h, e, b, l, l, b, l, o, o, b], [l, b, l, l, o, b, b, b, b, h, h]]
    log_probs = torch.nn.functional.one_hot(torch.tensor(frames), len(data.VOCAB)).float().log()
    assert greedy_decode(log_probs, torch.tensor([11, 5]), data.VOCAB) == ["hello", "llo"]


@pytest.mark.parametrize("stride", sorted(TIME_STRIDES))
def test_output_lengths_match_real_tensor_shapes(stride):
    model = CTCModel(ModelConfig(time_stride=stride, rnn_layers=1, rnn_hidden=8, conv_channels=2)).eval()
    for samples in [400, 401, 559, 560, 561, 719, 1234, 1600, 3999, 16000, 16161, 23457]:
        log_probs, out_lengths = model(torch.randn(1, samples), torch.tensor([samples]))
        from_arithmetic = model.output_lengths(torch.tensor([samples]))[0]
        assert log_probs.shape[1] == out_lengths[0] == from_arithmetic, samples


@pytest.mark.parametrize("norm_range_db", [0.0, 40.0])
def test_an_utterance_gets_the_same_log_probs_alone_and_in_a_padded_batch(norm_range_db):
    torch.manual_seed(0)
    config = ModelConfig(rnn_layers=2, rnn_hidden=16, conv_channels=4, norm_range_db=norm_range_db)
    model = CTCModel(config).eval()
    lengths = torch.tensor([5000, 16000, 9001])
    waves = torch.randn(3, 16000) * (torch.arange(16000)[None, :] < lengths[:, None])
    batch_log_probs, batch_lengths = model(waves, lengths)
    for i in range(3):
        alone, alone_lengths = model(waves[i:i + 1, :lengths[i]], lengths[i:i + 1])
        assert alone_lengths[0] == batch_lengths[i]
        torch.testing.assert_close(alone[0], batch_log_probs[i, :batch_lengths[i]], atol=1e-5, rtol=1e-5)


def test_a_pause_around_the_words_leaves_their_features_with_norm_range_db():
    """Statistics over every frame let a pause rescale the words; over the frames near the loudest, not."""
    words = torch.from_numpy(tones("abcabcjihg"))
    rng = np.random.default_rng(0)
    floor = torch.from_numpy(rng.standard_normal(16000).astype(np.float32)) * 1e-4  # -80 dBFS
    for pause in (torch.zeros(16000), floor):
        padded = torch.cat([pause, words, pause])
        moved = {}
        for norm_range_db in (0.0, 40.0):
            model = CTCModel(ModelConfig(norm_range_db=norm_range_db))
            alone = model.features(words[None], torch.tensor([len(words)]))[0][0]
            inside = model.features(padded[None], torch.tensor([len(padded)]))[0][0][100:100 + len(alone)]
            moved[norm_range_db] = (inside - alone).abs()[2:-2]  # the frames that do not straddle the pause
        assert moved[0.0].mean() > 0.3 and moved[40.0].max() < 0.01


def test_the_features_of_a_recording_and_of_it_50_db_quieter_are_equal():
    """The floor sits below each recording's own reference level: an absolute one (the older models')
    flattened a quiet microphone's quieter bands."""
    rng = np.random.default_rng(0)
    clean = tones("abcabcjihg")
    words = torch.from_numpy(clean + rng.standard_normal(len(clean)) * 1e-3).float()
    for config, equal in ((ModelConfig(), True), (ModelConfig(reference_ms=10, floor_db=0.0), False)):
        model = CTCModel(config)
        loud, quiet = (model.features(w[None], torch.tensor([len(words)]))[0] for w in (words, 0.003 * words))
        assert torch.allclose(loud, quiet, atol=1e-3) == equal, config


def test_a_click_far_louder_than_the_words_leaves_their_features():
    """A 20 ms burst at full scale before words at -45 dBFS: with the loudest frame as the reference, only
    the click's frames were counted and the words were scaled by them."""
    words = torch.from_numpy(tones("abcabcjihg"))
    words = words / words.square().mean().sqrt() * 10 ** (-45 / 20)
    burst = torch.from_numpy(np.random.default_rng(0).standard_normal(320).astype(np.float32))
    clicked = torch.cat([torch.zeros(8000), words])
    clicked[2000:2320] += burst / burst.abs().max()
    plain = torch.cat([torch.zeros(8000), words])
    moved = {}
    for reference_ms in (10, 100):
        model = CTCModel(ModelConfig(reference_ms=reference_ms))
        with_click, without = (model.features(w[None], torch.tensor([len(w)]))[0][0, 52:]
                               for w in (clicked, plain))
        moved[reference_ms] = (with_click - without).abs().mean()
    assert moved[10] > 0.3 and moved[100] < 0.01


def test_spec_augment_only_in_training():
    """SpecAugment's masks alone (no warp, dropout or speed) change the training forward, never evaluation's,
    and they zero whole mel bands and time spans within their widths; without them training computes what
    evaluation does."""
    config = dict(rnn_layers=1, rnn_hidden=8, conv_channels=2, dropout=0.0, freq_warp=0.0)
    model = CTCModel(ModelConfig(**config, freq_masks=2, time_masks=2))
    wave, length = torch.randn(1, 32000), torch.tensor([32000])
    model.eval()
    torch.testing.assert_close(model(wave, length)[0], model(wave, length)[0])
    model.train()
    assert not torch.equal(model(wave, length)[0], model(wave, length)[0])
    x, lengths = model.features(wave, length)
    masked = model.spec_augment(x.expand(64, -1, -1), lengths.expand(64))
    zero_bands, zero_frames = (masked == 0).all(dim=1), (masked == 0).all(dim=2)
    assert zero_bands.any(1).float().mean() > 0.5 and zero_bands.sum(1).max() <= 2 * 27
    assert zero_frames.any(1).float().mean() > 0.5 and zero_frames.sum(1).max() <= 2 * 40
    unmasked = CTCModel(ModelConfig(**config, freq_masks=0, time_masks=0))
    unmasked.load_state_dict(model.state_dict())
    training = unmasked(wave, length)[0]
    torch.testing.assert_close(training, unmasked.eval()(wave, length)[0])


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


# ---------------------------------------------- data.py: text, corpora, audio, batches, error rates
def test_normalize_lowercases_and_counts_what_it_drops_and_folds():
    assert data.normalize("IT'S  Café-au-lait,\tno. 42!", ENGLISH) == ("it's cafe au lait no", 5, 1)
    assert data.normalize("Don\u2019t", ENGLISH) == ("don't", 0, 0)
    assert data.normalize("  ", ENGLISH) == ("", 0, 0)
    assert [data.VOCAB[i] for i in data.encode("it's a b", ENGLISH)] == list("it's a b")


VIETNAMESE = ("aàáảãạăằắẳẵặâầấẩẫậbcdđeèéẻẽẹêềếểễệghiìíỉĩịklmnoòóỏõọôồốổỗộơờớởỡợpqrstuùúủũụưừứửữựvxy"
              "ỳýỷỹỵ")


def test_another_alphabet_keeps_its_letters_and_reads_the_cases_that_trip_people():
    german, turkish = "abcdefghijklmnopqrstuvwxyzäöüß", "abcçdefgğhıijklmnoöprsştuüvyz"
    spanish = "abcdefghijklmnñopqrstuvwxyzáéíóú"
    assert data.normalize("Cà phê ĐÚNG", VIETNAMESE) == ("cà phê đúng", 0, 0)  # đ: a letter, not an accent
    combining = "tie\u0302\u0301ng Vie\u0323\u0302t"  # accents typed as marks: one symbol each
    assert data.normalize(combining, VIETNAMESE) == ("tiếng việt", 0, 0)
    assert data.normalize("Việt", VIETNAMESE.replace("ệ", "")) == ("viêt", 0, 1)  # one accent lost, not two
    assert data.normalize("Größe STRAẞE", german) == ("größe straße", 0, 0)
    assert data.normalize("Größe", turkish) == ("grösse", 0, 1)       # no ß: ss, as German writes it without
    assert data.normalize("IRMAK İstanbul ılık", turkish) == ("ırmak istanbul ılık", 0, 0)  # I -> ı, İ -> i
    assert data.normalize("KIRMIZI ŞAL", turkish) == ("kırmızı şal", 0, 0)  # all capitals, a Turkish letter
    # Turkish casing is the transcript's: an English line in a Turkish alphabet keeps its i; İ is i anywhere.
    assert data.normalize("FIVE NINE", turkish) == ("five nine", 0, 0)
    assert data.normalize("İstanbul", german) == ("istanbul", 0, 0)
    assert data.normalize("Niño, Ärger!", spanish) == ("niño arger", 2, 1)  # no ä: a; the , and ! dropped
    assert data.normalize("x-ray €", german) == ("x ray", 1, 0)
    assert data.normalize("e-mail and/or", german + "-/") == ("e-mail and/or", 0, 0)  # listed: kept
    # English by the same rules: accents stripped, ß folded to ss, other letters dropped.
    assert data.normalize("Größe café ılık đúng", ENGLISH) == ("grosse cafe lk ung", 3, 4)
    assert data.label_problem("room 101", "room", german) is not None
    assert data.label_problem("room 101", "room 101", german + "0123456789") is None


def test_an_alphabet_file_is_one_symbol_a_line_and_each_mistake_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("a\n\ne\u0301\nđ\n", encoding="utf-8")  # NFC: é is one symbol
    assert data.read_alphabet(tmp_path / "ok.txt") == "aéđ"
    cases = {"empty.txt": (b"\n \n", "no symbols"), "twice.txt": (b"a\nb\na\n", "line 3: 'a' is there twice"),
             "blank.txt": (b"a\n_\n", "CTC's blank"), "latin1.txt": ("é\n".encode("latin-1"), "not UTF-8"),
             "two.txt": (b"ab\n", "one symbol a line"), "upper.txt": ("É\n".encode(), "upper case")}
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as refused:
            data.read_alphabet(tmp_path / name)
        assert str(tmp_path / name) in str(refused.value) and problem in str(refused.value), name
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--alphabet", str(tmp_path / "empty.txt")])


def test_alphabet_auto_reads_turkish_casing_per_transcript_and_says_so(tmp_path):
    """One Turkish line must not turn an English corpus's I into ı; an all-capitals Turkish line keeps its ı,
    and İ leaves no lone combining dot to be taken as a symbol."""
    (tmp_path / "list.tsv").write_text("a.flac\tFIVE NINE\nb.flac\tKIRMIZI IŞIK\nc.flac\tİSTANBUL\n",
                                       encoding="utf-8")
    lines = []
    alphabet = data.alphabet_of(tmp_path / "list.tsv", lines.append)
    assert alphabet == "abefiklmnrstuvzış"
    assert "i:3" in lines[0] and "ı:5" in lines[0]  # five, nine, istanbul; kırmızı ışık
    assert "2 transcripts write Turkish letters" in lines[1]


def test_error_rates_are_corpus_level_edits_over_reference_length():
    assert data.edit_distance("kitten", "sitting") == 3
    assert data.edit_distance("", "abc") == 3 and data.edit_distance("abc", "abc") == 0
    assert data.edit_distance("the cat sat".split(), "the bat sat down".split()) == 2
    # 1 word edit in 4 words + 0 edits in 1 word = 20% (the mean of per-utterance WERs is 12.5%)
    wer, cer = data.error_rates(["a b c d", "e"], ["a x c d", "e"])
    assert wer == pytest.approx(20.0)
    assert cer == pytest.approx(100 * 1 / 8)


def test_librispeech_reader_and_tsv_manifest_resample_and_downmix(tmp_path):
    ids = write_librispeech(tmp_path / "ls", ["abc", "ija"])
    # A TSV corpus with an 8 kHz 24-bit file, a 44.1 kHz stereo file and a relative path.
    (tmp_path / "tsv").mkdir()
    soundfile.write(tmp_path / "tsv/low.wav", tones("abc", 8000), 8000, subtype="PCM_24")
    stereo = np.stack([tones("dead", 44100), np.zeros(len(tones("dead", 44100)), np.float32)], 1)
    soundfile.write(tmp_path / "tsv/stereo.flac", stereo, 44100)
    (tmp_path / "tsv/list.tsv").write_text("low.wav\tLow!\n" + f"{tmp_path}/tsv/stereo.flac\tStereo?\n")
    corpus = data.read_corpus([tmp_path / "ls", tmp_path / "tsv/list.tsv"], ENGLISH, log=lambda m: None)
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
    data.read_corpus(tmp_path / "ls", ENGLISH, log=lambda m: None)  # a copier's call: no cache written
    assert not (tmp_path / "cache").exists()
    data.read_corpus(tmp_path / "ls", ENGLISH, log=lambda m: None, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(soundfile, "info", lambda path: pytest.fail(f"header reread: {path}"))
    cached = data.read_corpus(tmp_path / "ls", ENGLISH, log=lambda m: None, cache_dir=tmp_path / "cache")
    assert len(cached) == 2


def test_a_librispeech_layout_folder_of_wav_or_mp3_files_is_read_as_flac_would_be(tmp_path):
    ids = write_librispeech(tmp_path / "ls", ["abc", "ija"])
    folder = tmp_path / "ls/19/198"
    for utt_id, suffix in zip(ids, (".wav", ".mp3")):
        wave = data.load_audio(folder / f"{utt_id}.flac").numpy()
        soundfile.write(folder / f"{utt_id}{suffix}", wave, 16000)
        (folder / f"{utt_id}.flac").unlink()
    corpus = data.read_corpus(tmp_path / "ls", ENGLISH, log=lambda m: None)  # one path, not a list
    assert [Path(u["path"]).name for u in corpus] == [f"{ids[0]}.wav", f"{ids[1]}.mp3"]


def test_of_two_audio_files_for_one_id_the_readable_one_is_used_and_named(tmp_path):
    """An .m4a kept beside the .wav converted from it: the .wav is read, and the log says so."""
    ids = write_librispeech(tmp_path / "ls", ["abc", "ija"])
    folder = tmp_path / "ls/19/198"
    for utt_id in ids:
        soundfile.write(folder / f"{utt_id}.wav", data.load_audio(folder / f"{utt_id}.flac").numpy(), 16000)
        (folder / f"{utt_id}.flac").rename(folder / f"{utt_id}.m4a")  # sorts first; soundfile reads no m4a
        (folder / f"{utt_id}.m4a").write_bytes(b"\0\0\0\x20ftypM4A " + bytes(100))
    lines = []
    corpus = data.read_corpus(tmp_path / "ls", ENGLISH, log=lines.append)
    assert [Path(u["path"]).name for u in corpus] == [f"{ids[0]}.wav", f"{ids[1]}.wav"]
    assert any("several audio files" in line and f"{ids[0]}.wav" in line for line in lines), lines
    assert not any("without transcript" in line for line in lines), lines


def test_odd_sample_rates_resample_through_a_small_filter(tmp_path, monkeypatch):
    """torchaudio's filter is (16000 / g) x (rate / g) for g = gcd: 13 GB for 3 s at 47,999 Hz exactly."""
    rates, real = [], torchaudio.functional.resample
    monkeypatch.setattr(torchaudio.functional, "resample",
                        lambda wave, rate, new: rates.append(rate) or real(wave, rate, new))
    for rate in (44101, 47999, 11127, 44100, 22050, 11025, 8000):
        soundfile.write(tmp_path / f"{rate}.wav", tones("abc", rate), rate)
        wave = data.load_audio(tmp_path / f"{rate}.wav")
        assert len(wave) == pytest.approx(len(tones("abc")), rel=0.006)  # at most 0.6% off in speed
    assert rates == [44100, 48000, 11100, 44100, 22050, 11025, 8000]  # common rates exact


def test_speech_with_a_dc_offset_or_mains_hum_is_not_called_silent():
    speech = torch.from_numpy(tones("abcabcjihg")) * 10 ** (-40 / 20)  # quiet: -52 dBFS at its peak
    assert not data.is_silent(speech + 0.005)  # a cheap converter's DC offset, 0.5% of full scale
    hum = torch.sin(2 * math.pi * 60 * torch.arange(len(speech)) / 16000)
    hum = hum * speech.square().mean().sqrt() * 10 ** (10 / 20) * 2 ** 0.5  # 10 dB above the speech
    assert not data.is_silent(speech + hum)
    assert data.is_silent(hum) and data.is_silent(torch.full((16000,), 0.005))  # hum or DC alone


def test_speech_under_a_steady_high_pitched_noise_is_not_called_silent():
    """A whine or hiss above the formants, 10 dB below the speech, leaves it speech: a first difference
    of the samples, which tilts the spectrum 6 dB an octave, raised the whine over the words."""
    speech = torch.from_numpy(tones("abcabcab"))  # 300-470 Hz, as voiced speech's strongest harmonics
    speech = speech / speech.square().mean().sqrt() * 10 ** (-26 / 20)
    whine = torch.sin(2 * math.pi * 6000 * torch.arange(len(speech)) / 16000)
    whine = whine * speech.square().mean().sqrt() * 10 ** (-10 / 20) * 2 ** 0.5
    assert not data.is_silent(speech + whine) and data.is_silent(whine)


def test_every_module_imports_and_trains_flags_without_linux_only_calls():
    """macOS has no os.sched_getaffinity nor /proc/cpuinfo: every module still imports, and train.py's
    defaults (workers, bf16) come out."""
    script = (
        "import os, pathlib, sys\n"
        "del os.sched_getaffinity\n"
        "real = pathlib.Path.read_text\n"
        "def read_text(self, *a, **k):\n"
        "    if str(self).startswith('/proc'):\n"
        "        raise FileNotFoundError(str(self))\n"
        "    return real(self, *a, **k)\n"
        "pathlib.Path.read_text = read_text\n"
        "import model, data, health, runs, train, decode, lm, download, ablation, plot, conditions\n"
        "args = train.build_parser().parse_args(['--device', 'cpu'])\n"
        "import contextlib\n"
        "print(args.workers, train.setup_device(args, 1, contextlib.ExitStack())[1])\n")
    done = run_script("-c", script)
    assert done.returncode == 0 and done.stdout.split() == [str(min(4, os.cpu_count())), "False"], done.stderr


def test_data_py_docstring_shows_every_step_a_copier_needs():
    """Followed as written, the example must reshuffle each epoch and drop what CTC cannot align."""
    assert "set_epoch(epoch)" in data.__doc__ and "filter_trainable(" in data.__doc__


def test_missing_or_empty_data_paths_exit_naming_the_path_and_layouts(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _, dev_dir = make_corpus(tmp_path, 1, 2)
    for bad in [tmp_path / "nowhere", tmp_path / "empty"]:
        with pytest.raises(InputError) as exit_info:
            train.train(["--data", str(bad), "--dev", str(dev_dir), "--run-dir", str(tmp_path / "run"),
                         *TINY])
        assert str(bad) in str(exit_info.value) and "LibriSpeech-layout" in str(exit_info.value)
        assert "TSV manifest" in str(exit_info.value)


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
    corpus = data.read_corpus([tmp_path / "corpus"], ENGLISH, log=log.append)
    assert sorted(u["text"] for u in corpus) == ["abc", "de", "fg"]
    assert any("folder not readable: 1" in m and str(tmp_path / "corpus/9") in m for m in log)
    # Manifests: a byte-order mark is ignored; text that is not UTF-8 names its file and line.
    soundfile.write(tmp_path / "a.wav", tones("abc"), 16000)
    (tmp_path / "bom.tsv").write_text("\ufeffa.wav\tABC\n", encoding="utf-8")
    bom = data.read_corpus([tmp_path / "bom.tsv"], ENGLISH, log=lambda m: None)
    assert [u["text"] for u in bom] == ["abc"]
    (tmp_path / "latin1.tsv").write_bytes("a.wav\tABC\na.wav\tCAF\u00c9\n".encode("latin-1"))
    (tmp_path / "binary.tsv").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for path, line in [(tmp_path / "latin1.tsv", 2), (tmp_path / "binary.tsv", 1)]:
        with pytest.raises(data.InputError) as error:
            data.read_corpus([path], ENGLISH, log=lambda m: None)
        assert f"{path}:{line}: not UTF-8" in str(error.value)


def test_manifests_have_two_columns_digits_are_skipped_and_ids_are_unique(tmp_path, capsys):
    soundfile.write(tmp_path / "a.flac", tones("abc"), 16000)
    (tmp_path / "three.tsv").write_text("a.flac\t3.40\tabc\n")
    with pytest.raises(data.InputError, match=r"three.tsv:1: expected two tab-separated columns"):
        data.read_corpus([tmp_path / "three.tsv"], ENGLISH)
    with pytest.raises(data.InputError, match="is an audio file"):
        data.read_corpus([tmp_path / "a.flac"], ENGLISH)
    (tmp_path / "mixed.txt").write_text("a.flac\tabc\na.flac\troom 101\n")  # any name but .flac/.wav
    corpus = data.read_corpus([tmp_path / "mixed.txt"], ENGLISH)
    assert [u["text"] for u in corpus] == ["abc"]
    assert "transcript holds digits (spell numbers out): 1" in capsys.readouterr().out
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "m.pt")
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


def test_unusable_audio_says_why_and_decode_skips_too_short_clips(tmp_path):
    soundfile.write(tmp_path / "nan.wav", np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    soundfile.write(tmp_path / "short.flac", tones("a")[:160], 16000)  # 10 ms
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    problems = {name: data.load_usable_audio(tmp_path / name)[1]
                for name in ["nan.wav", "silent.wav", "short.flac", "folder.wav", "loop.wav"]}
    assert problems == {"nan.wav": "NaN or infinite samples", "silent.wav": data.SILENT,
                        "short.flac": data.TOO_SHORT, "folder.wav": "a folder, not a recording",
                        "loop.wav": "a link that leads nowhere (or around in a loop)"}
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "m.pt")
    short = run_script("decode.py", tmp_path / "m.pt", tmp_path / "short.flac")
    assert short.returncode != 0 and "Traceback" not in short.stderr
    assert "short.flac" in short.stderr and "shorter than one analysis window" in short.stderr
    not_a_checkpoint = run_script("decode.py", tmp_path / "short.flac", tmp_path / "short.flac")
    assert not_a_checkpoint.returncode != 0 and "Traceback" not in not_a_checkpoint.stderr
    assert "not a PyTorch checkpoint" in not_a_checkpoint.stderr


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


# ----------------------------------------------------- runs.py: the run folder, checkpoints, resume
def test_a_checkpoint_from_before_alphabets_and_norm_range_db_decodes_as_it_did(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2, norm_range_db=0.0,
                                 reference_ms=10, floor_db=0.0)).eval()
    old = model_checkpoint(model)
    for key in ("alphabet", "norm_range_db", "reference_ms", "floor_db"):
        del old["model_config"][key]
    old["model_config"]["vocab_size"] = len(data.VOCAB)
    runs.save_checkpoint(old, tmp_path / "old.pt")
    rebuilt, _ = build_from_checkpoint(tmp_path / "old.pt")
    assert (rebuilt.config.alphabet, rebuilt.config.norm_range_db) == (ENGLISH, 0.0)
    assert (rebuilt.config.reference_ms, rebuilt.config.floor_db) == (10, 0.0)  # the features it trained on
    assert rebuilt.vocab == data.VOCAB
    waves = torch.from_numpy(tones("abcab"))[None]
    torch.testing.assert_close(rebuilt.eval()(waves, torch.tensor([waves.shape[1]]))[0],
                               model(waves, torch.tensor([waves.shape[1]]))[0])


def test_init_from_loads_every_tensor_that_fits_and_each_output_row_of_a_symbol_both_write():
    torch.manual_seed(0)
    english = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    start, theirs = model_checkpoint(english), english.state_dict()
    for alphabet in (ENGLISH, "".join(FOREIGN.values()) + "ab", ENGLISH[::-1], ENGLISH.replace("q", "")):
        model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2, alphabet=alphabet))
        fresh, new_symbols = runs.load_matching(model, start)
        assert fresh == [] and new_symbols == [s for s in model.vocab if s not in english.vocab]
        for name, tensor in model.state_dict().items():
            if not name.startswith("output."):
                assert torch.equal(tensor, theirs[name]), name
        for row, symbol in enumerate(model.vocab):  # blank, space, a and b keep theirs in any order
            same = torch.equal(model.output.weight[row], english.output.weight[english.vocab.index(symbol)]) \
                if symbol in english.vocab else False
            assert same == (symbol in english.vocab), (alphabet, symbol)


def test_checkpoint_round_trip_rebuilds_an_identical_model(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=2, rnn_hidden=16, conv_channels=4)).eval()
    runs.save_checkpoint({**model_checkpoint(model), "note": [1, "x"]}, tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)  # plain types and tensors only
    rebuilt, _ = build_from_checkpoint(tmp_path / "m.pt")
    wave = torch.randn(2, 12000)
    lengths = torch.tensor([12000, 8000])
    torch.testing.assert_close(rebuilt.eval()(wave, lengths)[0], model(wave, lengths)[0], atol=0, rtol=0)


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
    # A stopped two-process run is continued as it was launched, not with `python train.py --resume`.
    (tmp_path / "two").mkdir()
    torch.save({"world_size": 2}, tmp_path / "two/last.pt")
    with pytest.raises(InputError, match="torchrun --standalone --nproc_per_node=2 train.py --resume"):
        runs.check_run_dir(tmp_path / "two", False)


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
        assert f"{flag} cannot be typed with it, even unchanged" in str(refused.value)


def test_resume_continues_model_optimizer_schedule_and_data_order_exactly(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 40, 6)
    flags = ["--epochs", "2", "--eval-every", "4", "--freq-warp", "0.1", "--freq-masks", "1",
             "--time-masks", "1",
             "--rnn-layers", "2"]
    trace = []  # (lr, utterance ids) per step
    real_lr, real_step = train.learning_rate, train.train_step
    monkeypatch.setattr(train, "train_step", lambda run, model, batch, step:
                        trace.append(batch["ids"]) or real_step(run, model, batch, step))

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
    # Each step's lr, then its batch: the same sequence straight and across the resume.
    assert trace == straight
    a = torch.load(tmp_path / "straight/last.pt", weights_only=True)
    b = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for weights in ("model", "trained_model"):  # the moving average (the default) and what AdamW trains
        for name in a[weights]:
            torch.testing.assert_close(a[weights][name], b[weights][name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], atol=1e-6, rtol=1e-5)


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(lines)
                                       + '{"step": 9, "lo')  # cut short by a kill -9
    runs.keep_metrics_until(5, run / "metrics.jsonl", run)
    kept = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2, 3, 4, 5]


def test_resume_refuses_missing_corrupt_or_incompatible_checkpoints_untouched(tmp_path, stopped_run):
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
             (tmp_path / "run/last.pt", ["--lr", "0.5", "--eval-every", "7"], "--lr cannot be typed with it")]
    files_before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for path, flags, problem in cases:
        with pytest.raises(InputError) as exit_info:
            train.train(["--resume", str(path), *flags])
        assert str(path) in str(exit_info.value) and problem in str(exit_info.value)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files_before


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
    assert "trained in 1 process, this is 2" in str(size.value)
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


def test_resume_checks_weights_and_optimizer_before_the_folder_is_touched(tmp_path, stopped_run):
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


def test_resume_checks_transcripts_and_follows_a_moved_corpus(tmp_path, trained_once, stopped_run):
    moved = tmp_path / "moved-train"
    shutil.copytree(trained_once / "train", moved)  # the run's corpus, somewhere else now
    resume = ["--resume", str(stopped_run / "last.pt"), "--max-minutes", "1e-9", "--data", str(moved)]
    trans = next(moved.rglob("*.trans.txt"))
    original = trans.read_text()
    trans.write_text(original.replace(original.split()[1], "JJJ", 1))  # same ids and audio, a new text
    with pytest.raises(InputError) as edited:
        train.train(resume)
    assert "training data (--data) changed" in str(edited.value)
    trans.write_text(original)
    with pytest.raises(InputError) as missing:
        train.train(resume + ["--data", str(tmp_path / "nowhere")])
    assert "no such file" in str(missing.value) and "If they moved" in str(missing.value)
    with pytest.raises(InputError) as other:  # another corpus at the new place is refused
        train.train(resume + ["--data", str(trained_once / "dev")])
    assert "changed" in str(other.value)
    train.train(resume)
    assert torch.load(stopped_run / "last.pt", weights_only=True)["step"] == 2


def test_resume_refuses_a_checkpoint_of_an_older_train_py_or_a_foreign_pickle(tmp_path, stopped_run):
    old = torch.load(tmp_path / "run/last.pt", weights_only=True)
    del old["train_config"]["max_minutes"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(InputError) as older:
        train.train(["--resume", str(tmp_path / "old.pt"), "--run-dir", str(tmp_path / "branch")])
    assert "older train.py, before --max-minutes existed" in str(older.value)
    assert "--init-from" in str(older.value)
    assert not (tmp_path / "branch").exists()
    torch.save({"config": argparse.Namespace(lr=1)}, tmp_path / "pickle.pt")  # runs code when unpickled
    for command in (lambda: train.train(["--resume", str(tmp_path / "pickle.pt")]),
                    lambda: runs.build_from_checkpoint(tmp_path / "pickle.pt")):
        with pytest.raises(InputError) as foreign:
            command()
        assert "not a checkpoint written by train.py" in str(foreign.value)
        assert "weights_only=False" not in str(foreign.value)


# ------------------------------------------ train.py: the loop, its health checks and skipped steps
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


def test_the_moving_average_is_what_is_evaluated_saved_and_decoded(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 20, 4)
    # float32, as decode.py on a CPU: a one-step model's output is noise, which bf16 would move
    flags = train_flags(train_dir, dev_dir, tmp_path / "run", "--ema-decay", "0.5", "--max-minutes", "1e-9",
                        "--no-bf16")
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


def test_non_finite_steps_are_skipped_and_a_diverged_run_stops_with_advice(tmp_path, monkeypatch, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 40, 3)
    real_ctc_loss, calls = train.F.ctc_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real_ctc_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) % 3 == 0 or always_nan else loss
    monkeypatch.setattr(train.F, "ctc_loss", sometimes_nan)
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


def test_a_dev_set_of_only_unusable_files_is_refused_not_scored_zero(tmp_path):
    train_dir, dev_dir = make_corpus(tmp_path, 8, 2)
    for flac in dev_dir.rglob("*.flac"):
        soundfile.write(flac, np.zeros(16000, np.float32), data.SAMPLE_RATE)  # digital silence
    with pytest.raises(InputError) as nothing:
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--eval-every", "1"))
    assert "none of its utterances could be scored" in str(nothing.value)
    assert not (tmp_path / "run/best.pt").exists()


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


def test_init_from_starts_a_new_run_from_a_model_which_resumes_like_any_other(tmp_path, trained_once, capsys):
    start = trained_once / "run/last.pt"
    (tmp_path / "abc.txt").write_text("\n".join("abcdefghij"))  # the tones' letters only: another alphabet
    flags = train_flags(trained_once / "train", trained_once / "dev", tmp_path / "run", "--init-from", start,
                        "--alphabet", tmp_path / "abc.txt", "--lr", "1e-12", "--epochs", "3",
                        "--ema-decay", "0", "--max-minutes", "1e-9")
    train.train(flags)  # one step, at a rate too small to move a weight
    assert "initialized afresh: none; output rows afresh for 0 of 12 symbols" in capsys.readouterr().out
    before, after = (torch.load(p, weights_only=True) for p in (start, tmp_path / "run/last.pt"))
    for name, tensor in after["model"].items():
        if not name.startswith("output."):
            torch.testing.assert_close(tensor, before["model"][name])
    rows = [before["vocab"].index(symbol) for symbol in after["vocab"]]  # a-j, blank, space: English's rows
    torch.testing.assert_close(after["model"]["output.weight"], before["model"]["output.weight"][rows])
    assert after["model"]["output.weight"].shape[0] == 12 and after["step"] == 1
    assert after["run_id"] != before["run_id"] and after["train_config"]["alphabet"] == "abcdefghij"
    origin = {"checkpoint": str(start), "run_id": before["run_id"], "step": before["step"]}
    assert after["started_from"] == origin
    train.train(["--resume", str(tmp_path / "run/last.pt"), "--max-minutes", "1e-9"])
    resumed = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert resumed["step"] == 2 and resumed["started_from"] == after["started_from"]
    assert resumed["run_id"] == after["run_id"]


def test_init_from_refuses_what_would_not_start_from_that_model(tmp_path, trained_once):
    start = trained_once / "run/last.pt"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    ablation_row = model_checkpoint(CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=32, conv_channels=4)))
    ablation_row["model_config"]["features"] = "log"
    runs.save_checkpoint(ablation_row, tmp_path / "row.pt")
    lacking = model_checkpoint(CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=32, conv_channels=4)))
    del lacking["model"]["output.weight"]
    runs.save_checkpoint(lacking, tmp_path / "lacking.pt")
    flags = train_flags(trained_once / "train", trained_once / "dev", tmp_path / "run")
    cases = [(["--init-from", start, "--rnn-hidden", "64"], "its model has --rnn-hidden 32"),
             (["--init-from", start, "--time-stride", "4"], "--time-stride 4 would be another model"),
             (["--init-from", start, "--resume", start], "--resume continues a run"),
             (["--init-from", tmp_path / "notes.pt"], "notes.pt: not a PyTorch checkpoint"),
             (["--init-from", tmp_path / "row.pt"], "the checkpoint of an ablation.py row"),
             (["--init-from", tmp_path / "lacking.pt"], 'Missing key(s) in state_dict: "output.weight"'),
             (["--init-from", tmp_path], f"{tmp_path / 'best.pt'}: no such file")]  # a folder: its best.pt
    for extra, problem in cases:
        with pytest.raises(InputError) as refused:
            train.train(flags + list(map(str, extra)))
        assert problem in str(refused.value), extra
    assert not (tmp_path / "run").exists()
    # A recipe's flag gives way even when it comes after the typed one, which alone is held to the model.
    (tmp_path / "stride4.args").write_text("--time-stride 4\n")
    args = train.resolve_args(flags + ["--init-from", str(start), "--time-stride", "2",
                                       f"@{tmp_path / 'stride4.args'}"], 1, lambda line: None)[0]
    assert args.time_stride == 2


def test_an_empty_checkpoint_or_run_folder_flag_is_refused_not_read_as_absent(tmp_path, capsys):
    """--init-from "$CKPT" with CKPT unset must not train from scratch without a word."""
    for flag in ("--init-from", "--resume", "--run-dir"):
        with pytest.raises(SystemExit):
            train.train(["--data", str(tmp_path), "--dev", str(tmp_path), flag, ""])
        assert f"{flag}: an empty path (an unset variable?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode.main(["", str(tmp_path)])
    assert "an empty path" in capsys.readouterr().err


def test_round_6_mistakes_are_named_for_what_they_are(tmp_path, trained_once, capsys):
    soundfile.write(tmp_path / "a.flac", tones("ab"), 16000)
    with pytest.raises(InputError, match="is an audio file, not a corpus"):
        data.alphabet_of(tmp_path / "a.flac")  # --alphabet auto --data a.flac
    with pytest.raises(lm.DownloadError, match="auto is train.py's"):
        lm.model_alphabet("auto")
    shutil.copy(trained_once / "run/last.pt", tmp_path / "best.pth")  # a checkpoint by its content
    assert lm.model_alphabet(str(tmp_path / "best.pth")) == ENGLISH
    (tmp_path / "tr.txt").write_text("a\nİ\n", encoding="utf-8")
    with pytest.raises(InputError, match="write 'i'"):
        data.read_alphabet(tmp_path / "tr.txt")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--norm-range-db", "1e-9"])
    assert "(or 0: off)" in capsys.readouterr().err
    symbols = "".join(chr(0x4E00 + i) for i in range(3000))  # a logographic script's transcripts
    (tmp_path / "cjk.tsv").write_text("".join(f"{i}.flac\t{symbols[i:i + 30]}\n" for i in range(0, 3000, 10)),
                                      encoding="utf-8")
    lines = []
    assert len(data.alphabet_of(tmp_path / "cjk.tsv", lines.append)) == 3000
    assert sum(map(len, lines)) < 5000 and "the 200 commonest" in lines[0]
    assert "not written yet" in runs.diverged_message(argparse.Namespace(lr=1.0), tmp_path, 1, 21)
    interval = health.LogInterval(torch.device("cpu"))
    interval.count("not finite", 3.0)
    assert "loss nan" in interval.report(0, 5, 10, 1e-3, 60)[0]  # no finite step, not a loss of 0
    (tmp_path / "run").mkdir()
    (tmp_path / "run/last.pt.4242.tmp").write_bytes(bytes(100))  # a save killed midway
    runs.claim_run_dir(argparse.Namespace(run_dir=str(tmp_path / "run")), False).close()
    assert not (tmp_path / "run/last.pt.4242.tmp").exists()


def test_diagnose_names_a_stuck_run_and_stays_quiet_on_a_healthy_one():
    assert health.diagnose(["", ""], [100.0], 50, 100) is None            # in warmup
    assert health.diagnose(["", ""], [100.0, 100.0], 200, 100) is None   # blank plateau: normal
    assert health.diagnose(["s", "ss"], [100.0, 96.0], 200, 100) is None  # its first letters: normal
    assert "all blank" in health.diagnose(["", ""], [100.0] * 2, 301, 100)
    assert "collapsed to 'ht'" in health.diagnose(["ttthhh", "th"], [90.0, 80.0], 400, 100)
    stalled = health.diagnose(["the cat"], [90.0, 50.0, 51.0, 52.0, 50.5], 900, 100)
    assert "not improved in 3 evaluations" in stalled and "--overfit" in stalled
    assert health.diagnose(["the cat"], [90.0, 50.0, 51.0, 52.0, 49.0], 900, 100) is None
    # A run at (or within a point of) 0% has converged: no stalled-run warning and list of bugs.
    assert health.diagnose(["the cat"], [90.0, 0.0, 0.0, 0.0, 0.0], 900, 100) is None
    assert health.diagnose(["the cat"], [90.0, 0.8, 0.9, 0.8, 0.8], 900, 100) is None


# ----------------------------------------------------------- train.py: Ctrl-C, SIGTERM, time limits
def test_sigterm_before_the_first_step_says_nothing_was_trained():
    script = ("import os, signal, train\n"
              "train.train = lambda argv: os.kill(os.getpid(), signal.SIGTERM)  # while reading the data\n"
              "train.main([])\n")
    done = run_script("-c", script)
    assert done.returncode == 1 and "interrupted while starting" in done.stderr, done.stderr


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


def stop_during_scoring(monkeypatch, scored_steps):
    """greedy_corpus, patched to meet Ctrl-C as it starts, and to record what last.pt holds then."""
    real_scoring = train.greedy_corpus

    def scoring(model, batches, *args):
        os.kill(os.getpid(), signal.SIGINT)
        scored_steps.append(len(list(batches)))  # the dev batches scored after the signal
        return real_scoring(model, [], *args)
    monkeypatch.setattr(train, "greedy_corpus", scoring)


def test_a_stop_during_an_evaluation_saves_at_once_and_the_resume_evaluates_first(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 30, 3)
    scored = []
    stop_during_scoring(monkeypatch, scored)
    with pytest.raises(train.Stopped):  # torchrun kills 30 s after a signal: a dev set must not wait
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "5", "--eval-every", "3",
                                "--save-every", "1000"))
    assert scored == [0]  # abandoned: no dev batch was scored after the signal
    last = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert last["step"] == 3 and last["eval_pending"] and not (tmp_path / "run/best.pt").exists()
    monkeypatch.undo()
    train.train(["--resume", str(tmp_path / "run/last.pt"), "--max-minutes", "1e-9"])
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "dev_cer" in r] == [3, 4]  # redone before the next step
    assert (tmp_path / "run/best.pt").exists()


def test_a_stop_during_the_final_evaluation_saves_and_its_resume_only_scores(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)  # one step per epoch
    scored = []
    stop_during_scoring(monkeypatch, scored)
    with pytest.raises(train.Stopped):
        train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "2", "--eval-every", "5"))
    last = torch.load(tmp_path / "run/last.pt", weights_only=True)
    assert scored == [0] and (last["step"], last["epoch"], last["eval_pending"]) == (2, 2, True)
    monkeypatch.undo()
    train.train(["--resume", str(tmp_path / "run/last.pt")])  # a finished run, but not yet scored
    assert torch.load(tmp_path / "run/best.pt", weights_only=True)["step"] == 2
    assert not torch.load(tmp_path / "run/last.pt", weights_only=True)["eval_pending"]
    with pytest.raises(InputError, match="finished its 2 epochs"):
        train.train(["--resume", str(tmp_path / "run/last.pt")])


def test_a_time_limit_on_the_last_step_finishes_the_run(tmp_path, capsys):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)  # 4 short utterances: one step per epoch
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--max-minutes", "1e-9"))
    assert "Continue with" not in capsys.readouterr().out
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(InputError, match="finished its 1 epochs"):
        train.train(["--resume", str(tmp_path / "run/last.pt")])


def test_a_loop_that_raises_gives_ctrl_c_and_sigterm_back(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)

    def broken_forward(*args):
        raise RuntimeError("a mistake inside the loop")
    monkeypatch.setattr(train, "forward", broken_forward)
    with pytest.raises(RuntimeError):
        train.train(train_flags(train_dir, dev_dir, tmp_path / "raised", "--epochs", "1"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_duration_cache_of_the_wrong_shape_is_rewritten(tmp_path):
    train_dir, _ = make_corpus(tmp_path, 4, 2)
    cache = runs.cache_dir()
    data.read_corpus([train_dir], ENGLISH, log=lambda m: None, cache_dir=cache)
    for cache_file in cache.iterdir():
        cache_file.write_text("[]")  # valid JSON of the wrong shape: ignored and rewritten
    assert len(data.read_corpus([train_dir], ENGLISH, log=lambda m: None, cache_dir=cache)) == 4
    assert all(isinstance(json.loads(f.read_text()), dict) for f in cache.iterdir())


def test_an_interrupt_at_start_up_says_nothing_was_trained_or_downloaded(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 4, 2)

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


def test_ctrl_c_that_reaches_workers_as_they_start_does_not_break_the_run(tmp_path, monkeypatch):
    train_dir, dev_dir = make_corpus(tmp_path, 6, 2)
    real = runs.ignore_signals

    def interrupted_first(worker_id):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaches the new worker before it can ignore it
        real(worker_id)
    monkeypatch.setattr(runs, "ignore_signals", interrupted_first)
    train.train(train_flags(train_dir, dev_dir, tmp_path / "run", "--epochs", "1", "--workers", "1"))
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["epoch"] == 1


# ------------------------------------------------------- train.py under torchrun: two CPU processes
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
    seconds = [u["seconds"] for u in data.read_corpus([train_dir], ENGLISH, log=lambda m: None)]
    sampler = data.BucketBatches(seconds, 6.0, world_size=2)
    assert len(sampler) == len(data.BucketBatches(seconds, 6.0)) // 2
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 2 * len(sampler)


def test_under_torchrun_each_process_takes_its_own_gpu_whatever_cuda_device_is_named(monkeypatch):
    """--device cuda:0 (not only cuda) under torchrun: NCCL on the process's own GPU, found from RANK where
    the launcher sets no LOCAL_RANK; bf16 only where the GPU computes it, not in emulation."""
    taken = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", taken.append)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(train.dist, "init_process_group", taken.append)
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with contextlib.ExitStack() as cleanup:
        device, bf16 = train.setup_device(argparse.Namespace(device="cuda:0", bf16=None), 4, cleanup)
    assert device == torch.device("cuda", 1) and taken == [device, "nccl"] and bf16 is False


def test_two_ranks_resume_exactly_with_augmentation_each_rank_its_own_random_state(tmp_path):
    """Speed perturbation, the frequency warp and masks draw from each rank's generator, and the ranks'
    batches differ in size, so their states differ: a resume must give each rank its own back."""
    train_dir, dev_dir = make_corpus(tmp_path, 24, 2)
    augment = ["--epochs", "2", "--eval-every", "100", "--speed-perturb", "--freq-warp", "0.1",
               "--freq-masks", "1", "--time-masks", "1"]

    def spawn(flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(train_one_rank, args=(flags, port, tmp_path), nprocs=2)
    spawn(train_flags(train_dir, dev_dir, tmp_path / "straight", *augment))
    spawn(train_flags(train_dir, dev_dir, tmp_path / "split", *augment, "--max-minutes", "1e-9"))
    stopped = torch.load(tmp_path / "split/last.pt", weights_only=True)
    assert stopped["step"] == 1 and len(stopped["rng_cpu"]) == 2
    assert not torch.equal(stopped["rng_cpu"][0], stopped["rng_cpu"][1])
    spawn(["--resume", str(tmp_path / "split/last.pt"), "--max-minutes", "1e9"])
    a, b = (torch.load(tmp_path / f"{run}/last.pt", weights_only=True) for run in ("straight", "split"))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    for name in a["trained_model"]:
        torch.testing.assert_close(a["trained_model"][name], b["trained_model"][name], atol=1e-6, rtol=1e-5)


def test_torchrun_two_processes_finish_and_time_out_with_status_0_and_refuse_a_live_folder(tmp_path):
    """The README's two-process form, as a user runs it: a finished run and a --max-minutes run end with
    status 0 every time (the ranks leave together, the DDP model freed before the process group), and a
    second launch on a live run's folder gets rank 0's one error line, no rank 1 traceback."""
    train_dir, dev_dir = make_corpus(tmp_path, 16, 2)

    def torchrun(run_dir, *extra, **popen):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "train.py", *train_flags(train_dir, dev_dir, run_dir, "--eval-every", "2", *extra)]
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **popen)
    timed = torchrun(tmp_path / "timed", "--epochs", "50", "--max-minutes", "1e-9")  # failed every time
    out = timed.communicate(timeout=120)[0]
    assert timed.returncode == 0, out
    assert "--max-minutes 1e-09 reached" in out and "--standalone --nproc_per_node=2" in out
    finished = torchrun(tmp_path / "finished", "--epochs", "2")
    assert finished.wait(timeout=120) == 0, finished.stdout.read()
    assert torch.load(tmp_path / "finished/last.pt", weights_only=True)["epoch"] == 2
    (tmp_path / "live").mkdir()
    with open(tmp_path / "live/train.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp_path / "live/metrics.jsonl").write_text("")
        refused = torchrun(tmp_path / "live", "--epochs", "1")
        out = refused.communicate(timeout=120)[0]
    assert refused.returncode != 0 and "A training process is using it now" in out
    assert 'train.py", line' not in out and "Connection reset" not in out and out.count("error: ") == 1, out


# ------------------------------------------ decode.py: transcripts, scores, beam search, word times
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


def test_decode_reports_each_bad_input_and_fails_only_if_nothing_decoded(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    checkpoint = tmp_path / "m.pt"
    runs.save_checkpoint(model_checkpoint(model), checkpoint)
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


def test_mp3_ogg_and_opus_decode_as_their_own_samples_whatever_the_name(tmp_path, capsys):
    """Audio is told by content: MP3, Ogg Vorbis and Opus files (one named .dat) decode to the transcript of
    the samples they hold, written losslessly; text named .flac and an M4A-like binary get messages that
    say what works; progress goes to stderr only, so stdout is the same with and without it."""
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    checkpoint = tmp_path / "m.pt"
    runs.save_checkpoint(model_checkpoint(model), checkpoint)
    wave, codecs = tones("abcabcjihg"), []
    for name, kind in (("talk.mp3", {}), ("talk.ogg", {}), ("note.dat", dict(format="OGG", subtype="OPUS"))):
        soundfile.write(tmp_path / name, wave, 16000, **kind)
        lossless = tmp_path / f"{name}.as-decoded.wav"
        soundfile.write(lossless, data.load_audio(tmp_path / name).numpy(), 16000, subtype="FLOAT")
        codecs.append(tmp_path / name)

    def decode_main(*argv):
        decode.main([str(checkpoint), *map(str, argv)])
        return capsys.readouterr()
    for codec in codecs:
        assert decode_main(codec).out == decode_main(f"{codec}.as-decoded.wav").out
    (tmp_path / "text.flac").write_text("hello\n")
    (tmp_path / "voice.m4a").write_bytes(b"\0\0\0\x20ftypM4A \0\0\0\0" + bytes(range(256)) * 4)
    with pytest.raises(SystemExit, match="nothing was decoded"):
        decode_main(tmp_path / "text.flac", tmp_path / "voice.m4a")
    err = capsys.readouterr().err
    assert "text.flac: unreadable audio" in err and "voice.m4a: unreadable audio" in err
    hints = [line for line in err.splitlines() if "ffmpeg -i IN -ar 16000 -ac 1 OUT.flac" in line]
    assert len(hints) == 1 and "voice.m4a" in hints[0]  # a broken FLAC needs no converter
    shown, quiet = decode_main(*codecs), decode_main(*codecs, "--quiet")
    assert shown.out == quiet.out and len(shown.out.splitlines()) == 3
    assert "decoded 3/3 recordings" in shown.err and "decoded" not in quiet.err


def test_quiet_speech_is_decoded_and_silence_is_said_per_file(tmp_path):
    """Level does not decide silence: speech 70 dB down is decoded; digital silence and a dither floor
    decode to nothing, each named on stderr and counted."""
    torch.manual_seed(0)
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    checkpoint = tmp_path / "m.pt"
    runs.save_checkpoint(model_checkpoint(model), checkpoint)
    wave = tones("abcabcjihg")
    soundfile.write(tmp_path / "loud.wav", wave, 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "quiet.wav", wave * 10 ** (-70 / 20), 16000, subtype="PCM_24")
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "floor.wav", (rng.random(32000) - rng.random(32000)) / 32768, 16000)
    soundfile.write(tmp_path / "zeros.wav", np.zeros(16000), 16000)
    names = ("loud", "quiet", "floor", "zeros")
    result = run_script("decode.py", checkpoint, *(tmp_path / f"{name}.wav" for name in names))
    lines = dict(line.split("\t") for line in result.stdout.splitlines())
    assert result.returncode == 0 and lines["floor"] == lines["zeros"] == ""
    assert "quiet.wav" not in result.stderr and "loud.wav" not in result.stderr  # decoded, not gated
    assert "floor.wav: silent" in result.stderr and "zeros.wav: silent" in result.stderr
    assert "2 of 4 recordings were silent" in result.stderr


def random_checkpoint(path):
    torch.manual_seed(0)
    runs.save_checkpoint(model_checkpoint(CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))),
                         path)
    return path


def test_an_interrupt_prints_every_transcript_decoded_and_progress_counts_decoded_audio(
        tmp_path, monkeypatch, capsys):
    checkpoint = random_checkpoint(tmp_path / "m.pt")
    names = ("first", "long", "short1", "short2")  # "first" fills the first window, a batch, alone
    for name, text in zip(names, ("ab", "abcabcjihgabcabcjihg", "abc", "jih")):
        soundfile.write(tmp_path / f"{name}.wav", tones(text), 16000)
    real_transcribe, calls, advanced = decode.transcribe, [], []

    def interrupted_third(*args):  # in the second window the short two are decoded first, held for "long"
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_transcribe(*args)
    monkeypatch.setattr(decode, "transcribe", interrupted_third)
    real_advance = decode.ProgressLine.advance
    monkeypatch.setattr(decode.ProgressLine, "advance",
                        lambda self, *counts: advanced.append(counts[0]) or real_advance(self, *counts))
    with pytest.raises(SystemExit) as stop:
        decode.main([str(checkpoint), *(str(tmp_path / f"{n}.wav") for n in names), "--batch-seconds", "2",
                     "--workers", "0"])
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert printed[0] == "first" and sorted(printed[1:]) == ["short1", "short2"]
    assert advanced == [1, 2] and "interrupted" in str(stop.value)


def test_decode_scores_a_librispeech_layout_folder_of_wav_files(tmp_path, capsys):
    ids = write_librispeech(tmp_path / "ls", ["abc", "ija"])
    for utt_id in ids:
        flac = tmp_path / f"ls/19/198/{utt_id}.flac"
        soundfile.write(flac.with_suffix(".wav"), data.load_audio(flac).numpy(), 16000)
        flac.unlink()
    decode.main([str(random_checkpoint(tmp_path / "m.pt")), str(tmp_path / "ls"), "--workers", "0"])
    out, err = capsys.readouterr()
    assert "no such file" not in err and "2 utterances with references" in err and "could not" not in err
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == ids


def test_decode_decodes_every_recording_whatever_its_transcript_and_counts_what_it_cannot(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "m.pt")
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


def test_decode_of_a_best_pt_not_yet_written_points_to_last_pt(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/last.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as missing:
        decode.main([str(tmp_path / "run/best.pt"), "x.flac"])
    assert "no evaluation has run yet" in str(missing.value)
    assert str(tmp_path / "run/last.pt") in str(missing.value)


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


def test_decoding_takes_the_models_symbols_never_english_by_default():
    """A copier who decodes an xyz model without its symbols must get an error, not English's letters."""
    log_probs = torch.full((1, 4, 5), -10.0)
    log_probs[0, [0, 1, 2, 3], [2, 0, 3, 4]] = 0.0  # x _ y z
    for decode_greedy in (greedy_decode, greedy_spans):
        with pytest.raises(TypeError):
            decode_greedy(log_probs, torch.tensor([4]))
    assert greedy_decode(log_probs, torch.tensor([4]), vocabulary("xyz")) == ["xyz"]


def test_no_core_function_falls_back_on_english_symbols():
    """A model knows its symbols: every core function that needs them is given them."""
    english = []
    for module in (model_module, data, health, runs, train, decode):
        for name, member in inspect.getmembers(module, lambda m: inspect.isfunction(m) or inspect.isclass(m)):
            function = member.__init__ if inspect.isclass(member) else member
            if getattr(member, "__module__", None) != module.__name__ or not inspect.isfunction(function):
                continue
            if member is ModelConfig:  # a new model's symbols: English unless told
                continue
            for parameter in inspect.signature(function).parameters.values():
                if parameter.default is ENGLISH or parameter.default is data.VOCAB:
                    english.append(f"{module.__name__}.{name}({parameter.name})")
    assert english == []


def test_a_lexicon_in_another_spelling_and_the_words_it_loses_are_told(tmp_path):
    (tmp_path / "words.txt").write_text("dog\ne-mail\ncat\n", encoding="utf-8")
    notes = []
    decode.build_beam_search(None, tmp_path / "words.txt", 10, 1.0, 0.0, ENGLISH + "đ", notes.append)
    assert len(notes) == 2 and "1 words are left out" in notes[0] and "e-mail" in notes[0]
    assert "never uses the model's own letters (đ)" in notes[1] and "--alphabet" in notes[1]
    (tmp_path / "words.txt").write_text("dog\nđi\n", encoding="utf-8")
    notes.clear()
    decode.build_beam_search(None, tmp_path / "words.txt", 10, 1.0, 0.0, ENGLISH + "đ", notes.append)
    assert notes == []


def test_a_model_in_another_alphabet_decodes_in_it_greedy_and_with_a_lexicon_or_lm(foreign_run, tmp_path,
                                                                                    capsys):
    checkpoint, test_list = foreign_run
    refs = [line.split("\t")[1] for line in test_list.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "words.txt").write_text("\n".join(refs + ["àà", "ßßß"]), encoding="utf-8")
    lm.main(["build", str(test_list), "--alphabet", str(checkpoint), "--out", str(tmp_path / "lm.arpa")])
    assert set(refs) <= set((tmp_path / "lm.lexicon.txt").read_text(encoding="utf-8").split())
    for beam in ([], ["--lexicon", str(tmp_path / "words.txt")], ["--lm", str(tmp_path / "lm.arpa")]):
        decode.main([str(checkpoint), str(test_list), "--quiet", "--workers", "0", *beam])
        out, err = capsys.readouterr()
        hyps = [line.split("\t")[1] for line in out.splitlines()]
        assert data.error_rates(refs, hyps)[1] < 10, (beam, list(zip(refs, hyps)))
        assert set("".join(hyps)) <= set(FOREIGN.values()), beam


def test_decode_prints_another_alphabet_in_a_locale_that_cannot_encode_it(foreign_run):
    """LANG=C with Python's UTF-8 mode off: the transcripts come out as UTF-8, not as a UnicodeEncodeError."""
    checkpoint, test_list = foreign_run
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "decode.py", str(checkpoint), str(test_list), "--workers", "0"],
                          cwd=HERE, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-500:]
    printed = done.stdout.decode("utf-8")
    assert len(printed.splitlines()) == 12 and set(printed) & set(FOREIGN.values())


def test_a_pause_around_the_words_leaves_their_transcript_and_shifts_their_times(foreign_run, capsys):
    """A trained model (the default statistics, norm_range_db 40) reads an utterance as it did with a
    second of silence before and after it. Digital silence: the tones' bins hold nothing else, so a
    noise floor would be all their variance (real speech reaches every bin; RESULTS.md has AN4's)."""
    checkpoint, test_list = foreign_run
    model = build_from_checkpoint(checkpoint)[0].eval()
    waves = [data.load_audio(p) for p in sorted(test_list.parent.glob("*.flac"))]
    alone = decode.transcribe(model, waves, torch.device("cpu"), 60, 30)
    pause = torch.zeros(data.SAMPLE_RATE)
    padded = decode.transcribe(model, [torch.cat([pause, w, pause]) for w in waves], torch.device("cpu"),
                               60, 30)
    assert data.error_rates([t for t, _ in alone], [t for t, _ in padded])[1] < 3
    for (_, words), (_, padded_words) in zip(alone, padded):
        assert len(words) == len(padded_words)
        for word, shifted in zip(words, padded_words):
            assert abs(shifted["start"] - 1.0 - word["start"]) <= 0.06
            assert abs(shifted["end"] - 1.0 - word["end"]) <= 0.06
    decode.main([str(checkpoint), str(test_list), "--quiet", "--workers", "0", "--pause", "1"])  # the same
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == [t for t, _ in padded]


def test_word_times_are_where_the_words_are_chunked_or_not_greedy_or_beam(tmp_path):
    spoken = [(3.0, 3.5), (10.0, 11.0), (15.24, 15.6), (31.0, 31.4)]  # seconds
    wave = torch.zeros(40 * data.SAMPLE_RATE)
    for start, end in spoken:
        wave[int(start * data.SAMPLE_RATE):int(end * data.SAMPLE_RATE)] = 0.5
    (tmp_path / "words.txt").write_text("ab\n")
    english_greedy = functools.partial(greedy_spans, vocab=data.VOCAB)
    beam = functools.partial(decode.beam_search_spans, decode.build_beam_search(None, tmp_path / "words.txt",
                                                                                 10, 1.0, 0.0, ENGLISH),
                             vocab=data.VOCAB)
    frame = 1 / 25
    cpu = torch.device("cpu")
    results = {(chunk, typical, name): decode.transcribe(LoudnessModel(), [wave], cpu, 100, chunk, spans,
                                                          typical=typical)[0]
               for chunk, typical in ((60.0, None), (7.0, None), (60.0, 5.0))
               for name, spans in (("greedy", english_greedy), ("beam", beam))}
    for key, (text, words) in results.items():
        assert text == "ab ab ab ab", key
        for word, (start, end) in zip(words, spoken):
            assert abs(word["start"] - start) <= frame, (key, word)
            assert abs(word["end"] - end) <= frame, (key, word)
    # Chunked, or cut at its pauses (far longer than typical, above): times from the recording's start.
    assert results[(60.0, None, "greedy")] == results[(7.0, None, "greedy")]


def test_a_recording_longer_than_the_models_utterances_is_cut_in_its_pauses_only():
    words = torch.from_numpy(tones("abcabcjihg"))  # 1.4 s, its tones 30 ms apart: no pause
    pause = torch.zeros(int(decode.PAUSE_SECONDS * 1.5 * data.SAMPLE_RATE))
    short_pause = torch.zeros(int(decode.PAUSE_SECONDS * 0.5 * data.SAMPLE_RATE))
    wave = torch.cat([words, pause, words, short_pause, words, pause, words])
    pieces = decode.split_at_pauses(wave, typical=0.5)
    middle = len(words) + len(pause) // 2
    assert abs(len(pieces[0]) - middle) < 4 * data.HOP  # in the pause's middle, within 40 ms
    assert len(pieces) == 3 and sum(map(len, pieces)) == len(wave)  # the short pause is left whole
    word = torch.from_numpy(tones("ab"))
    many = torch.cat([torch.cat([word, pause]) for _ in range(20)])  # 20 pieces of 1.4 s, 28 s
    grown = decode.split_at_pauses(many, typical=3.0)  # about two at a time: up to typical seconds
    assert len(grown) in (10, 11) and max(map(len, grown)) <= 3.0 * data.SAMPLE_RATE
    assert decode.split_at_pauses(wave, typical=None) == [wave]
    assert decode.split_at_pauses(wave, typical=len(wave) / 4 / data.SAMPLE_RATE) == [wave]  # not longer


def test_decode_timestamps_are_json_lines_in_input_order_for_a_single_file_too(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "m.pt")
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


def test_decode_writes_its_first_transcript_after_one_batch_not_a_window_of_them(tmp_path, monkeypatch):
    decoded = []  # batch sizes, as each batch is decoded

    def transcribe(model, waves, *rest):
        decoded.append(len(waves))
        return [("x", [])] * len(waves)
    monkeypatch.setattr(decode, "transcribe", transcribe)
    paths = []
    for i in range(200):
        paths.append(tmp_path / f"{i}.wav")
        soundfile.write(paths[-1], tones("ab"), 16000)
    seconds = [len(tones("ab")) / 16000] * len(paths)
    args = argparse.Namespace(batch_seconds=2 * seconds[0], chunk_seconds=30.0, workers=0, pause=0.0,
                              bf16=False)
    results = decode.decode_in_order(None, [str(p) for p in paths], seconds, torch.device("cpu"), args, None,
                                     decode.ProgressLine(seconds, quiet=True))
    assert next(results)[0] == 0 and decoded == [2]  # the first two, then it is written
    assert [i for i, *_ in results] == list(range(1, 200)) and sum(decoded) == 200


def test_silence_and_near_silence_decode_to_nothing_greedy_or_beam(tmp_path):
    rng = np.random.default_rng(0)
    dither = torch.from_numpy((rng.random(40 * 16000) - rng.random(40 * 16000)) / 32768).float()  # -98 dBFS
    speech = dither.clone()
    speech[3 * 16000:4 * 16000] += 0.3 * torch.sin(2 * math.pi * 300 * torch.arange(16000) / 16000)  # a word
    # at 3-4 s, then 36 s of the noise floor
    (tmp_path / "words.txt").write_text("ab\n")
    english_greedy = functools.partial(greedy_spans, vocab=data.VOCAB)
    beam = functools.partial(decode.beam_search_spans, decode.build_beam_search(None, tmp_path / "words.txt",
                                                                                 10, 1.0, 0.0, ENGLISH),
                             vocab=data.VOCAB)
    for spans in (english_greedy, beam):
        texts = [text for text, _ in decode.transcribe(RelativeLoudnessModel(), [dither, speech, torch.zeros(
            16000)], torch.device("cpu"), 100, 10.0, spans)]
        assert texts == ["", "ab", ""]  # the noise floor's chunks give no words; the word is kept
    assert not data.is_silent(speech[:10 * 16000]) and data.is_silent(dither)
    # Level is not the rule: speech 80 dB down is speech, a steady floor at any level is not.
    quiet = torch.from_numpy(tones("abcd")).float() * 10 ** (-80 / 20)
    assert not data.is_silent(quiet) and data.is_silent(dither * 1000) and data.is_silent(torch.zeros(800))


def test_decode_interrupted_or_cut_off_by_head_ends_without_a_traceback(tmp_path):
    model = CTCModel(ModelConfig(rnn_layers=1, rnn_hidden=8, conv_channels=2))
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "m.pt")
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


def test_an_lm_fixes_a_spelling_the_acoustics_alone_get_wrong(tmp_path):
    log_probs = letter_frames({"c": 0.9}, {}, {"o": 0.5, "a": 0.4}, {}, {"t": 0.9})
    lengths = torch.tensor([log_probs.shape[1]])
    assert greedy_decode(log_probs, lengths, data.VOCAB) == ["cot"]
    (tmp_path / "words.txt").write_text("cat\tc a t\ncot\tc o t\n")
    (tmp_path / "lm.arpa").write_text(tiny_arpa({"cat": -0.1, "cot": -2.0}))
    settings = {"beam_size": 10, "lm_weight": 1.0, "word_score": 0.0}
    lexicon_only = decode.build_beam_search(None, tmp_path / "words.txt", alphabet=ENGLISH, **settings)
    assert beam_texts(lexicon_only, log_probs, lengths) == ["cot"]
    with_lm = decode.build_beam_search(tmp_path / "lm.arpa", None, alphabet=ENGLISH, **settings)  # its words
    assert beam_texts(with_lm, log_probs, lengths) == ["cat"]


def test_lexicon_constrained_output_is_always_in_the_lexicon(tmp_path):
    torch.manual_seed(0)
    log_probs = (3 * torch.randn(6, 60, len(data.VOCAB))).log_softmax(-1)
    lengths = torch.tensor([60, 55, 50, 40, 30, 20])
    lexicon = {"a", "bad", "cab", "it's", "dead"}
    (tmp_path / "words.txt").write_text("".join(f"{w}\n" for w in sorted(lexicon)))
    decoder = decode.build_beam_search(None, tmp_path / "words.txt", 20, 1.0, 2.0, ENGLISH)
    words = [w for text in beam_texts(decoder, log_probs, lengths) for w in text.split()]
    assert words and set(words) <= lexicon
    greedy = {w for text in greedy_decode(log_probs, lengths, data.VOCAB) for w in text.split()}
    assert greedy - lexicon  # unconstrained, the same frames spell other words


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
    checkpoint = random_checkpoint(tmp_path / "m.pt")  # the LM is spelled in its alphabet
    for flag, name, problem in cases:
        # The audio does not exist: the LM and lexicon are checked before it is read.
        with pytest.raises(SystemExit) as failed:
            decode.main([str(checkpoint), "missing.flac", flag, str(tmp_path / name)])
        assert str(tmp_path / name) in str(failed.value) and problem in str(failed.value), name
    with pytest.raises(SystemExit):
        decode.main([str(tmp_path / "missing.pt"), "x.flac", "--lm-weight", "2"])  # beam flags need --lm
    assert "need --lm or --lexicon" in capsys.readouterr().err


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
            decode.build_beam_search(arpa and tmp_path / arpa, lexicon and tmp_path / lexicon, 10, 1.0, 0.0,
                                     ENGLISH)
    decode.build_beam_search(tmp_path / "upper.arpa", None, 10, 1.0, 0.0, ENGLISH)  # the LM's own words


# --------------------------------------------------------------- recipes/ and the README's commands
COPIED_CORE_SCRIPT = """
import sys, torch
import data, model
assert {"data", "model"} <= set(sys.modules) and not {"runs", "train", "decode"} & set(sys.modules)
corpus = data.read_corpus([sys.argv[1]], model.ENGLISH, log=lambda line: None)
batches = data.BucketBatches([u["seconds"] for u in corpus], batch_seconds=8, seed=0)
loader = data.batch_loader(corpus, batches, model.ENGLISH, workers=0, pin_memory=False)
net = model.CTCModel(model.ModelConfig(rnn_layers=1, rnn_hidden=16, conv_channels=4, freq_masks=0,
                                       time_masks=0, freq_warp=0.0))
optimizer, ctc = torch.optim.AdamW(net.parameters(), lr=3e-3), torch.nn.CTCLoss(blank=model.BLANK)
for epoch in range(2):
    batches.set_epoch(epoch)
    for batch in loader:
        log_probs, lengths = net(batch["waves"], batch["wave_lengths"])
        loss = ctc(log_probs.transpose(0, 1), batch["targets"], lengths, batch["target_lengths"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
net.eval()
refs, hyps = [], []
with torch.no_grad():
    for batch in loader:
        refs += batch["texts"]
        hyps += model.greedy_decode(*net(batch["waves"], batch["wave_lengths"]), net.vocab)
wer, cer = data.error_rates(refs, hyps)
print(f"steps {2 * len(batches)} loss {float(loss):.3f} WER {wer:.2f} CER {cer:.2f}")
"""


def test_model_py_and_data_py_copied_alone_read_batch_train_and_score(tmp_path):
    """The copyable layers: model.py and data.py in an empty folder, and nothing else of the project."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    for name in ("model.py", "data.py"):
        (folder / name).write_bytes((HERE / name).read_bytes())
    (folder / "example.py").write_text(COPIED_CORE_SCRIPT)
    rng = np.random.default_rng(0)
    write_librispeech(tmp_path / "corpus", [random_text(rng) for _ in range(12)])
    env = {**os.environ, "PYTHONPATH": "", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "example.py", str(tmp_path / "corpus")], cwd=folder,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    steps, loss, wer = done.stdout.split()[1], float(done.stdout.split()[3]), float(done.stdout.split()[5])
    assert int(steps) >= 4 and math.isfinite(loss) and 0 <= wer
    project = {p.stem for p in HERE.glob("*.py")}

    def imported(script):
        nodes = list(ast.walk(ast.parse((HERE / script).read_text())))
        names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in nodes if isinstance(n, ast.ImportFrom)]
        return {name.split(".")[0] for name in names} & project
    assert imported("model.py") == set() and imported("data.py") == {"model"}
    assert imported("runs.py") <= {"model", "data"}
    assert "decode" not in imported("train.py") and "train" not in imported("decode.py")


def test_a_recipe_file_is_flags_with_comments_and_a_flag_typed_after_it_wins(tmp_path):
    recipe = tmp_path / "my.args"
    recipe.write_text("# a comment line\n--rnn-layers 2  # and one after the flags\n"
                      "--lr 1e-3 --speed-perturb\n")
    args = train.build_parser().parse_args([f"@{recipe}", "--lr", "2e-3", "--no-speed-perturb"])
    assert (args.rnn_layers, args.lr, args.speed_perturb) == (2, 2e-3, False)
    defaults = vars(train.build_parser().parse_args([]))  # the GPU recipe's file is the defaults, written out
    assert vars(train.build_parser().parse_args([f"@{HERE / 'recipes/librispeech-100.args'}"])) == defaults


@pytest.mark.parametrize("text, problem", [
    (b'--run-dir "unbalanced\n', "line 1: No closing quotation"),
    (b"--epochs 3\n--run-dir caf\xe9\n", "line 2: not UTF-8 (byte 0xe9)"),
    (b"--epochs 3\n@me.args\n", "line 2: @"),           # includes itself
    (b"@missing.args\n", "line 1: @"),                  # relative to the recipe: not there
])
def test_a_broken_recipe_file_is_named_with_its_line(tmp_path, capsys, text, problem):
    (tmp_path / "me.args").write_bytes(text)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args([f"@{tmp_path / 'me.args'}"])
    err = capsys.readouterr().err
    assert f"error: recipe {tmp_path / 'me.args'} {problem}" in err and "Traceback" not in err


def test_a_recipe_may_continue_lines_start_with_a_bom_and_include_its_neighbours(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/base.args").write_bytes(b"\xef\xbb\xbf--epochs 7 \\\n  --lr 2e-3\r\n")
    (tmp_path / "recipes/mine.args").write_text("@base.args --rnn-layers 2\n")
    monkeypatch.chdir(tmp_path)  # @base.args is the recipe's neighbour, not the working folder's
    args = train.build_parser().parse_args(["@recipes/mine.args"])
    assert (args.epochs, args.lr, args.rnn_layers) == (7, 2e-3, 2)


def test_a_quoted_at_is_a_value_and_includes_that_multiply_or_nest_deep_are_refused(tmp_path, capsys):
    (tmp_path / "odd.args").write_text('--run-dir "@odd" @more.args\n')
    (tmp_path / "more.args").write_text("--epochs 3\n")
    args = train.build_parser().parse_args([f"@{tmp_path / 'odd.args'}"])
    assert (args.run_dir, args.epochs) == ("@odd", 3)
    for i in range(30):  # a diamond: each recipe includes the next twice, 2 ** 30 reads
        (tmp_path / f"d{i}.args").write_text(f"@d{i + 1}.args @d{i + 1}.args\n")
    (tmp_path / "d30.args").write_text("--epochs 1\n")
    for i in range(150):  # a chain deeper than Python's recursion would go
        (tmp_path / f"c{i}.args").write_text(f"@c{i + 1}.args\n")
    for top in ("d0.args", "c0.args"):
        with pytest.raises(SystemExit):
            train.build_parser().parse_args([f"@{tmp_path / top}"])
        assert "includes that multiply?" in capsys.readouterr().err


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

