"""Word n-gram language models for decode.py's beam search: build an interpolated Kneser-Ney
ARPA from your own text, or fetch LibriSpeech's official ones.

    python lm.py build AN4/train --out AN4/train.3gram.arpa      # from transcripts, 6 s for AN4
    python lm.py build corpus.txt more.tsv --out my.4gram.arpa.gz --order 4
    python lm.py build books.txt --vocab librispeech-vocab.txt --out books.3gram.arpa   # its words too
    python lm.py build vi/train.tsv --alphabet runs/<run>/best.pt --out vi.3gram.arpa   # a model's alphabet
    python lm.py librispeech --root .        # -> ./LibriSpeech/lm/3-gram.pruned.1e-7.arpa.gz + lexicon
    python lm.py librispeech --root . --4gram                    # the 1.4 GB 4-gram

build reads LibriSpeech-layout folders (.trans.txt), TSV manifests and plain text files (a
sentence per line), spells every word as the model does (data.normalize; --alphabet: a checkpoint's
symbols, an alphabet file's, or English's, the default), and writes the ARPA
file (gzipped if its name ends in .gz) with its words beside it (.lexicon.txt). --vocab adds
the words of a list (a word per line) that the text lacks, each with the probability the model
gives an unseen word, so that a beam search can spell them. Everything is counted in memory
(1.2 GB for 1.4M words). No file it would write may exist already.
"""
import argparse
import collections
import gzip
import hashlib
import math
import sys
import time
import zipfile
from pathlib import Path

import download
from download import DownloadError
from data import InputError, files_under, normalize, read_alphabet
from model import ENGLISH
from runs import load_checkpoint, utf8_output, write_atomically


def unreadable_folder(reason, folder):
    raise DownloadError(f"{folder}: {reason}")


def read_sentences(paths, alphabet=ENGLISH, changed=None):
    """Word lists from LibriSpeech-layout folders (.trans.txt), TSV manifests (the transcript
    column) and plain text files (a sentence per line), normalized as the model spells them; changed (a
    Counter) counts the characters "dropped" and "folded" (data.normalize) and the "letters" read."""
    for path in map(Path, paths):
        if path.is_dir():  # linked speaker folders are followed, as train.py follows them
            files = [f for f in files_under(path, skip=unreadable_folder) if f.name.endswith(".trans.txt")]
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
                elif file.suffix == ".tsv":
                    if not line.strip() or line.startswith("#"):
                        continue
                    if line.count("\t") != 1:  # as data.py reads manifests
                        raise DownloadError(f"{file}:{line_no}: expected two tab-separated columns, "
                                            f"'audio path<TAB>transcript'")
                    line = line.partition("\t")[2]
                text, dropped, folded = normalize(line, alphabet)
                if changed is not None:
                    changed.update(dropped=dropped, folded=folded, letters=sum(map(str.isalpha, line)))
                words = text.split()
                if words:
                    yield words


def kneser_ney(sentences, order, extra_words=()):
    """Interpolated Kneser-Ney (one discount per order, D = n1 / (n1 + 2 n2) from the counts of
    n-grams seen once and twice) in backoff form: [{ngram: [probability, backoff or None]}].
    p(w | h) = max(c(h w) - D, 0) / c(h) + D * types(h) / c(h) * p(w | h without its first word),
    and the second term's factor is h's backoff weight, so every history's column sums to 1.
    extra_words the text lacks are unigrams counted 0: each gets what <unk> gets."""
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
    unseen = sorted({(word,) for word in extra_words} - counts[1].keys())
    uniform = 1 / (len(counts[1]) + len(unseen) + 1)  # over the words, </s> and <unk>
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
            below = lower[gram[1:]][0] if n > 1 else uniform
            grams[gram] = [(count - discount) / totals[gram[:-1]] + backoff[gram[:-1]] * below, None]
        if n == 1:
            grams.update((gram, [backoff[()] * uniform, None]) for gram in [("<unk>",), *unseen])
        else:
            for history, weight in backoff.items():
                model[n - 2][history][1] = weight
            model.append(grams)
    return model


def write_arpa(model, path):
    """The model as an ARPA file (tab-separated fields, as KenLM requires) and, beside it,
    the lexicon: each word and its spelling, a line each."""
    def log10(x):
        return f"{math.log10(x):.6f}" if x > 0 else "-99"

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
        encoded = text.encode()
        encoded = gzip.compress(encoded) if target.suffix == ".gz" else encoded
        write_atomically(target, lambda f: f.write(encoded))


def lm_outputs(path):
    """The ARPA file (gzipped if its name ends in .gz) and its lexicon beside it."""
    return path, path.with_suffix(".lexicon.txt")


# The phones of a pronunciation lexicon (CMUdict's, LibriSpeech's), less their stress digits 0-2.
ARPABET = set("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W "
              "Y Z ZH".split())
IPA = ("\u0250", "\u02ff")  # IPA Extensions and modifier letters (ˈ ː ʰ): only phones are written in them


