"""Get corpora and language models: CMU's AN4 (50 minutes of real speech, a first run on a
CPU), LibriSpeech and its n-gram LMs, or a word n-gram LM built from your own text.

    python download.py an4 --root .                                    # -> ./AN4/{train,dev,test}
    python download.py train-clean-100 dev-clean test-clean --root .   # -> ./LibriSpeech/<subset>
    python download.py librispeech-lm --root .     # -> ./LibriSpeech/lm/3-gram.pruned.1e-7.arpa.gz
    python download.py --lm-from AN4/train --lm-out AN4/train.3gram.arpa   # an LM from transcripts

Every archive shows bytes, rate and ETA while it downloads; an interrupted download continues
where it stopped when the same command is run again. An archive is extracted beside its target
and moved in only when complete, so a failed download or extraction never leaves a corpus that
looks ready. Corpora already there are skipped. Only the standard library and soundfile are
needed to download, so this runs before anything else is installed.
"""
import argparse
import collections
import gzip
import hashlib
import math
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import soundfile

LIBRISPEECH_MIRROR = "https://www.openslr.org/resources/12"
# The MD5 sums OpenSLR publishes for its LibriSpeech archives (openslr.org/12).
PUBLISHED_MD5 = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1", "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9", "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}

AN4_MIRROR = "http://www.speech.cs.cmu.edu/databases/an4"
AN4_ARCHIVE = "an4_raw.bigendian.tar.gz"
AN4_SAMPLE_RATE = 16000  # the .raw files are headerless 16-bit big-endian mono PCM at 16 kHz
# CMU publishes no checksum for AN4, so what can be checked is checked instead: the utterance
# counts, the test set's word count, and that every listed utterance has audio of a sane length.
AN4_UTTERANCES = {"train": 948, "test": 130}
AN4_TEST_WORDS = 773
AN4_SECONDS = (0.2, 20.0)
# AN4 has no dev set: these 7 of its 74 training speakers (2 of the 21 women, 5 of the 53 men;
# the first letter is the sex), 91 utterances, are held out as AN4/dev.
AN4_DEV_SPEAKERS = ("fclc", "ftmj", "mblw", "mdxs", "mjhp", "mmtm", "msct")


class DownloadError(Exception):
    """What went wrong and what to do; the command exits with this message."""


