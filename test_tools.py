"""Tests of the tools around the core: download.py, lm.py, ablation.py, plot.py. CPU only, no
network: a local server stands in for the mirrors.

    pytest test_tools.py
"""
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from flashlight.lib.text.decoder.kenlm import KenLM
from flashlight.lib.text.dictionary import create_word_dict

import ablation
import conditions
import data
import decode
import download
import lm
import plot
import runs
import train
from data import InputError
from model import ENGLISH, TIME_STRIDES, CTCModel
from runs import model_checkpoint

from conftest import (HERE, tones, write_librispeech, run_script, make_corpus, read_arpa, arpa_log10,
                      tiny_arpa, letter_frames, beam_texts, ArchiveServer, an4_archive)


# -------------------------------------------------------------------------------------- download.py
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
    corpus = data.read_corpus([root / "LibriSpeech" / "dev-clean"], ENGLISH, log=lambda m: None)
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
    corpus = data.read_corpus([root / "LibriSpeech" / subset], ENGLISH, log=lambda m: None)
    assert [u["text"] for u in corpus] == ["abc", "de"]


def test_a_mirror_that_is_unreachable_or_a_root_that_cannot_be_written_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_script("download.py", "dev-clean", "--root", tmp_path / "root", "--base-url", closed)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{closed}/dev-clean.tar.gz" in result.stderr and "Run the same command again" in result.stderr
    assert "continues from the 0 bytes" not in result.stderr  # nothing was fetched: nothing to continue
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2/LibriSpeech").write_text("")  # found before any download, not after
    result = run_script("download.py", "dev-clean", "--root", tmp_path / "root2", "--base-url", closed)
    assert result.returncode != 0 and "LibriSpeech is a file where the corpus's folder goes" in result.stderr
    assert "downloading" not in result.stderr
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

    splits = {split: data.read_corpus([tmp_path / "root/AN4" / split], ENGLISH, log=lambda m: None)
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
    # A copy of part of it (its train/ alone, without the download's mark) is not taken for AN4.
    shutil.copytree(tmp_path / "root/AN4/train", tmp_path / "copy/AN4/train")
    partial = run_script("download.py", "an4", "--root", tmp_path / "copy", "--base-url", server.url)
    assert partial.returncode == 1 and "holds 3 utterances of the corpus's 1,078" in partial.stderr


def test_a_truncated_an4_archive_is_removed_and_nothing_is_half_written(tmp_path, monkeypatch):
    archive, _ = an4_archive(tmp_path)
    server = ArchiveServer({download.AN4_ARCHIVE: archive[:len(archive) * 2 // 3]})  # complete as HTTP goes
    monkeypatch.setattr(download, "AN4_UTTERANCES", {"train": 4, "test": 2})
    with pytest.raises(SystemExit) as failed:
        download.main(["an4", "--root", str(tmp_path / "root"), "--base-url", server.url])
    assert "cannot be extracted" in str(failed.value) and "download it anew" in str(failed.value)
    assert not list((tmp_path / "root").iterdir())


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
    assert "is a file where the corpus's folder goes" in str(in_the_way.value) and server.ranges == []


def test_a_dangling_link_or_a_half_copied_corpus_is_refused_before_any_download(tmp_path):
    server = ArchiveServer({"dev-clean.tar.gz": b"never fetched", download.AN4_ARCHIVE: b"never fetched"})
    (tmp_path / "root").mkdir()
    (tmp_path / "root/LibriSpeech").symlink_to(tmp_path / "unmounted/LibriSpeech")
    half = tmp_path / "half/AN4/train/an4"
    half.mkdir(parents=True)
    (half / "an4.trans.txt").write_text("an4-1 one two\nan4-2 three\n")  # a copy cut before its audio
    for root, corpus, problem in (("root", "dev-clean", "which does not exist"),
                                  ("half", "an4", "a copy cut")):
        with pytest.raises(SystemExit) as refused:
            download.main([corpus, "--root", str(tmp_path / root), "--base-url", server.url])
        assert problem in str(refused.value) and "Nothing was downloaded" in str(refused.value)
    assert server.ranges == [] and not list((tmp_path / "root").glob("*.part"))


# -------------------------------------------------------------------------------------------- lm.py
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


def test_lm_build_vocab_takes_each_lines_first_word_and_names_what_is_not_a_word(tmp_path, capsys):
    """A word list is a word a line (first field): pronunciations, our own lexicon's spellings and entries
    such as 4TH or MP3 must not become words (th, ah, mp, single letters)."""
    (tmp_path / "book.txt").write_text("fg de\n")
    (tmp_path / "vocab.txt").write_text("HELLO  HH AH L OW\nWORLD\tw o r l d |\n4TH\n2ND\nMP3\nSO-SO\n"
                                        "I'D AY D\n")
    out = tmp_path / "lm.arpa"
    lm.main(["build", str(tmp_path / "book.txt"), "--vocab", str(tmp_path / "vocab.txt"), "--out", str(out)])
    words = [line.split("\t")[0] for line in (tmp_path / "lm.lexicon.txt").read_text().splitlines()]
    assert words == ["de", "fg", "hello", "i'd", "world"]
    err = capsys.readouterr().err
    assert "4 entries are not words" in err and "4TH, 2ND, MP3, SO-SO" in err
    assert "lm.py build: read 1 sentences" in err and "estimated the 3-gram model" in err
    lm.main(["build", str(tmp_path / "book.txt"), "--out", str(tmp_path / "quiet.arpa"), "--quiet"])
    assert "lm.py build:" not in capsys.readouterr().err


def test_lm_build_vocab_judges_the_whole_file_a_lexicon_in_any_phone_set(tmp_path):
    """Lower-case ARPABET, Kaldi's lexiconp.txt (a probability column) and IPA: the phones never become
    words; running text still gives every word."""
    lexicons = {"arpabet.txt": "hello hh ah0 l ow1\nworld w er1 l d\nlaw l ao1\n",
                "lexiconp.txt": "hello 1.0 hh ah l ow\nworld 0.8 w er l d\nlaw 1.0 l ao\n",
                "ipa.txt": "hello h ə l oʊ\nworld w ɜː l d\nlaw l ɔː\n"}
    (tmp_path / "book.txt").write_text("fg de\n")
    for name, text in lexicons.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        out = tmp_path / f"{name}.arpa"
        lm.main(["build", str(tmp_path / "book.txt"), "--vocab", str(tmp_path / name), "--out", str(out)])
        words = [line.split("\t")[0] for line in out.with_suffix(".lexicon.txt").read_text().splitlines()]
        assert words == ["de", "fg", "hello", "law", "world"], name


def test_lm_build_counts_what_it_drops_and_folds_and_warns_of_another_alphabets_text(tmp_path, capsys):
    (tmp_path / "vi.txt").write_text("tiếng việt rất hay\nxin chào\n", encoding="utf-8")
    lm.main(["build", str(tmp_path / "vi.txt"), "--out", str(tmp_path / "english.arpa")])  # English's letters
    err = capsys.readouterr().err
    assert "0 characters not in the alphabet" in err and "4 written without an accent" in err
    assert "warning: more than 1% of the letters" in err and "--alphabet runs/<run>/best.pt" in err
    (tmp_path / "vi.alphabet").write_text("\n".join(sorted(set("tiếngvệtrấhayxinchào"))), encoding="utf-8")
    lm.main(["build", str(tmp_path / "vi.txt"), "--out", str(tmp_path / "vi.arpa"), "--alphabet",
             str(tmp_path / "vi.alphabet")])
    assert "warning" not in capsys.readouterr().err


def test_lm_build_vocab_takes_every_word_of_a_sentence_list_or_a_corpus_folder(tmp_path):
    (tmp_path / "book.txt").write_text("fg de\n")
    (tmp_path / "words.txt").write_text("the cat sat\nplan on it\n")
    write_librispeech(tmp_path / "corpus", ["abc", "jih"])
    for vocab, added in (("words.txt", ["cat", "it", "on", "plan", "sat", "the"]),
                         ("corpus", ["abc", "jih"])):
        out = tmp_path / f"{vocab}.arpa"
        lm.main(["build", str(tmp_path / "book.txt"), "--vocab", str(tmp_path / vocab), "--out", str(out)])
        words = [line.split("\t")[0] for line in out.with_suffix(".lexicon.txt").read_text().splitlines()]
        assert words == sorted(["de", "fg", *added])


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
    decoder = decode.build_beam_search(folder / "3-gram.pruned.1e-7.arpa.gz", None, 5, 1.0, 0.0, ENGLISH)
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


# -------------------------------------------------------------------------------------- ablation.py
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
        if name == "recipe":  # normalized per utterance and per bin over its sounding frames: all of these
            steady = 0.3 * torch.sin(torch.arange(16000) * 0.12) + 0.01 * torch.randn(16000)
            assert abs(float(model.features(steady[None], torch.tensor([16000]))[0].mean())) < 1e-3
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
    (out / "table.md").unlink()
    ablation.main(argv + ["0.01"])  # a second run keeps the rows it has, and writes the table it names
    assert "already in" in capsys.readouterr().err and "| b-no-space |" in (out / "table.md").read_text()
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
    settings = '"minutes": 0.01, "data": [%s], "dev": [%s], "seed": 0, "eval_every": 2' % (
        json.dumps(str(train_dir.absolute())), json.dumps(str(dev_dir.absolute())))
    for name, rows in (("null", "null"), ("unnamed", '[{"what": "a row without its name"}]')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text("{%s, \"rows\": %s}" % (settings, rows))
    (tmp_path / "folder/results.json").mkdir(parents=True)
    cases = [(["--out", str(train_dir / "table")], "inside the corpus"),
             (["--out", str(tmp_path / "file")], "is a file"),
             (["--out", str(tmp_path / "cut")], "not a table ablation.py wrote"),
             (["--out", str(tmp_path / "null")], "not a table ablation.py wrote"),
             (["--out", str(tmp_path / "unnamed")], "not a table ablation.py wrote"),
             (["--out", str(tmp_path / "folder")], "not a table ablation.py wrote"),
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


def test_decode_names_an_ablation_rows_checkpoint_and_how_to_load_it(tmp_path):
    model, _ = ablation.build("b-softmax")
    runs.save_checkpoint(model_checkpoint(model), tmp_path / "row.pt")
    with pytest.raises(InputError) as row:
        runs.build_from_checkpoint(tmp_path / "row.pt")
    assert "ablation.py row" in str(row.value) and "ablation.build(<row>)[0]" in str(row.value)


# ------------------------------------------------------------------------------------------ plot.py
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



# ------------------------------------------------------------------------------ conditions.py
def test_conditions_writes_scaled_paused_and_joined_copies_and_changes_nothing_in_place(tmp_path):
    ids = write_librispeech(tmp_path / "ls", ["abc", "jih", "abcab"])
    before = {p: p.read_bytes() for p in (tmp_path / "ls").rglob("*") if p.is_file()}
    originals = [data.load_audio(tmp_path / f"ls/19/198/{i}.flac").numpy() for i in ids]
    conditions.main([str(tmp_path / "ls"), str(tmp_path / "quiet"), "--gain-db", "-50"])
    conditions.main([str(tmp_path / "ls"), str(tmp_path / "paused"), "--pause", "1", "--floor-dbfs", "-80"])
    conditions.main([str(tmp_path / "ls"), str(tmp_path / "joined"), "--join", "0.03"])
    quiet = soundfile.read(tmp_path / f"quiet/{ids[0]}.flac")[0]
    assert np.allclose(quiet, originals[0] * 10 ** (-50 / 20), atol=2 ** -22)  # 24-bit: the scaled samples
    paused = soundfile.read(tmp_path / f"paused/{ids[1]}.flac")[0]
    assert len(paused) == len(originals[1]) + 2 * 16000
    assert np.sqrt(np.mean(paused[:16000] ** 2)) == pytest.approx(10 ** (-80 / 20), rel=0.05)
    lines = (tmp_path / "joined/list.tsv").read_text().splitlines()
    assert lines == [f"{ids[0]}-joined3.flac\tabc jih abcab"]  # the folder's utterances, in order
    joined = soundfile.read(tmp_path / f"joined/{ids[0]}-joined3.flac")[0]
    assert len(joined) == sum(len(w) for w in originals) + 3 * int(0.03 * 16000)
    read_back = data.read_corpus(tmp_path / "joined/list.tsv", ENGLISH, log=lambda m: None)
    assert read_back[0]["text"] == "abc jih abcab"
    assert {p: p.read_bytes() for p in (tmp_path / "ls").rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit, match="exists; name a new folder"):
        conditions.main([str(tmp_path / "ls"), str(tmp_path / "quiet")])