def pronunciation(fields):
    """A lexicon line's fields after the word: its phones or letters, less a probability (Kaldi's
    lexiconp.txt) and the word boundary |."""
    rest = fields[1:]
    if rest and rest[0].replace(".", "", 1).isdigit():
        rest = rest[1:]
    return [f for f in rest if f != "|"]


def is_lexicon(lines):
    """Whether a word list is a pronunciation lexicon (a word, then its phones or its letters), judged over
    the whole file, not line by line: 9 in 10 of its lines of several fields read as pronunciations
    (ARPABET in either case, IPA, single letters, or the word's letters), or those fields use at most 200
    symbols, each about 3 times or more, as a phone set does and running text does not."""
    entries = [(fields[0], pronunciation(fields)) for fields in lines if len(fields) > 1]
    if not entries:
        return False
    def reads_as_pronunciation(word, rest):
        phones = all(f.upper().rstrip("012") in ARPABET or len(f) == 1
                     or any(IPA[0] <= c <= IPA[1] for c in f) for f in rest)
        return bool(rest) and (phones or "".join(rest).lower() == word.lower())
    symbols = [f for _, rest in entries for f in rest]
    few_symbols = len(set(symbols)) <= 200 and len(symbols) >= 3 * len(set(symbols))
    return few_symbols or sum(reads_as_pronunciation(*e) for e in entries) >= 0.9 * len(entries)


def read_word_list(path, alphabet=ENGLISH):
    """The words of a word list, spelled as the model spells: every word of each line, but only the first
    of each line of a pronunciation lexicon (is_lexicon); the words of a corpus folder's transcripts. A
    field that is no such word (digits, symbols, spaces once normalized) is left out, counted and named
    on stderr, not mangled into another word."""
    if Path(path).is_dir():
        return sorted({word for sentence in read_sentences([path], alphabet) for word in sentence})
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DownloadError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    lines = list(filter(None, map(str.split, lines)))
    lexicon = is_lexicon(lines)
    words, left_out = [], []
    for fields in lines:
        for field in fields[:1] if lexicon else fields:
            word, dropped, _ = normalize(field, alphabet)
            if word and not dropped and " " not in word and not any(c.isdigit() and c not in alphabet
                                                                     for c in field):
                words.append(word)
            else:
                left_out.append(field)
    if left_out:
        print(f"note: {path}: {len(left_out)} entries are not words spelled in the alphabet ({alphabet}) and "
              f"were left out (e.g. {', '.join(left_out[:5])})", file=sys.stderr)
    return words