def fetch(url, target):
    """Download url into target, continuing a partial target with an HTTP Range request."""
    have = target.stat().st_size if target.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left to fetch, the file is complete
            raise
        return
    with response, open(target, "ab" if response.status == 206 else "wb") as f:
        done = have if response.status == 206 else 0
        total = done + int(response.headers.get("Content-Length", 0))
        start, started_at = time.time(), done
        while chunk := response.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            rate = (done - started_at) / max(time.time() - start, 1e-3)
            eta = (total - done) / rate if total and rate else 0
            print(f"\r  {target.name}: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB  {rate / 1e6:.1f} MB/s  "
                  f"ETA {eta / 60:.0f} min ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if total and done < total:
        raise ConnectionError(f"the connection closed at {done:,} of {total:,} bytes")


def fetch_archive(url, archive):
    """fetch() with the message that tells the user how to continue."""
    print(f"downloading {url}", file=sys.stderr)
    try:
        fetch(url, archive)
    except (OSError, urllib.error.URLError) as e:
        have = archive.stat().st_size if archive.exists() else 0
        raise DownloadError(f"downloading {url}: {e}. Run the same command again: it continues from "
                            f"the {have:,} bytes in {archive} (or pick another --base-url).") from None


def digest_of(path, digest):
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def already_there(final, pattern):
    """True if final is a finished download (a folder holding pattern); False if it is absent or
    an empty folder (replaced); DownloadError, before any download, if it is something else."""
    if final.is_dir() and any(final.rglob(pattern)):
        return True
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        raise DownloadError(f"{final} exists but is not a finished download (no {pattern} in it); move it "
                            f"away or pick another --root. Nothing was downloaded.")
    return False


def extract(archive, staging):
    """Extract into a fresh staging folder; a damaged archive is deleted, so the next run
    downloads it again instead of failing the same way."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink()
        raise DownloadError(f"{archive} cannot be extracted ({e}); it was removed and nothing was "
                            f"written. Run the command again to download it anew.") from None


# ----------------------------------------------------------------------------- LibriSpeech
def download_librispeech(subsets, root, base_url):
    """Fetch, verify and extract LibriSpeech subsets into root/LibriSpeech/<subset>. Every archive
    is checked against OpenSLR's published MD5, whichever mirror served it."""
    for subset in subsets:
        final = root / "LibriSpeech" / subset
        if already_there(final, "*.trans.txt"):
            print(f"{final} is already there; skipping {subset}", file=sys.stderr)
            continue
        archive = root / f"{subset}.tar.gz.part"
        fetch_archive(f"{base_url}/{subset}.tar.gz", archive)
        actual = digest_of(archive, hashlib.md5())
        if actual != PUBLISHED_MD5[subset]:
            archive.unlink()
            raise DownloadError(f"{subset}.tar.gz from {base_url} has MD5 {actual}, OpenSLR publishes "
                                f"{PUBLISHED_MD5[subset]}; the bad file was removed and nothing was "
                                f"extracted. Run the command again, or pick another mirror with --base-url.")
        staging = root / f".extracting-{subset}"
        extract(archive, staging)
        if not (staging / "LibriSpeech" / subset).is_dir():
            shutil.rmtree(staging)
            raise DownloadError(f"{archive} does not hold LibriSpeech/{subset}/; nothing was moved "
                                f"into {root}")
        final.parent.mkdir(exist_ok=True)
        if final.is_dir():
            final.rmdir()  # already_there() found it empty
        for item in (staging / "LibriSpeech").iterdir():  # the subset and README/SPEAKERS files
            if not (final.parent / item.name).exists():
                item.rename(final.parent / item.name)
        shutil.rmtree(staging)
        archive.unlink()
        print(f"{final}: ready", file=sys.stderr)


LIBRISPEECH_LM_MIRROR = "https://www.openslr.org/resources/11"
# LibriSpeech's word n-gram LMs and word list (openslr.org/11), upper case as its transcripts:
# {file: (bytes, SHA-256)}. OpenSLR publishes the sizes (Kaldi's LibriSpeech recipe checks the same)
# but no checksums; the SHA-256s are those RWTH's recipes check the official files against
# (rwth-i6/i6_experiments, common/datasets/librispeech/: language_model.py for 4-gram.arpa.gz,
# lexicon.py for the lexicon; 3-gram.pruned.1e-7 from a recipe built on them).
LIBRISPEECH_LM_FILES = {
    "librispeech-lm": {
        "3-gram.pruned.1e-7.arpa.gz": (34_094_057, "71dd880667cb6ea3942bb1982988c91fb1208839a21911eeec7e31c857c4bdfb"),
        "librispeech-lexicon.txt": (5_627_646, "d722bc29908cd338ae738edd70f61826a6fca29aaa704a9493f0006773f79d71")},
    "librispeech-4gram": {
        "4-gram.arpa.gz": (1_355_172_078, "f2b2d1507637ddf459d3579159f7e8099ed7d77452ff1059aeeeaea33d274613")},
}


def download_librispeech_lm(name, root, base_url):
    """Fetch one of LIBRISPEECH_LM_FILES' sets into root/LibriSpeech/lm, as published (KenLM and
    decode.py read the gzipped ARPA files as they are)."""
    folder = root / "LibriSpeech" / "lm"
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, (size, sha256) in LIBRISPEECH_LM_FILES[name].items():
        final = folder / file_name
        if final.exists():
            print(f"{final} is already there; skipping it", file=sys.stderr)
            continue
        part = folder / f"{file_name}.part"
        fetch_archive(f"{base_url}/{file_name}", part)
        actual = (part.stat().st_size, digest_of(part, hashlib.sha256()))
        if actual != (size, sha256):
            part.unlink()
            raise DownloadError(f"{file_name} from {base_url} is not OpenSLR's ({actual[0]:,} bytes, SHA-256 "
                                f"{actual[1]}; expected {size:,}, {sha256}); the file was removed. Run the "
                                f"command again, or try another --base-url.")
        part.rename(final)
        print(f"{final}: ready", file=sys.stderr)


# ------------------------------------------------------------------------------------- AN4
def read_an4_list(etc, part):
    """[(speaker, utterance id, transcript)] from an4_<part>.fileids and .transcription, whose
    lines read 'an4_clstk/fash/an251-fash-b' and '<s> YES </s> (an251-fash-b)'."""
    try:
        fileids = (etc / f"an4_{part}.fileids").read_text().split()
        lines = (etc / f"an4_{part}.transcription").read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DownloadError(f"cannot read AN4's list of {part} utterances: {e}") from None
    if len(fileids) != len(lines):
        raise DownloadError(f"{etc}: an4_{part}.fileids lists {len(fileids)} utterances, "
                            f"an4_{part}.transcription {len(lines)}")
    listed = []
    for fileid, line in zip(fileids, lines):
        words, _, utt_id = line.strip().rstrip(")").rpartition(" (")
        if utt_id != fileid.rsplit("/", 1)[-1]:
            raise DownloadError(f"{etc}/an4_{part}.transcription: {line!r} does not match {fileid!r}")
        speaker = fileid.split("/")[-2]
        text = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))  # train lines carry these
        listed.append((fileid, speaker, utt_id, text))
    return listed


