"""Get corpora: CMU's AN4 (50 minutes of real speech, a first run on a CPU), LibriSpeech and Mini
LibriSpeech (language models: lm.py).

    python download.py an4 --root .                                    # -> ./AN4/{train,dev,test}
    python download.py train-clean-100 dev-clean test-clean --root .   # -> ./LibriSpeech/<subset>
    python download.py train-clean-5 dev-clean-2 --root .              # Mini LibriSpeech, 7 h

Every archive shows bytes, rate and ETA while it downloads; an interrupted download continues
where it stopped when the same command is run again. An archive is extracted beside its target
and moved in only when complete, so a failed download or extraction never leaves a corpus that
looks ready. Corpora already there are skipped. Only the standard library and soundfile are
needed to download, so this runs before anything else is installed.
"""
import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import soundfile

OPENSLR = "https://www.openslr.org/resources"
# The MD5 sums OpenSLR publishes for its LibriSpeech archives, by its resource number: 12 is
# LibriSpeech (openslr.org/12); 31 is Mini LibriSpeech (openslr.org/31: 5 h of train-clean-100's
# speakers and 2 h of dev-clean's, for a CPU), whose md5sum.txt PaddleSpeech's and others'
# downloaders quote alike.
PUBLISHED_MD5 = {
    "dev-clean": (12, "42e2234ba48799c1f50f24a7926300a1"),
    "dev-other": (12, "c8d0bcc9cca99d4f8b62fcc847357931"),
    "test-clean": (12, "32fa31d27d2e1cad72775fee3f4849a9"),
    "test-other": (12, "fb5a50374b501bb3bac4815ee91d3135"),
    "train-clean-100": (12, "2a93770f6d5c6c964bc36631d331a522"),
    "train-clean-360": (12, "c0e676e450a7ff2f54aeade5171606fa"),
    "train-other-500": (12, "d1a0fd59409feb2c614ce4d30c387708"),
    "train-clean-5": (31, "5df7d4e78065366204ca6845bb08f490"),
    "dev-clean-2": (31, "6d7ab67ac6a1d2c993d050e16d61080d"),
}

# Utterances in each corpus as published, and the file a finished download leaves in its folder: a folder
# with fewer (a copy cut short, one speaker copied) is not taken for the corpus.
UTTERANCES = {"dev-clean": 2703, "dev-other": 2864, "test-clean": 2620, "test-other": 2939,
              "train-clean-100": 28539, "train-clean-360": 104014, "train-other-500": 148688,
              "train-clean-5": 1519, "dev-clean-2": 1089, "an4": 1078}
FINISHED = ".downloaded"

AN4_MIRROR = "http://www.speech.cs.cmu.edu/databases/an4"
AN4_ARCHIVE = "an4_raw.bigendian.tar.gz"
AN4_SAMPLE_RATE = 16000  # the .raw files are headerless 16-bit big-endian mono PCM at 16 kHz
# CMU publishes no checksum for AN4 (and serves it over plain http), so the content is pinned: the
# SHA-256 of every listed utterance's id, transcript and samples (an4_digest), from a copy of the
# archive whose counts match CMU's published ones. The counts and lengths are checked first, to say
# plainly what differs when they do.
AN4_SHA256 = "675456731fc01d49c77c820539270479826449d405f650c5b50bd0e70884fd30"
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
        again = "Run the same command again when the server answers"
        if isinstance(e, urllib.error.HTTPError) and e.code == 404:
            raise DownloadError(f"downloading {url}: the server has no such file (HTTP 404): pick a "
                                f"--base-url that serves it.") from None
        if have:
            again = f"Run the same command again: it continues from the {have:,} bytes in {archive}"
        raise DownloadError(f"downloading {url}: {e}. {again} (or pick another --base-url).") from None


def digest_of(path, digest):
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def check_place(folder):
    """DownloadError, before any download, if folder cannot become a corpus's folder."""
    if folder.is_symlink() and not folder.exists():
        raise DownloadError(f"{folder} is a link to {folder.readlink()}, which does not exist (a disk not "
                            f"mounted?): mount it, remove the link, or pick another --root. Nothing was "
                            f"downloaded.")
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{folder} is a file where the corpus's folder goes: move it away, or pick "
                            f"another --root. Nothing was downloaded.")