def build_lm(text_paths, out, order, vocab=None, quiet=False, alphabet=ENGLISH):
    """Every file it would write is checked before any work: none may exist, their folder must. Each
    stage is said on stderr as it ends, with the time so far (a book collection takes minutes)."""
    started = time.time()

    def stage(done):
        if not quiet:
            print(f"lm.py build: {done} ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    taken = [str(p) for p in lm_outputs(out) if p.exists()]
    if taken:
        raise DownloadError(f"{' and '.join(taken)}: already there; nothing was written. Remove what "
                            f"should go, or pick another --out.")
    if not out.parent.is_dir():
        raise DownloadError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    extra_words = read_word_list(vocab, alphabet) if vocab else []
    changed = collections.Counter()
    sentences = list(read_sentences(text_paths, alphabet, changed))
    if not sentences:
        raise DownloadError(f"{', '.join(map(str, text_paths))}: no words spelled in the alphabet "
                            f"({alphabet}; digits and other symbols are dropped); nothing was written")
    stage(f"read {len(sentences):,} sentences, {sum(map(len, sentences)):,} words")
    if changed["dropped"] or changed["folded"]:
        print(f"note: {changed['dropped']:,} characters not in the alphabet (digits, punctuation, letters) "
              f"were dropped and {changed['folded']:,} written without an accent or case-folded",
              file=sys.stderr)
    kept = sum(c.isalpha() for words in sentences for word in words for c in word)
    letters_lost = max(0, changed["letters"] - kept)
    if letters_lost + changed["folded"] > changed["letters"] / 100:  # not a stray letter: another alphabet
        print(f"warning: more than 1% of the letters are not the alphabet's ({alphabet}): the LM would spell "
              f"words as no model of this text does. For a model of your own alphabet, build with "
              f"--alphabet runs/<run>/best.pt", file=sys.stderr)
    model = kneser_ney(sentences, order, extra_words)
    stage(f"estimated the {order}-gram model")
    write_arpa(model, out)
    print(f"{out}: {', '.join(f'{len(grams):,} {n}-grams' for n, grams in enumerate(model, 1))}; "
          f"lexicon {out.with_suffix('.lexicon.txt')}", file=sys.stderr)


LIBRISPEECH_LM_MIRROR = "https://www.openslr.org/resources/11"
# LibriSpeech's word n-gram LMs and word list (openslr.org/11), upper case as its transcripts:
# {file: (bytes, SHA-256)}. OpenSLR publishes the sizes (Kaldi's LibriSpeech recipe checks the same)
# but no checksums; the SHA-256s are those RWTH's recipes check the official files against
# (rwth-i6/i6_experiments, common/datasets/librispeech/: language_model.py for 4-gram.arpa.gz,
# lexicon.py for the lexicon; 3-gram.pruned.1e-7 from a recipe built on them).
LIBRISPEECH_LM_FILES = {
    "pruned": {
        "3-gram.pruned.1e-7.arpa.gz":
            (34_094_057, "71dd880667cb6ea3942bb1982988c91fb1208839a21911eeec7e31c857c4bdfb"),
        "librispeech-lexicon.txt":
            (5_627_646, "d722bc29908cd338ae738edd70f61826a6fca29aaa704a9493f0006773f79d71")},
    "4gram": {
        "4-gram.arpa.gz":
            (1_355_172_078, "f2b2d1507637ddf459d3579159f7e8099ed7d77452ff1059aeeeaea33d274613")},
}


def fetch_librispeech_lm(name, root, base_url):
    """Fetch one of LIBRISPEECH_LM_FILES' sets into root/LibriSpeech/lm, as published (KenLM and
    decode.py read the gzipped ARPA files as they are)."""
    folder = root / "LibriSpeech" / "lm"
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, (size, sha256) in LIBRISPEECH_LM_FILES[name].items():
        final = folder / file_name
        if final.exists():  # checked as a download is: a file cut short or zero-filled is not the LM
            actual = (final.stat().st_size, download.digest_of(final, hashlib.sha256()))
            if actual != (size, sha256):
                raise DownloadError(f"{final} is there but is not OpenSLR's ({actual[0]:,} bytes, SHA-256 "
                                    f"{actual[1]}; expected {size:,}, {sha256}). Move it out of the way and "
                                    f"run the command again.")
            print(f"{final} is already there (checked); skipping it", file=sys.stderr)
            continue
        part = folder / f"{file_name}.part"
        download.fetch_archive(f"{base_url}/{file_name}", part)
        actual = (part.stat().st_size, download.digest_of(part, hashlib.sha256()))
        if actual != (size, sha256):
            part.unlink()
            raise DownloadError(f"{file_name} from {base_url} is not OpenSLR's ({actual[0]:,} bytes, SHA-256 "
                                f"{actual[1]}; expected {size:,}, {sha256}); the file was removed. Run the "
                                f"command again, or try another --base-url.")
        part.rename(final)
        print(f"{final}: ready", file=sys.stderr)


def model_alphabet(name):
    """The symbols --alphabet names: "english", a checkpoint's (a PyTorch file, whatever its name) or an
    alphabet file's."""
    if name == "auto":
        raise DownloadError("--alphabet auto is train.py's (the training transcripts' letters); here name "
                            "the model's checkpoint (--alphabet runs/<run>/best.pt) or its alphabet file")
    try:
        if name == "english":
            return ENGLISH
        if name.endswith(".pt") or zipfile.is_zipfile(name):
            return load_checkpoint(name)["model_config"]["alphabet"]
        return read_alphabet(name)
    except InputError as e:
        raise DownloadError(f"--alphabet {e}") from None


def main(argv=None):
    utf8_output()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="an n-gram LM from text")
    build.add_argument("text", nargs="+", help="LibriSpeech-layout folders, TSV manifests or text files")
    build.add_argument("--out", type=Path, required=True, help="the ARPA file (and its .lexicon.txt)")
    build.add_argument("--order", type=int, default=3, choices=range(2, 7), metavar="N",
                       help="n of the n-gram LM (2-6: KenLM reads bigrams and longer)")
    build.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    build.add_argument("--alphabet", default="english", help="spell words in the symbols of a train.py "
                       "checkpoint (.pt), of an alphabet file, or English's (the default)")
    build.add_argument("--vocab", type=Path, help="a word list (e.g. LibriSpeech's librispeech-vocab.txt, "
                       "a lexicon, text, or a corpus folder) whose words the LM and its lexicon also hold")
    fetch = commands.add_parser("librispeech", help="LibriSpeech's official LMs (openslr.org/11)")
    fetch.add_argument("--root", default=".", help="the LMs go to <root>/LibriSpeech/lm")
    fetch.add_argument("--4gram", dest="four_gram", action="store_true",
                       help="the 1.4 GB 4-gram instead of the pruned 3-gram and the word list (40 MB)")
    fetch.add_argument("--base-url", default=LIBRISPEECH_LM_MIRROR,
                       help="another location of the files; they are checked against the official SHA-256s")
    args = parser.parse_args(argv)
    if args.command == "build":
        download.exit_on_errors(lambda: build_lm(args.text, args.out, args.order, args.vocab, args.quiet,
                                                 model_alphabet(args.alphabet)),
                                interrupted=f"interrupted; nothing was written to {args.out} (it is written "
                                            f"whole or not at all)")
    else:
        name = "4gram" if args.four_gram else "pruned"
        download.exit_on_errors(lambda: fetch_librispeech_lm(name, download.writable_root(args.root),
                                                             args.base_url.rstrip("/")))


if __name__ == "__main__":
    main()