def convert_an4(source, target):
    """AN4's raw PCM and transcripts -> target/{train,dev,test} in LibriSpeech layout."""
    splits = {}
    for part in AN4_UTTERANCES:
        for fileid, speaker, utt_id, text in read_an4_list(source / "etc", part):
            split = "dev" if part == "train" and speaker in AN4_DEV_SPEAKERS else part
            splits.setdefault(split, []).append((source / "wav" / f"{fileid}.raw", speaker, utt_id, text))
    sizes = {split: len(items) for split, items in splits.items()}
    counts = {"train": sizes.get("train", 0) + sizes.get("dev", 0), "test": sizes.get("test", 0)}
    test_words = sum(len(text.split()) for *_, text in splits.get("test", []))
    if counts != AN4_UTTERANCES or test_words != AN4_TEST_WORDS:
        raise DownloadError(f"the archive lists {counts} utterances and {test_words} test words, but AN4 "
                            f"has {AN4_UTTERANCES} and {AN4_TEST_WORDS}: it is not CMU's AN4")
    train, dev, test = ({speaker for _, speaker, _, _ in splits.get(s, [])} for s in ("train", "dev", "test"))
    shared = (train & test) | (dev & (train | test))
    if shared:
        raise DownloadError(f"speakers {sorted(shared)} are in two splits; it is not CMU's AN4")
    for split, items in splits.items():
        by_folder = {}
        for raw, speaker, utt_id, text in items:
            folder = target / split / speaker / "an4"
            folder.mkdir(parents=True, exist_ok=True)
            try:
                samples, _ = soundfile.read(raw, samplerate=AN4_SAMPLE_RATE, channels=1, format="RAW",
                                            subtype="PCM_16", endian="BIG", dtype="int16")
            except (RuntimeError, OSError) as e:
                raise DownloadError(f"{raw}: cannot read ({e})") from None
            if not AN4_SECONDS[0] <= len(samples) / AN4_SAMPLE_RATE <= AN4_SECONDS[1]:
                raise DownloadError(f"{raw}: {len(samples) / AN4_SAMPLE_RATE:.2f} s of audio, outside "
                                    f"{AN4_SECONDS[0]}-{AN4_SECONDS[1]} s")
            soundfile.write(folder / f"{utt_id}.flac", samples, AN4_SAMPLE_RATE, subtype="PCM_16")
            by_folder.setdefault(folder, []).append(f"{utt_id} {text}\n")
        for folder, lines in by_folder.items():
            (folder / f"{folder.parent.name}-an4.trans.txt").write_text("".join(lines))
    expected = {target / split / speaker / "an4" / name for split, items in splits.items()
                for _, speaker, utt_id, _ in items for name in (f"{utt_id}.flac", f"{speaker}-an4.trans.txt")}
    found = {p for p in target.rglob("*") if p.is_file()}
    if found != expected:  # the lists were checked; this checks the tree that was written
        raise DownloadError(f"the corpus written holds {len(found)} files where AN4's lists name "
                            f"{len(expected)} (e.g. {sorted(map(str, found ^ expected))[:2]})")
    return sizes


