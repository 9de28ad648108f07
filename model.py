"""The acoustic model: padded 16 kHz waveforms + lengths -> CTC log-probabilities + lengths, and
what those mean (its vocabulary, greedy decoding).

    model = CTCModel(ModelConfig())
    log_probs, out_lengths = model(waves, wave_lengths)   # (B, T, vocab), (B,)
    texts = greedy_decode(log_probs, out_lengths, model.vocab)   # ["hello world", ...]

Read top to bottom, this file is the whole path from samples to the CTC loss input:
(speed perturbation, training only) -> log-mel -> per-utterance normalization -> frequency warp
and SpecAugment (training only) ->
2-D conv with a time stride -> bidirectional GRU -> linear -> log_softmax. Features live inside
the model so that training and decoding cannot disagree on them. Every step is
padding-invariant: an utterance gets the same output alone and inside a padded batch. Imports
only torch and torchaudio: this file works alone.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

# The output symbols: index 0 is CTC's blank ("_"), 1 the space between words, then the alphabet's
# symbols, one Unicode character each. English's are the apostrophe and a-z; another language's come
# from train.py --alphabet and travel in the model's config, so every checkpoint knows its own.
ENGLISH = "'" + "".join(chr(c) for c in range(ord("a"), ord("z") + 1))
BLANK = 0                            # CTCLoss(blank=0)
SPACE = 1


def vocabulary(alphabet):
    return ["_", " "] + list(alphabet)


VOCAB = vocabulary(ENGLISH)
SAMPLE_RATE = 16000
WINDOW = 400                         # 25 ms analysis window
HOP = 160                            # 10 ms hop
FRAMES_PER_SECOND = SAMPLE_RATE // HOP  # 100 feature frames per second
CONV_KERNEL = 3
# Per conv layer time strides for each supported total stride. A deep RNN at 100 frames/s is
# slow and hard to train; English speech is at most ~20 characters/s, so 25-50 output frames/s
# still leaves CTC room for a blank between repeated letters.
TIME_STRIDES = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}
FREQ_STRIDE = 2                      # each conv layer halves the mel axis as well
WARP_KNOTS = 4                       # frequency warp factors at ~0, 0.9, 3 and 8 kHz (80 mels)
SPEEDS = (0.9, 1.0, 1.1)             # speed perturbation's factors (Ko et al. 2015)
LOUDER_DB = 20                       # frames this far above the reference level are not speech: a knock


@dataclass
class ModelConfig:
    alphabet: str = ENGLISH          # the symbols written besides blank and space
    n_mels: int = 80
    time_stride: int = 2             # output frames/s = FRAMES_PER_SECOND / time_stride
    conv_channels: int = 32
    rnn_layers: int = 5
    rnn_hidden: int = 512            # per direction
    dropout: float = 0.1
    norm_range_db: float = 40.0      # normalize by frames within this of the reference (0: every frame)
    reference_ms: int = 100          # the reference: the level the loudest this long reach (10: one frame)
    floor_db: float = 80.0           # each mel bin's floor, this far below the reference (0: 1e-6)
    speed_perturb: bool = False      # play each training batch at one of SPEEDS
    freq_warp: float = 0.1           # VTLP: each frequency region scaled by a factor in 1 +- this
    freq_masks: int = 2              # SpecAugment (LibriSpeech "LD" policy, Park et al. 2019)
    freq_mask_width: int = 27
    time_masks: int = 2
    time_mask_width: int = 40        # frames (0.4 s), and at most 20% of the utterance


def hz_to_mel(hz):
    return 2595 * torch.log10(1 + hz / 700)


def mel_to_hz(mel):
    return 700 * (10 ** (mel / 2595) - 1)


def frame_lengths(wave_lengths):
    """Feature frames per utterance: windows that lie wholly inside the audio (center=False)."""
    return torch.div(wave_lengths - WINDOW, HOP, rounding_mode="floor").clamp(min=-1) + 1


def conv_lengths(lengths, stride):
    """Output length of a conv with kernel 3, padding 1 and this stride."""
    return torch.div(lengths + 2 * (CONV_KERNEL // 2) - CONV_KERNEL, stride, rounding_mode="floor") + 1


def lengths_mask(lengths, max_len):
    """(B, max_len) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def reverse_within_lengths(x, lengths):
    """Flip each sequence's first length frames in time, leaving its padding at the end: (B, T, F)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    lengths = lengths[:, None]
    index = torch.where(t < lengths, lengths - 1 - t, t)
    return x.gather(1, index[:, :, None].expand_as(x))


class BiGRULayer(nn.Module):
    """LayerNorm, then a bidirectional GRU over a padded batch that the padding cannot affect:
    the forward GRU meets each utterance's padding only after its last frame, and the backward
    GRU reads each utterance reversed within its own length, so its padding also comes last.
    Faster than one bidirectional GRU over packed sequences, on a CPU (1.3x) and with cuDNN on
    an H200 (1.1-1.7x): RESULTS.md."""

    def __init__(self, input_size, hidden):
        super().__init__()
        # Conv features arrive at an arbitrary scale and deep RNN stacks drift: normalizing
        # each layer's input shortens the blank plateau a lot.
        self.norm = nn.LayerNorm(input_size)
        self.forward_gru = nn.GRU(input_size, hidden, batch_first=True)
        self.backward_gru = nn.GRU(input_size, hidden, batch_first=True)

    def forward(self, x, lengths):
        x = self.norm(x)
        left_to_right, _ = self.forward_gru(x)
        right_to_left, _ = self.backward_gru(reverse_within_lengths(x, lengths))
        return torch.cat([left_to_right, reverse_within_lengths(right_to_left, lengths)], dim=-1)


class CTCModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.time_stride not in TIME_STRIDES:
            raise ValueError(f"time_stride must be one of {sorted(TIME_STRIDES)}, got {config.time_stride}")
        self.config = config
        self.vocab = vocabulary(config.alphabet)
        # power=2 then log: log-mel energies. center=False keeps every frame inside its own
        # utterance, which makes features independent of the padding after it.
        self.mel = torchaudio.transforms.MelSpectrogram(
            SAMPLE_RATE, n_fft=WINDOW, hop_length=HOP, n_mels=config.n_mels, center=False)
        channels = config.conv_channels
        self.convs = nn.ModuleList([
            nn.Conv2d(1 if i == 0 else channels, channels, CONV_KERNEL,
                      stride=(s, FREQ_STRIDE), padding=CONV_KERNEL // 2)
            for i, s in enumerate(TIME_STRIDES[config.time_stride])])
        freq_bins = config.n_mels
        for _ in self.convs:
            freq_bins = (freq_bins - 1) // FREQ_STRIDE + 1
        sizes = [channels * freq_bins] + [2 * config.rnn_hidden] * (config.rnn_layers - 1)
        self.layers = nn.ModuleList(BiGRULayer(size, config.rnn_hidden) for size in sizes)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(2 * config.rnn_hidden, len(self.vocab))

    def output_lengths(self, wave_lengths):
        """CTC output frames for waveforms of these lengths, from the conv arithmetic alone."""
        lengths = frame_lengths(torch.as_tensor(wave_lengths))
        for s in TIME_STRIDES[self.config.time_stride]:
            lengths = conv_lengths(lengths, s)
        return lengths.clamp(min=0)

    def perturb_speed(self, waves, wave_lengths):
        """Play the batch faster or slower, tempo and pitch together, as a tape would: the
        samples are read as if recorded at SAMPLE_RATE * speed and resampled to SAMPLE_RATE."""
        speed = SPEEDS[int(torch.randint(len(SPEEDS), ()))]
        if speed == 1.0:
            return waves, wave_lengths
        recorded_at = round(SAMPLE_RATE * speed)
        waves = torchaudio.functional.resample(waves, recorded_at, SAMPLE_RATE)
        lengths = torch.div(wave_lengths * SAMPLE_RATE + recorded_at - 1, recorded_at, rounding_mode="floor")
        return waves, lengths  # ceil(length * SAMPLE_RATE / recorded_at), as resample's own output

    def features(self, waves, wave_lengths):
        """Log-mel, normalized per utterance and per bin over real frames only: (B, T, n_mels). The mean
        and variance come from the frames within norm_range_db of the reference level, which are the words:
        taken over every frame (0), a pause of room tone or digital silence around the words moves the
        statistics that the words are scaled by, and 1 s of it on each side of AN4's test utterances
        took a model from 11 to 29% WER. 40 dB keeps a quiet recorder's floor (-80 dBFS) out and the
        quiet consonants in; over the floor of a noisy room the pause is within it (RESULTS.md).
        The reference is the level that the loudest reference_ms of the audio reach, not its loudest
        frame: a click or a knock would otherwise leave only itself counted. Each bin's floor (the log of
        zero is -inf) lies floor_db below the reference, as Whisper's clamp does, so that the features of
        x and of 0.003 x are equal: an absolute floor flattened a quiet microphone's quieter bands."""
        lengths = frame_lengths(wave_lengths).clamp(min=0).to(waves.device, non_blocking=True)
        with torch.autocast(waves.device.type, enabled=False):  # log of small energies needs fp32
            power = self.mel(waves.float())                   # (B, n_mels, T)
            real = lengths_mask(lengths, power.shape[2])
            level = 10 * torch.log10(power.sum(1).clamp(min=1e-30))  # (B, T) dB
            reference = self.reference_level(level, real)     # (B, 1) dB
            floor = 1e-6
            if self.config.floor_db:
                floor = 10 ** ((reference[:, :, None] - self.config.floor_db) / 10)
            x = torch.log(power + floor).transpose(1, 2)
        counted = real
        if self.config.norm_range_db:
            # Nor a click or a knock far louder than the words, with the frames whose windows reach into it
            # (none is in a model trained before reference_ms: nothing is louder than its reference).
            knock = F.max_pool1d((level > reference + LOUDER_DB).float()[:, None], 5, 1, 2)[:, 0] > 0
            counted = real & (level >= reference - self.config.norm_range_db) & ~knock
        counted = counted[:, :, None]
        count = counted.sum(1, keepdim=True).clamp(min=1)
        mean = (x * counted).sum(1, keepdim=True) / count
        var = (((x - mean) * counted) ** 2).sum(1, keepdim=True) / count
        return ((x - mean) / (var + 1e-5).sqrt()) * real[:, :, None], lengths

    def reference_level(self, level, real):
        """(B, 1) dB: the level that the loudest reference_ms of each utterance's frames reach, together:
        the k-th loudest real frame (all of them, if fewer)."""
        loudest_first = level.masked_fill(~real, -torch.inf).sort(1, descending=True).values
        frames = self.config.reference_ms * FRAMES_PER_SECOND // 1000
        k = (real.sum(1, keepdim=True).clamp(max=frames) - 1).clamp(min=0)
        return loudest_first.gather(1, k).clamp(min=-300)

    def warp_frequencies(self, x, factor):
        """Vocal tract length perturbation (Jaitly & Hinton 2013), per frequency region: read
        each utterance's mel axis as if the frequency at each bin were scaled by that bin's
        factor, (B, 1) for one factor or (B, n_mels) for a smooth curve of them, as a longer
        or shorter vocal tract, or another mouth shape, moves the formants. In a small
        corpus, unseen voices cause most dev errors."""
        B, T, n_mels = x.shape
        mel_top = hz_to_mel(torch.tensor(SAMPLE_RATE / 2, device=x.device))
        centers = mel_to_hz(mel_top * torch.arange(1, n_mels + 1, device=x.device) / (n_mels + 1))
        # The fractional bin whose center (torchaudio's HTK mel scale) is center / factor.
        source = (hz_to_mel(centers / factor) / mel_top * (n_mels + 1) - 1).clamp(0, n_mels - 1)
        low = source.floor().long().clamp(max=n_mels - 2)
        weight = (source - low)[:, None, :]
        low = low[:, None, :].expand(B, T, n_mels)
        return torch.lerp(x.gather(2, low), x.gather(2, low + 1), weight)

    def spec_augment(self, x, lengths):
        """Zero random mel bands and time spans; vectorized over the batch."""
        B, T, n_mels = x.shape
        c = self.config
        keep = torch.ones_like(x, dtype=torch.bool)
        bins = torch.arange(n_mels, device=x.device)[None, None, :]
        frames = torch.arange(T, device=x.device)[None, :, None]
        for _ in range(c.freq_masks):
            width = (torch.rand(B, 1, 1, device=x.device) * (c.freq_mask_width + 1)).long()
            start = (torch.rand(B, 1, 1, device=x.device) * (n_mels - width + 1)).long()
            keep &= (bins < start) | (bins >= start + width)
        lengths = lengths[:, None, None]
        max_width = (lengths // 5).clamp(max=c.time_mask_width)
        for _ in range(c.time_masks):
            width = (torch.rand(B, 1, 1, device=x.device) * (max_width + 1)).long()
            start = (torch.rand(B, 1, 1, device=x.device) * (lengths - width + 1)).long()
            keep &= (frames < start) | (frames >= start + width)
        return x * keep

    def augment(self, x, lengths):
        """Training only: frequency warp, then SpecAugment's masks."""
        if self.config.freq_warp:
            # One factor at each of WARP_KNOTS points along the mel axis, linear between: voices
            # differ in how they scale each formant, not only in one vocal tract length.
            uniform = 2 * torch.rand(len(x), 1, WARP_KNOTS, device=x.device) - 1
            knots = 1 + self.config.freq_warp * uniform
            factor = F.interpolate(knots, size=x.shape[2], mode="linear", align_corners=True)[:, 0]
            x = self.warp_frequencies(x, factor)
        return self.spec_augment(x, lengths)

    def front_end(self, x, lengths):
        """(B, T, n_mels) features -> (B, T / stride, channels * freq) conv features, lengths."""
        x = x.unsqueeze(1)                                  # (B, 1, T, n_mels)
        for conv, stride in zip(self.convs, TIME_STRIDES[self.config.time_stride]):
            lengths = conv_lengths(lengths, stride)
            x = F.gelu(conv(x))
            # Zero the padded frames again so the next conv sees zeros there, as it would alone.
            x = x * lengths_mask(lengths, x.shape[2])[:, None, :, None]
        return x.permute(0, 2, 1, 3).flatten(2), lengths

    def forward(self, waves, wave_lengths):
        """waves (B, samples) float, wave_lengths (B,) int on the CPU (no device sync to read
        them) -> log_probs (B, T, vocab) float32, out_lengths (B,) on the CPU."""
        wave_lengths = wave_lengths.cpu()
        if self.training and self.config.speed_perturb:
            waves, wave_lengths = self.perturb_speed(waves, wave_lengths)
        x, lengths = self.features(waves, wave_lengths)
        if self.training:
            x = self.augment(x, lengths)
        x, lengths = self.front_end(x, lengths)
        for i, layer in enumerate(self.layers):
            x = layer(self.dropout(x) if i > 0 else x, lengths)
        logits = self.output(self.dropout(x))
        return F.log_softmax(logits.float(), dim=-1), self.output_lengths(wave_lengths)



# ---------------------------------------------------------------- what the log-probs mean
def greedy_spans(log_probs, out_lengths, vocab):
    """Per utterance, the best path (argmax per frame, repeats collapsed, blanks dropped, up to
    each output length) as [(symbol, first frame, last frame)]. A letter repeated with a blank
    between ("l _ l") stays double."""
    best = log_probs.argmax(-1).cpu()
    new_symbol = torch.ones_like(best, dtype=torch.bool)
    new_symbol[:, 1:] = best[:, 1:] != best[:, :-1]
    spans = []
    for row, starts, length in zip(best, new_symbol, out_lengths.tolist()):
        first = starts[:length].nonzero()[:, 0]
        last = torch.cat([first[1:], torch.tensor([length])]) - 1
        symbols = row[first].tolist()
        spans.append([(vocab[s], f, e) for s, f, e in zip(symbols, first.tolist(), last.tolist())
                      if s != BLANK])
    return spans


def greedy_decode(log_probs, out_lengths, vocab):
    """The best path's text; doubled or leading spaces, which a best path can hold, squeezed."""
    paths = greedy_spans(log_probs, out_lengths, vocab)
    return [" ".join("".join(symbol for symbol, _, _ in spans).split()) for spans in paths]