def already_there(final, pattern, utterances):
    """True if final is a finished download (a folder holding pattern, each transcript line's .flac
    beside it, and all the corpus's utterances: this script's mark of a finished download, or as many as
    the published corpus has); False if it is absent or an empty folder (replaced); DownloadError, before
    any download, if it is something else."""
    check_place(final)
    transcripts = list(final.rglob(pattern)) if final.is_dir() else []
    listed = 0
    for trans in transcripts:
        ids = [line.split()[0] for line in trans.read_text(errors="replace").splitlines() if line.strip()]
        missing = [i for i in ids if not (trans.parent / f"{i}.flac").exists()]
        listed += len(ids)
        if missing:
            raise DownloadError(f"{final} is not a finished download: {trans} lists {len(missing)} "
                                f"utterances whose .flac is not beside it (e.g. {missing[0]}; a copy cut "
                                f"short?). Move it away or finish the copy, or pick another --root. Nothing "
                                f"was downloaded.")
    if transcripts and not (final / FINISHED).exists() and listed != utterances:
        raise DownloadError(f"{final} is not a finished download: it holds {listed:,} utterances of the "
                            f"corpus's {utterances:,} (a copy cut short, or some folders only?). Move it "
                            f"away or finish the copy, or pick another --root. Nothing was downloaded.")
    if transcripts:
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
def download_librispeech(subsets, root, base_url=None):
    """Fetch, verify and extract LibriSpeech subsets into root/LibriSpeech/<subset>, from OpenSLR or
    base_url (a folder serving <subset>.tar.gz). Every archive is checked against OpenSLR's
    published MD5, whichever mirror served it."""
    for folder in (root / "LibriSpeech", *(root / "LibriSpeech" / subset for subset in subsets)):
        check_place(folder)  # now, not after the download and extraction
    for subset in subsets:
        resource, md5 = PUBLISHED_MD5[subset]
        url = f"{base_url or f'{OPENSLR}/{resource}'}/{subset}.tar.gz"
        final = root / "LibriSpeech" / subset
        if already_there(final, "*.trans.txt", UTTERANCES[subset]):
            print(f"{final} is already there; skipping {subset}", file=sys.stderr)
            continue
        archive = root / f"{subset}.tar.gz.part"
        fetch_archive(url, archive)
        actual = digest_of(archive, hashlib.md5())
        if actual != md5:
            archive.unlink()
            raise DownloadError(f"{url} has MD5 {actual}, OpenSLR publishes {md5}; the bad file was "
                                f"removed and nothing was extracted. Run the command again, or pick "
                                f"another mirror with --base-url.")
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
        (final / FINISHED).touch()
        print(f"{final}: ready", file=sys.stderr)


# ------------------------------------------------------------------------------------- AN4
def read_an4_list(etc, part):
    """[(speaker, utterance id, transcript)] from an4_<part>.fileids and .transcription, whose
    lines read 'an4_clstk/fash/an251-fash-b' and '<s> YES </s> (an251-fash-b)'."""
    try:
        fileids = (etc / f"an4_{part}.fileids").read_text(encoding="utf-8").split()
        lines = (etc / f"an4_{part}.transcription").read_text(encoding="utf-8").splitlines()
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


def an4_digest(source):
    """SHA-256 of AN4's lists and audio: each utterance's id, transcript and raw samples in turn."""
    digest = hashlib.sha256()
    for part in AN4_UTTERANCES:
        for fileid, _, utt_id, text in read_an4_list(source / "etc", part):
            digest.update(f"{utt_id} {text}\n".encode())
            try:
                digest.update((source / "wav" / f"{fileid}.raw").read_bytes())
            except OSError as e:
                raise DownloadError(f"{source / 'wav' / fileid}.raw: cannot read ({e.strerror})") from None
    return digest.hexdigest()


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
    digest = an4_digest(source)
    if digest != AN4_SHA256:
        raise DownloadError(f"its transcripts or audio differ from CMU's AN4 (SHA-256 {digest} of its lists "
                            f"and samples, expected {AN4_SHA256}): it is not CMU's AN4")
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
            (folder / f"{folder.parent.name}-an4.trans.txt").write_text("".join(lines), encoding="utf-8")
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
    if already_there(final, "*.trans.txt", UTTERANCES["an4"]):
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
    (final / FINISHED).touch()
    for leftover in (extracted, written):
        shutil.rmtree(leftover)
    archive.unlink()
    print(f"{final}: ready ({', '.join(f'{split} {n}' for split, n in sorted(counts.items()))} utterances)",
          file=sys.stderr)


def writable_root(path):
    """The --root folder, made and checked before any download: a partial archive must have
    somewhere to go."""
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise DownloadError(f"--root {root}: cannot write there ({e.strerror}); pick another") from None
    return root


def exit_on_errors(work, interrupted="interrupted. Run the same command again: a download continues where "
                                       "it stopped, and nothing half-written is taken for finished."):
    """Run work(): a DownloadError, a disk error or Ctrl-C (interrupted: what to say) ends the command
    with one line."""
    try:
        work()
    except DownloadError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(interrupted)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = ["an4", *sorted(PUBLISHED_MD5)]
    parser.add_argument("corpora", nargs="+", metavar="NAME", help=f"{', '.join(choices)}")
    parser.add_argument("--root", default=".", help="folder that will hold AN4/ and LibriSpeech/")
    parser.add_argument("--base-url", help=f"another folder that serves the archives (default: {AN4_MIRROR} "
                                           f"for an4, {OPENSLR}/12 for LibriSpeech, /31 for Mini "
                                           f"LibriSpeech); what it serves is checked against OpenSLR's MD5s "
                                           f"all the same")
    args = parser.parse_args(argv)
    for name in set(args.corpora) - set(choices):
        parser.error(f"unknown name {name!r}: choose from {', '.join(choices)} (LMs: lm.py)")

    def work():
        root = writable_root(args.root)
        if "an4" in args.corpora:
            download_an4(root, (args.base_url or AN4_MIRROR).rstrip("/"))
        subsets = [c for c in args.corpora if c in PUBLISHED_MD5]
        if subsets:
            download_librispeech(subsets, root, args.base_url and args.base_url.rstrip("/"))
    exit_on_errors(work)


if __name__ == "__main__":
    main()