def download_an4(root, base_url):
    """Fetch AN4, check it, and write root/AN4/{train,dev,test} as 16 kHz FLAC + .trans.txt."""
    final = root / "AN4"
    if already_there(final, "*.trans.txt"):
        print(f"{final} is already there; skipping an4", file=sys.stderr)
        return
    archive = root / f"{AN4_ARCHIVE}.part"
    fetch_archive(f"{base_url}/{AN4_ARCHIVE}", archive)
    # The archive is extracted in one place and the corpus written in another, so that nothing
    # the archive holds beyond AN4's lists can end up in the corpus.
    extracted, written = root / ".extracting-an4", root / ".writing-an4"
    extract(archive, extracted)
    try:
        if not (extracted / "an4" / "etc").is_dir():
            raise DownloadError(f"{archive} does not hold an4/etc and an4/wav")
        shutil.rmtree(written, ignore_errors=True)
        counts = convert_an4(extracted / "an4", written / "AN4")
    except BaseException as e:
        for folder in (extracted, written):
            shutil.rmtree(folder, ignore_errors=True)
        if not isinstance(e, DownloadError):
            raise
        archive.unlink()  # it is not AN4: the next run must download anew, not resume it
        raise DownloadError(f"{e}. {archive} was removed and nothing was written; run the command "
                            f"again, or try another --base-url.") from None
    if final.is_dir():
        final.rmdir()  # already_there() found it empty
    (written / "AN4").rename(final)
    for leftover in (extracted, written):
        shutil.rmtree(leftover)
    archive.unlink()
    print(f"{final}: ready ({', '.join(f'{split} {n}' for split, n in sorted(counts.items()))} utterances)",
          file=sys.stderr)


# -------------------------------------------------------------- a word n-gram LM from text
def read_sentences(paths):
    """Word lists from LibriSpeech-layout folders (.trans.txt), TSV manifests (the transcript
    column) and plain text files (a sentence per line), normalized as the model spells them."""
    from data import normalize  # needs torch, which downloading does not
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.rglob("*.trans.txt"))
            if not files:
                raise DownloadError(f"{path}: no .trans.txt files under this folder")
        elif path.is_file():
            files = [path]
        else:
            raise DownloadError(f"{path}: no such file or folder")
        for file in files:
            try:
                lines = file.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise DownloadError(f"{file}: cannot read it as UTF-8 text ({e})") from None
            for line_no, line in enumerate(lines, 1):
                if file.name.endswith(".trans.txt"):
                    line = line.partition(" ")[2]  # after the utterance id
                elif file.suffix == ".tsv" and line.strip() and not line.startswith("#"):
                    if line.count("\t") != 1:  # as data.py reads manifests
                        raise DownloadError(f"{file}:{line_no}: expected two tab-separated columns, "
                                            f"'audio path<TAB>transcript'")
                    line = line.partition("\t")[2]
                words = normalize(line)[0].split()
                if words:
                    yield words


def kneser_ney(sentences, order):
    """Interpolated Kneser-Ney (one discount per order, D = n1 / (n1 + 2 n2) from the counts of
    n-grams seen once and twice) in backoff form: [{ngram: [probability, backoff or None]}].
    p(w | h) = max(c(h w) - D, 0) / c(h) + D * types(h) / c(h) * p(w | h without its first word),
    and the second term's factor is h's backoff weight, so every history's column sums to 1."""
    counts = [collections.Counter() for _ in range(order + 1)]
    for words in sentences:
        padded = ("<s>", *words, "</s>")
        for n in range(1, order + 1):
            counts[n].update(padded[i:i + n] for i in range(len(padded) - n + 1))
    if not counts[1]:
        raise DownloadError("the text holds no words")
    # Lower orders count distinct left neighbours, not occurrences: a word frequent after only one
    # word ("francisco") should not be likely after others. An n-gram at <s> has no left neighbour.
    for n in range(1, order):
        left = collections.Counter(gram[1:] for gram in counts[n + 1])
        counts[n] = collections.Counter({g: c if g[0] == "<s>" else left[g] for g, c in counts[n].items()})
    del counts[1][("<s>",)]  # never predicted; it is only a history
    model = [{("<s>",): [0.0, None]}]
    for n in range(1, order + 1):
        ones, twos = (sum(1 for c in counts[n].values() if c == k) for k in (1, 2))
        discount = ones / (ones + 2 * twos) if ones and twos else 0.5
        totals, types = collections.Counter(), collections.Counter()
        for gram, count in counts[n].items():
            totals[gram[:-1]] += count
            types[gram[:-1]] += 1
        backoff = {history: discount * types[history] / total for history, total in totals.items()}
        lower = model[n - 2] if n > 1 else {}
        grams = model[0] if n == 1 else {}
        for gram, count in counts[n].items():
            below = lower[gram[1:]][0] if n > 1 else 1 / (len(counts[1]) + 1)  # uniform, <unk> too
            grams[gram] = [(count - discount) / totals[gram[:-1]] + backoff[gram[:-1]] * below, None]
        if n == 1:
            grams[("<unk>",)] = [backoff[()] / (len(counts[1]) + 1), None]
        else:
            for history, weight in backoff.items():
                model[n - 2][history][1] = weight
            model.append(grams)
    return model


def write_arpa(model, path):
    """The model as an ARPA file (tab-separated fields, as KenLM requires) and, beside it,
    the lexicon: each word and its spelling, a line each."""
    log10 = lambda x: f"{math.log10(x):.6f}" if x > 0 else "-99"
    lines = ["", "\\data\\"] + [f"ngram {n}={len(grams)}" for n, grams in enumerate(model, 1)]
    for n, grams in enumerate(model, 1):
        lines += ["", f"\\{n}-grams:"]
        for gram, (probability, backoff) in grams.items():
            fields = [log10(probability), " ".join(gram)] + ([log10(backoff)] if backoff else [])
            lines.append("\t".join(fields))
    lines += ["", "\\end\\", ""]
    words = sorted(g[0] for g in model[0] if g[0] not in ("<s>", "</s>", "<unk>"))
    lexicon = "".join(f"{word}\t{' '.join(word)}\n" for word in words)
    for target, text in zip(lm_outputs(path), ("\n".join(lines), lexicon)):
        partial = target.with_name(target.name + ".part")
        with (gzip.open if target.suffix == ".gz" else open)(partial, "wt", encoding="utf-8") as f:
            f.write(text)
        partial.replace(target)


def lm_outputs(path):
    """The ARPA file (gzipped if its name ends in .gz) and its lexicon beside it."""
    return path, path.with_suffix(".lexicon.txt")


def build_lm(text_paths, out, order):
    """Every file it would write is checked before any work: none may exist, their folder must."""
    taken = [str(p) for p in lm_outputs(out) if p.exists()]
    if taken:
        raise DownloadError(f"{' and '.join(taken)} already exist{'s' * (len(taken) == 1)}; nothing was "
                            f"written. Remove {'it' if len(taken) == 1 else 'them'} or pick another --lm-out.")
    if not out.parent.is_dir():
        raise DownloadError(f"--lm-out {out}: the folder {out.parent} does not exist; create it first")
    sentences = list(read_sentences(text_paths))
    if not sentences:
        raise DownloadError(f"{', '.join(map(str, text_paths))}: no words spelled with a-z and apostrophes "
                            f"to build an LM from (digits and other symbols are dropped); nothing was written")
    model = kneser_ney(sentences, order)
    write_arpa(model, out)
    print(f"{out}: {', '.join(f'{len(grams):,} {n}-grams' for n, grams in enumerate(model, 1))}; "
          f"lexicon {out.with_suffix('.lexicon.txt')}", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = ["an4", *sorted(PUBLISHED_MD5), *LIBRISPEECH_LM_FILES]
    parser.add_argument("corpora", nargs="*", metavar="NAME",
                        help=f"{', '.join(choices)}: an4, LibriSpeech subsets, librispeech-lm (pruned "
                             f"3-gram and word list, 40 MB) and/or librispeech-4gram (1.4 GB)")
    parser.add_argument("--root", default=".", help="folder that will hold AN4/ and LibriSpeech/")
    parser.add_argument("--base-url", help=f"another location of the files (default: {AN4_MIRROR} "
                                           f"for an4, {LIBRISPEECH_MIRROR} for LibriSpeech, "
                                           f"{LIBRISPEECH_LM_MIRROR} for its LMs); what it serves is "
                                           f"checked against the official checksums all the same")
    parser.add_argument("--lm-from", nargs="+", metavar="TEXT",
                        help="build a word n-gram LM from these LibriSpeech-layout folders, TSV "
                             "manifests or text files (a sentence per line)")
    parser.add_argument("--lm-out", type=Path, help="the ARPA file --lm-from writes (and its .lexicon.txt)")
    parser.add_argument("--lm-order", type=int, default=3, choices=range(2, 7), metavar="N",
                        help="n of the n-gram LM (2-6: KenLM reads bigrams and longer)")
    args = parser.parse_args(argv)
    for name in set(args.corpora) - set(choices):
        parser.error(f"unknown name {name!r}: choose from {', '.join(choices)}")
    if not args.corpora and not args.lm_from:
        parser.error("name corpora to download, or --lm-from text to build an LM from")
    if bool(args.lm_from) != bool(args.lm_out):
        parser.error("--lm-from and --lm-out go together")
    root = Path(args.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        try:  # before any download: a partial archive must have somewhere to go
            tempfile.TemporaryFile(dir=root).close()
        except OSError as e:
            raise DownloadError(f"--root {root}: cannot write there ({e.strerror}); pick another --root") from None
        if "an4" in args.corpora:
            download_an4(root, (args.base_url or AN4_MIRROR).rstrip("/"))
        subsets = [c for c in args.corpora if c in PUBLISHED_MD5]
        if subsets:
            download_librispeech(subsets, root, (args.base_url or LIBRISPEECH_MIRROR).rstrip("/"))
        for name in (c for c in args.corpora if c in LIBRISPEECH_LM_FILES):
            download_librispeech_lm(name, root, (args.base_url or LIBRISPEECH_LM_MIRROR).rstrip("/"))
        if args.lm_from:
            build_lm(args.lm_from, args.lm_out, args.lm_order)
    except DownloadError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted. Run the same command again: a download continues where it stopped, and "
                 "nothing half-written is taken for finished.")

if __name__ == "__main__":
    main()
