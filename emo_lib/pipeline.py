"""Emotion Omni end to end: speech in -> speech out, streaming.

Every stage of the system already exists on its own; this module chains them so that the reply
is heard while it is still being written::

    query wav ──features──> semantic + emotion frames (50 Hz)        (Whisper encoder, emotion encoder)
      ──SpeechLLM.stream_reply──> per token: text, hidden h_i, emotion emo_i     (stage 1)
      ──SpeechDecoder.stream────> per token: its 25 Hz unit, pitch, energy frames (stage 2)
      ──IncrementalToken2Mel────> 80-bin log-mel chunks (chunk-aware flow matching)
      ──IncrementalVocoder──────> waveform pieces (HiFi-GAN)

**When can each piece leave?** Each stage is causal with a small, fixed look into the future,
so each output is final after a known amount of input:

- the LLM's token ``i`` (and its emotion: the head is causal) is final when it is written;
- the decoder's frames of token ``i`` need token ``i + lookahead_tokens`` (1 by default);
- mel chunk ``k`` (frames ``[s, e)``, ``chunk_frames`` = 24) needs the conditioning up to frame
  ``e + lookahead_frames`` (6), i.e. the units up to ``unit_index(e + 6 - 1)``;
- HiFi-GAN's audio of mel frame ``j`` is released when frame ``j + right_context_frames`` (12)
  has arrived (its convolutions look about 10 frames both ways).

So the first audio needs about 30 mel frames' worth of units (0.35 s of speech, about 9 units,
typically 2-4 reply tokens) plus one look-ahead token, and its first piece covers 12 mel frames.
Everything after that flows at the pace of the LLM.

**Push versus pull.** ``SpeechDecoder.stream`` and ``Vocoder.stream`` are Python generators that
*pull* from an input iterator. A live pipeline has to *push*: the LLM writes a token, and every
stage should hand out at once whatever that token made final, then wait. ``Pump`` bridges the
two: it queues pushed items for the generator's input and pulls exactly as many outputs as the
stage's documented schedule releases (above), so the generator never asks for an item that has
not arrived yet. The original ``stream`` code runs unchanged, so its equality tests still
cover the streamed pipeline. ``Token2Mel.stream`` needs the whole unit sequence up front, so
``IncrementalToken2Mel`` re-assembles its building blocks for tokens that arrive piecemeal.

**Same result as offline.** With the same noise, ``respond`` (streaming) and
``respond_offline`` (``generate`` -> ``decoder.generate`` -> ``token2mel.sample`` -> vocoder)
give the same text and units, the same mel up to float rounding, and audio that differs only by
the streamed vocoder's small seam error (see ``token2wav.Vocoder``). The flow's noise is drawn
once per reply for ``max_reply_s`` of mel (``reply_noise``): the total length is unknown while
streaming, and chunk ``k`` must use the same noise as frames ``[s, e)`` of the offline draw.

**Cost.** Streaming is exact, not free: the emotion head is re-run over the reply so far at
every token, and token2mel re-runs its encoder and velocity network over all frames so far for
every chunk (the ODE states of earlier frames are keys and values at each step). Both are
O(length^2) per reply, but with small constants for replies of a few seconds.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .audio import prepare_audio
from .llm import SpeechLLM, Stage1Example
from .token2wav import HOP, SAMPLE_RATE, Token2Mel, Vocoder, mel_frames_for_units, unit_index_of_mel_frame

INPUT_SR = 16000  # both speech encoders hear 16 kHz audio
MAX_INPUT_S = 30.0  # Whisper's window: longer queries are refused before any work is done
MAX_REPLY_S = 120.0  # noise is drawn for this much reply audio
EMPTY_REPLY_NOTE = "the model ended its turn at once (empty reply): there is no speech to synthesise"
SILENT_REPLY_NOTE = "the decoder gave every reply token 0 frames: there is no speech to synthesise"


class PipelineError(ValueError):
    """Components that do not fit together, or a stage used out of order."""


# ---------------------------------------------------------------------------------------------
# Noise for the flow, shared by the streamed and the offline reply
# ---------------------------------------------------------------------------------------------
def max_mel_frames(seconds: float) -> int:
    """Mel frames in ``seconds`` of 22.05 kHz audio (rounded up)."""
    return int(np.ceil(seconds * SAMPLE_RATE / HOP))


def reply_noise(seed: int, max_frames: int, n_mels: int = 80) -> torch.Tensor:
    """The flow's starting noise x0 for a whole reply: (1, n_mels, max_frames), CPU, seeded.

    A reply of ``n`` mel frames uses ``noise[..., :n]``. The values depend on both ``seed`` and
    ``max_frames`` (torch fills the tensor bin by bin), so streamed and offline synthesis must
    ask for the same ``max_frames``.
    """
    if max_frames < 1:
        raise PipelineError(f"max_frames must be >= 1, got {max_frames}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, n_mels, int(max_frames)), generator=generator)


# ---------------------------------------------------------------------------------------------
# token2mel for units that arrive piecemeal
# ---------------------------------------------------------------------------------------------
class IncrementalToken2Mel:
    """token2mel for a unit sequence whose length is not known in advance (one reply).

    ``push(units, pitch, energy)`` appends newly decoded 25 Hz frames and returns the mel chunks
    (1, 80, chunk_frames) that became computable; ``finish()`` returns the rest. Chunk ``k`` =
    frames ``[s, e)`` needs conditioning up to ``e + lookahead`` (the lookahead conv), so it
    leaves as soon as the units for those frames have arrived; the last chunk(s) wait for
    ``finish()``, when the total length is known.

    The work is done by ``token2wav.Token2MelStreamer``, which keeps a key/value cache per
    Transformer layer (and per ODE evaluation for the velocity network): every mel frame is
    computed once, so streaming costs about what offline synthesis costs. The noise
    ``reply_noise(noise_seed, max_frames)`` is drawn up front, so the concatenated chunks equal
    ``token2mel.sample(all units, noise=self.noise[..., :n])`` up to float rounding. ``max_frames``
    (default: ``MAX_REPLY_S`` of audio) bounds the reply; a longer one raises ``PipelineError``.
    """

    def __init__(self, token2mel: Token2Mel, spk_ref, noise_seed: int = 0, max_frames: int | None = None,
                 steps: int | None = None, solver: str | None = None):
        from .token2wav import Token2MelStreamer

        self.model = token2mel
        self.max_frames = max_mel_frames(MAX_REPLY_S) if max_frames is None else int(max_frames)
        self.noise = reply_noise(noise_seed, self.max_frames, token2mel.config.n_mels).to(token2mel.mel_mean.device)
        spk_ref = torch.as_tensor(spk_ref, dtype=torch.float32)
        if spk_ref.dim() == 2 and spk_ref.shape[0] != 1:
            raise PipelineError(f"IncrementalToken2Mel speaks one reply: give one speaker reference (160,), "
                                f"got {spk_ref.shape[0]}")
        self._streamer = Token2MelStreamer(token2mel, spk_ref.reshape(1, -1), noise=self.noise, steps=steps,
                                           solver=solver)
        self._tokens: list[np.ndarray] = []
        self.finished = False

    @property
    def n_units(self) -> int:
        return int(sum(len(t) for t in self._tokens))

    @property
    def emitted(self) -> int:
        return int(self._streamer.emitted)

    @property
    def tokens(self) -> np.ndarray:
        """All frames received so far, (F, 3) int64: unit, pitch, energy (``tokens.npy`` layout)."""
        return np.concatenate(self._tokens) if self._tokens else np.zeros((0, 3), dtype=np.int64)

    def push(self, units, pitch, energy) -> list[torch.Tensor]:
        """Append (d,) unit, pitch and energy ids (d may be 0); return the chunks now computable."""
        from .token2wav import Token2MelError

        if self.finished:
            raise PipelineError("IncrementalToken2Mel.push after finish(): start a new one for a new reply")
        new = [torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().cpu().long().reshape(-1)
               for x in (units, pitch, energy)]
        if not len(new[0]) == len(new[1]) == len(new[2]):
            raise PipelineError(f"units, pitch and energy must have one length, got {len(new[0])}, {len(new[1])}, "
                                f"{len(new[2])}")
        available = mel_frames_for_units(self.n_units + len(new[0]))
        if available > self.max_frames:
            raise PipelineError(
                f"the reply has reached {available} mel frames ({available * HOP / SAMPLE_RATE:.1f} s of speech), more "
                f"than max_frames = {self.max_frames} ({self.max_frames * HOP / SAMPLE_RATE:.1f} s) for which noise "
                "was drawn; raise max_frames (EmotionOmni(max_reply_s=...))")
        try:
            with torch.no_grad():
                chunks = self._streamer.push(*(x[None] for x in new))
        except Token2MelError as err:
            raise PipelineError(str(err)) from err
        self._tokens.append(torch.stack(new, dim=1).numpy())
        return [c if c.dim() == 3 else c[None] for c in chunks]

    def finish(self) -> list[torch.Tensor]:
        """The remaining chunks, now that the reply's length is known ([] for a reply of 0 units)."""
        if self.finished:
            raise PipelineError("IncrementalToken2Mel.finish() called twice")
        self.finished = True
        if self.n_units == 0:
            return []
        with torch.no_grad():
            chunks = self._streamer.finish()
        return [c if c.dim() == 3 else c[None] for c in chunks]


# ---------------------------------------------------------------------------------------------
# Driving pull-style stream generators by pushing
# ---------------------------------------------------------------------------------------------
class _Inbox:
    """The input iterator a pumped generator reads: pushed items, then the end once closed."""

    def __init__(self):
        self.items: deque = deque()
        self.closed = False

    def __iter__(self) -> "_Inbox":
        return self

    def __next__(self):
        if self.items:
            return self.items.popleft()
        if self.closed:
            raise StopIteration
        raise RuntimeError("a pumped stage asked for an input that has not been pushed yet: the release schedule "
                           "given to Pump.push does not match the stage (a bug in the caller)")


class Pump:
    """Turn a pull-style stage ``stage(inputs: Iterator) -> Iterator`` into ``push`` / ``finish``.

    ``push(item, releases)`` queues ``item`` and pulls ``releases`` outputs: the number of outputs
    the stage's documented schedule makes final with this item (the caller knows it). The stage
    then consumes the queued items and stops at its ``releases``-th yield, before it would ask
    for more. ``finish()`` closes the input and returns everything the stage still yields. A
    wrong schedule is caught: the stage asking for an item that is not there, or ending early,
    raises ``RuntimeError`` instead of blocking or dropping data.
    """

    def __init__(self, stage: Callable[[Iterator], Iterator]):
        self._inbox = _Inbox()
        self._outputs = stage(self._inbox)
        self.finished = False

    def push(self, item, releases: int) -> list:
        if self.finished:
            raise PipelineError("Pump.push after finish()")
        self._inbox.items.append(item)
        out = []
        for _ in range(releases):
            try:
                out.append(next(self._outputs))
            except StopIteration:
                raise RuntimeError("a pumped stage ended while outputs were still expected") from None
        return out

    def finish(self) -> list:
        if self.finished:
            raise PipelineError("Pump.finish() called twice")
        self.finished = True
        self._inbox.closed = True
        return list(self._outputs)


class StreamingDecoder:
    """``SpeechDecoder.stream`` driven token by token: ``push(h_i, e_i, emo_i)`` -> frame dicts.

    A decoder without durations (``predicts_durations = False``, the interleaved read/write
    decoder) is driven through its ``IncrementalWriter`` instead: a block of units after every R-th
    token, reported as frames of the last token read.

    The decoder releases token ``i`` when token ``i + lookahead_tokens`` arrives, so the first
    ``lookahead_tokens`` pushes return nothing and every later push returns one token's frames
    ``{"token", "duration", "units", "pitch", "energy"}``; ``finish()`` returns the last ones.
    ``speaker`` is the reply voice's reference, for a decoder with a voice input.
    """

    def __init__(self, decoder, speaker=None):
        self.pushed = 0
        self._writer = None
        if getattr(decoder, "predicts_durations", True):
            self.lookahead = decoder.config.lookahead_tokens
            self._pump = Pump(lambda tokens: decoder.stream(tokens, speaker=speaker))
        else:  # a read/write decoder (interleaved): blocks of units after every R tokens, no durations
            from .interleaved import incremental

            self._writer = incremental(decoder)

    @staticmethod
    def _as_frames(blocks: list[dict]) -> list[dict]:
        """Write blocks in the per-token format: ``token`` = the last token read, ``duration`` = block length."""
        return [{**b, "token": int(b["tokens_read"]) - 1, "duration": int(len(b["units"]))} for b in blocks]

    def push(self, hidden, embed, emotion) -> list[dict]:
        self.pushed += 1
        if self._writer is not None:
            return self._as_frames(self._writer.push(hidden, embed, emotion))
        return self._pump.push((hidden, embed, emotion), 1 if self.pushed > self.lookahead else 0)

    def finish(self) -> list[dict]:
        if self._writer is not None:
            return self._as_frames(self._writer.finish())
        return self._pump.finish()


class IncrementalVocoder:
    """``Vocoder.stream`` driven chunk by chunk: ``push(mel (80, T) or (1, 80, T))`` -> audio pieces.

    ``Vocoder.stream`` yields one piece whenever the frames received minus its held-back right
    context exceed what it has already released; this wrapper applies that rule to know how many
    pieces a chunk releases (0 or 1). The pieces are ``Vocoder.stream``'s, so they match offline
    vocoding within the tolerance its docstring states. ``finish()`` returns the held-back tail.
    """

    def __init__(self, vocoder: Vocoder):
        self.vocoder = vocoder
        self._pump = Pump(vocoder.stream)
        self.received = 0
        self.released = 0

    def push(self, mel) -> list[np.ndarray]:
        frames = int(mel.shape[-1])
        if frames == 0:
            return []  # Vocoder.stream skips empty chunks
        self.received += frames
        ready = self.received - self.vocoder.right_context_frames
        releases = 0
        if ready > self.released:
            self.released, releases = ready, 1
        return self._pump.push(mel, releases)

    def finish(self) -> list[np.ndarray]:
        return self._pump.finish()


# ---------------------------------------------------------------------------------------------
# Speech features and the reply voice of a run
# ---------------------------------------------------------------------------------------------
class SpeechFeatures:
    """The kit's query features: ``features(wav16k) -> (semantic (T50, 384), emotion (T50, E))``.

    Whisper encoder frames on a window sized to the query (as notebook 02 stored them) and the
    kit's emotion encoder frames; both ``ceil(n_samples / 320)`` frames at 50 Hz.
    """

    def __init__(self, whisper_encoder, processor, emotion_encoder):
        self.whisper_encoder = whisper_encoder
        self.processor = processor
        self.emotion_encoder = emotion_encoder

    def __call__(self, wav16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from . import encoders

        semantic = encoders.whisper_encoder_frames(self.whisper_encoder, self.processor, [wav16k])[0]
        emotion = encoders.emotion_frames(self.emotion_encoder, [wav16k])[0]
        return semantic, emotion


def voice_from_wav(wav: np.ndarray, sr: int, min_seconds: float = 1.0) -> torch.Tensor:
    """The 160-d speaker reference (``token2wav.speaker_reference``) of a recording at any rate."""
    from .audio import hifigan_log_mel
    from .token2wav import speaker_reference

    wav, sr = prepare_audio(wav, sr, target_sr=SAMPLE_RATE, name="voice reference")
    return speaker_reference(hifigan_log_mel(wav, sr), min_frames=int(round(min_seconds * SAMPLE_RATE / HOP)))


def run_voice(run, speaker: str = "", min_seconds: float = 1.0, tries: int = 5, rows: list[dict] | None = None) -> torch.Tensor:
    """A reply voice from a run's data: the reference of ``speaker``'s longest neutral utterance.

    ``speaker = ""`` takes the most frequent reply speaker of the training split. Neutral
    utterances come first (a reference is a voice, and an emotional one would colour every reply
    with its emotion: its mean pitch and loudness are part of the 160 numbers), then the longest
    (most speech); the first that makes a valid reference is used.
    """
    from .audio import load_audio
    from .data import load_manifest
    from .token2wav import SpeakerReferenceError

    rows = load_manifest(run) if rows is None else rows
    if not speaker:
        counts = Counter(r["response_speaker"] for r in rows if r["split"] == "train")
        if not counts:
            raise PipelineError(f"{run.manifest} has no kept training rows to take a reply voice from")
        speaker = counts.most_common(1)[0][0]
    utterances = [(r.get(f"{role}_emotion") != "neutral", -(r[f"{role}_duration_s"] or 0.0), r[f"{role}_wav"])
                  for r in rows for role in ("query", "response")
                  if r.get(f"{role}_speaker") == speaker and r.get(f"{role}_wav")]
    if not utterances:
        known = sorted({r["response_speaker"] for r in rows} | {r["query_speaker"] for r in rows})
        raise PipelineError(f"no kept utterance of speaker {speaker!r} in {run.manifest}; speakers: {known}")
    last = None
    for _, _, path in sorted(utterances)[:tries]:
        wav, sr = load_audio(run.root / path)
        try:
            return voice_from_wav(wav, sr, min_seconds)
        except SpeakerReferenceError as err:
            last = err
    raise PipelineError(f"no usable voice reference for speaker {speaker!r}: {last}")


def fit_plan_reader(run, rows: list[dict], seed: int = 0):
    """An ``encoders.PlanReader`` fitted on the DTW targets of the run's *training* replies (notebook 03).

    ``rows`` are manifest rows; those of the train split with a target are used, each labelled with
    its response emotion. A missing target store names notebook 03.
    """
    from .encoders import PlanReader
    from .store import FrameStore

    targets = FrameStore(run.require(run.root / "features" / "trajectories.npy", "trajectories"))
    fit_rows = [r for r in rows if r["split"] == "train" and r["pair_id"] in targets]
    return PlanReader(seed=seed).fit([targets[r["pair_id"]] for r in fit_rows], [r["response_emotion"] for r in fit_rows])


def run_voices(run, splits=("train", "val"), min_seconds: float = 1.0) -> dict:
    """``{speaker: run_voice(run, speaker)}`` for every reply speaker of ``splits`` (stage 2's voice input).

    The stage-2 decoder trains on each reply with its speaker's reference, made exactly as the
    reply voice is at inference, so training and inference see the same kind of vector. The
    manifest is read once.
    """
    from .data import load_manifest

    rows = load_manifest(run)
    speakers = sorted({r["response_speaker"] for r in rows if r["split"] in splits})
    return {speaker: run_voice(run, speaker, min_seconds, rows=rows).numpy() for speaker in speakers}


# ---------------------------------------------------------------------------------------------
# The whole system
# ---------------------------------------------------------------------------------------------
class _BusyClock:
    """Seconds spent inside the pipeline's generator (the consumer's time between events excluded)."""

    def __init__(self):
        self.total = 0.0
        self._since: float | None = None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self.total += time.perf_counter() - self._since
            self._since = None

    def elapsed(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self.total + running


class EmotionOmni:
    """Speech in -> empathetic speech out: stage 1, stage 2, token2mel and HiFi-GAN, streamed.

    Components are passed in (tiny random ones in the tests); ``from_run`` loads a run's trained
    checkpoints. ``features(wav16k) -> (semantic (T50, Ds), emotion (T50, De))`` is any callable
    (``SpeechFeatures`` for the real encoders), and ``voice`` the 160-d speaker reference of the
    reply voice. ``noise_seed`` and ``max_reply_s`` fix the flow's noise (``reply_noise``), so a
    reply is reproducible and ``respond`` matches ``respond_offline``.
    """

    def __init__(self, stage1: SpeechLLM, decoder, token2mel: Token2Mel, vocoder: Vocoder,
                 features: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], voice,
                 max_new_tokens: int = 40, repetition_penalty: float = 1.1, noise_seed: int = 0,
                 max_reply_s: float = MAX_REPLY_S, max_input_s: float = MAX_INPUT_S, vocoder_block_frames: int = 48):
        self.stage1, self.decoder, self.token2mel, self.vocoder = stage1, decoder, token2mel, vocoder
        # After the first audio, mel chunks are vocoded in blocks of at least this many frames:
        # each vocoder call also re-runs its left and right context frames (see Vocoder.stream),
        # so bigger blocks waste less compute; the first chunk goes out alone, for latency.
        self.vocoder_block_frames = int(vocoder_block_frames)
        self.features = features
        self.max_new_tokens, self.repetition_penalty = int(max_new_tokens), float(repetition_penalty)
        self.noise_seed, self.max_input_s = int(noise_seed), float(max_input_s)
        self.max_frames = max_mel_frames(max_reply_s)
        self._check_fit()
        for module in (stage1, decoder, token2mel):
            module.eval()  # inference: no dropout anywhere
        voice = torch.as_tensor(np.asarray(voice) if not torch.is_tensor(voice) else voice, dtype=torch.float32)
        if voice.shape != (token2mel.config.speaker_dim,):
            raise PipelineError(f"voice must be a speaker reference of shape ({token2mel.config.speaker_dim},) "
                                f"(token2wav.speaker_reference or voice_from_wav), got {tuple(voice.shape)}")
        self.voice = voice

    def _check_fit(self) -> None:
        """Refuse components whose interfaces disagree, naming both sides."""
        d, t, s = self.decoder.config, self.token2mel.config, self.stage1.config
        pairs = [("decoder hidden_dim", d.hidden_dim, "the LLM's hidden size", self.stage1.llm.config.hidden_size),
                 ("decoder emotion_dim", d.emotion_dim, "stage-1 emotion_dim", s.emotion_dim),
                 ("decoder n_units", d.n_units, "token2mel n_units", t.n_units),
                 ("decoder pitch_bins", d.pitch_bins, "token2mel pitch_bins", t.pitch_bins),
                 ("decoder energy_bins", d.energy_bins, "token2mel energy_bins", t.energy_bins),
                 ("token2mel n_mels", t.n_mels, "vocoder n_mels", self.vocoder.mel_cfg.n_mels)]
        problems = [f"{a} = {x} but {b} = {y}" for a, x, b, y in pairs if x != y]
        if problems:
            raise PipelineError("these components were not made for each other: " + "; ".join(problems)
                                + ". Load the checkpoints of one run (EmotionOmni.from_run).")

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run, cfg: dict, device: str = "cpu", voice=None, **kwargs) -> "EmotionOmni":
        """The trained system of a run: the ``latest.pt`` of notebooks 02, 04, 05 and 06.

        ``voice``: a (160,) reference, a path to a recording, or None for ``cfg["synthesis"]["voice"]``
        (``run_voice``). The speech encoders run on the CPU (their inputs are short); the other
        components on ``device``. ``kwargs`` go to the constructor; ``max_new_tokens`` defaults to
        the preset's ``stage1.max_new_tokens``.
        """
        from . import asr, decoder as stage2, encoders, llm, pretrained, token2wav

        backbone, tokenizer = pretrained.load_llm(cfg["models"]["llm"], device="cpu")
        stage1 = llm.load_stage1(run.checkpoint_dir("stage1") / "latest.pt", device, backbone, tokenizer)
        decoder = stage2.load_decoder(run.checkpoint_dir("stage2") / "latest.pt", device)
        decoder.emotion_strength = float(cfg.get("synthesis", {}).get("emotion_strength", 1.0))
        decoder.pitch_decoding = cfg.get("synthesis", {}).get("pitch_decoding", "voicing_first")
        token2mel = token2wav.load_token2mel(run.checkpoint_dir("token2mel") / "latest.pt", device,
                                             temperature=cfg["token2mel"].get("temperature"))
        vocoder = token2wav.Vocoder.from_preset(cfg, device)
        whisper, processor = asr.load_whisper(cfg["models"]["whisper"])
        emotion_encoder = encoders.load_emotion_encoder(run.checkpoint_dir("emotion_encoder") / "latest.pt",
                                                        expected_dim=stage1.config.emotion_dim)
        features = SpeechFeatures(whisper.model.encoder, processor, emotion_encoder)
        min_s = cfg["token2mel"]["reference_min_s"]
        if voice is None:
            voice = run_voice(run, cfg.get("synthesis", {}).get("voice", ""), min_s)
        elif isinstance(voice, (str, Path)):
            from .audio import load_audio

            voice = voice_from_wav(*load_audio(voice), min_seconds=min_s)
        kwargs.setdefault("max_new_tokens", cfg["stage1"]["max_new_tokens"])
        kwargs.setdefault("noise_seed", cfg["seed"])
        kwargs.setdefault("vocoder_block_frames", cfg.get("synthesis", {}).get("vocoder_block_frames", 48))
        return cls(stage1, decoder, token2mel, vocoder, features, voice, **kwargs)

    # -- listening -------------------------------------------------------------------------------
    def listen(self, wav: np.ndarray, sr: int, max_seconds: float | None = None) -> Stage1Example:
        """Raw audio -> the stage-1 input: validated, resampled to 16 kHz, both frame streams.

        Empty, silent, non-finite or longer-than-``max_seconds`` (default ``max_input_s``) audio
        raises ``audio.AudioError`` saying which. Queries longer than the stage-1 model's
        ``max_speech_s`` are then cut or refused by its ``over_long`` rule.
        """
        wav16k, _ = prepare_audio(wav, sr, target_sr=INPUT_SR, name="query",
                                  max_seconds=self.max_input_s if max_seconds is None else max_seconds)
        semantic, emotion = self.features(wav16k)
        semantic, emotion = np.asarray(semantic, dtype=np.float32), np.asarray(emotion, dtype=np.float32)
        if semantic.ndim != 2 or emotion.ndim != 2 or len(semantic) != len(emotion):
            raise PipelineError(f"features must return two (T50, D) arrays of one length, got shapes {semantic.shape} "
                                f"and {emotion.shape}")
        return Stage1Example("query", semantic, emotion)

    # -- replying --------------------------------------------------------------------------------
    def _embeds(self, token_ids: list[int]) -> np.ndarray:
        """The LLM's own input embeddings of the reply tokens (the decoder's ``e_i``), (N, H)."""
        with torch.no_grad():
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.stage1.device)
            return self.stage1.embed_tokens(ids).float().cpu().numpy()

    def respond(self, wav: np.ndarray, sr: int, noise_seed: int | None = None) -> Iterator[dict]:
        """Reply to a spoken query, streaming: a generator of events in the order they become known.

        - ``{"kind": "text", "token", "token_id", "text_piece", "emotion" (E,), "t"}``: reply token
          ``token`` (its index) as soon as the LLM has written it;
        - ``{"kind": "units", "token", "duration", "units", "pitch", "energy", "t"}``: that token's
          25 Hz speech tokens, once the decoder's look-ahead token has arrived;
        - ``{"kind": "audio", "wav" (float32 at 22.05 kHz), "start_s", "t"}``: the next piece of speech;
        - last, ``{"kind": "done", "text", "token_ids", "emotion" (N, E), "units" (F, 3): unit, pitch,
          energy, "durations" (N,), "wav", "sr", "first_audio_s", "seconds", "audio_s", "rtf", "stall_s",
          "note"}``.

        ``t`` is the compute time in seconds since the call, counting only time spent inside this
        generator (a slow consumer does not inflate it); ``first_audio_s`` is ``t`` of the first
        audio; ``rtf`` = compute time / audio duration (< 1: faster than real time); ``stall_s``
        the silence a listener would hear after the first audio, waiting for later pieces
        (``playback_stalls``: an RTF below 1 on average can still stall when pieces come late). An empty
        reply ends with a "done" event with empty audio and an explanatory ``note``. The query is
        checked (``listen``) before the generator is returned, so unusable audio raises at once.
        """
        clock = _BusyClock()
        clock.start()
        try:
            example = self.listen(wav, sr)
        finally:
            clock.stop()
        seed = self.noise_seed if noise_seed is None else int(noise_seed)
        return self._timed(self._events(example, seed, clock), clock)

    @staticmethod
    def _timed(events: Iterator[dict], clock: _BusyClock) -> Iterator[dict]:
        """Pass ``events`` on, running ``clock`` only while the pipeline computes the next one."""
        while True:
            clock.start()
            try:
                event = next(events)
            except StopIteration:
                return
            finally:
                clock.stop()
            yield event

    def _events(self, example: Stage1Example, noise_seed: int, clock: _BusyClock) -> Iterator[dict]:
        decoder = StreamingDecoder(self.decoder, speaker=self.voice)
        mel = IncrementalToken2Mel(self.token2mel, self.voice, noise_seed, self.max_frames)
        vocoder = IncrementalVocoder(self.vocoder)
        pieces: list[str] = []
        token_ids: list[int] = []
        emotions: list[np.ndarray] = []
        durations: list[int] = []
        audio: list[np.ndarray] = []
        timeline: list[tuple[float, float, float]] = []  # (t, start_s, seconds) of every audio piece
        state = {"samples": 0, "first": None}
        blocked: list[torch.Tensor] = []  # mel chunks waiting to be vocoded together

        def audio_event(piece: np.ndarray) -> dict:
            start = state["samples"] / SAMPLE_RATE
            state["samples"] += len(piece)
            audio.append(piece)
            now = clock.elapsed()
            timeline.append((now, start, len(piece) / SAMPLE_RATE))
            if state["first"] is None:
                state["first"] = now
            return {"kind": "audio", "wav": piece, "start_s": start, "t": now}

        def speak(frames: list[dict]) -> Iterator[dict]:
            for f in frames:
                durations.append(int(f["duration"]))
                units, pitch, energy = (f[k].cpu().numpy() for k in ("units", "pitch", "energy"))
                yield {"kind": "units", "token": int(f["token"]), "duration": int(f["duration"]), "units": units,
                       "pitch": pitch, "energy": energy, "t": clock.elapsed()}
                for chunk in mel.push(units, pitch, energy):
                    yield from vocode(chunk)

        def vocode(chunk, final: bool = False) -> Iterator[dict]:
            if chunk is not None:
                blocked.append(chunk)
            if not blocked:
                return
            waiting = sum(int(c.shape[-1]) for c in blocked)
            if final or state["first"] is None or waiting >= self.vocoder_block_frames:
                merged = torch.cat(blocked, dim=-1)
                blocked.clear()
                for piece in vocoder.push(merged):
                    if len(piece):
                        yield audio_event(piece)

        for i, step in enumerate(self.stage1.stream_reply(example, self.max_new_tokens, self.repetition_penalty)):
            token_ids.append(step["token_id"])
            pieces.append(step["text_piece"])
            emotions.append(step["emotion"])
            yield {"kind": "text", "token": i, "token_id": step["token_id"], "text_piece": step["text_piece"],
                   "emotion": step["emotion"], "t": clock.elapsed()}
            embed = self._embeds([step["token_id"]])[0]
            yield from speak(decoder.push(step["hidden"], embed, step["emotion"]))
        yield from speak(decoder.finish())
        for chunk in mel.finish():
            yield from vocode(chunk)
        yield from vocode(None, final=True)
        for piece in vocoder.finish():
            if len(piece):
                yield audio_event(piece)
        note = EMPTY_REPLY_NOTE if not token_ids else (SILENT_REPLY_NOTE if mel.n_units == 0 else "")
        yield self._done("".join(pieces).strip(), token_ids, emotions, mel.tokens, durations,
                         np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32),
                         state["first"], clock.elapsed(), note, playback_stalls(timeline))

    def _done(self, text, token_ids, emotions, tokens, durations, wav, first_audio_s, seconds, note,
              stall_s: float = 0.0) -> dict:
        e = self.stage1.config.emotion_dim
        audio_s = len(wav) / SAMPLE_RATE
        return {"kind": "done", "text": text, "token_ids": list(token_ids),
                "emotion": np.stack(emotions).astype(np.float32) if len(emotions) else np.zeros((0, e), np.float32),
                "units": np.asarray(tokens, dtype=np.int64).reshape(-1, 3),
                "durations": np.asarray(durations, dtype=np.int64), "wav": wav.astype(np.float32), "sr": SAMPLE_RATE,
                "first_audio_s": first_audio_s, "seconds": seconds, "audio_s": audio_s, "stall_s": float(stall_s),
                "rtf": seconds / audio_s if audio_s > 0 else float("nan"), "note": note}

    def respond_offline(self, wav: np.ndarray, sr: int, noise_seed: int | None = None) -> dict:
        """The same reply without streaming, for comparison: the "done" event of ``respond``.

        ``generate`` -> ``decoder.generate`` -> ``token2mel.sample`` (the same noise as ``respond``)
        -> offline HiFi-GAN. ``first_audio_s`` is the total time: offline, all audio arrives at once.
        """
        started = time.perf_counter()
        seed = self.noise_seed if noise_seed is None else int(noise_seed)
        example = self.listen(wav, sr)
        reply = self.stage1.generate([example], self.max_new_tokens, self.repetition_penalty)[0]
        ids, emotion = reply["token_ids"], reply["emotion"]
        empty = np.zeros(0, dtype=np.float32)
        if not ids:
            seconds = time.perf_counter() - started
            return self._done(reply["text"], ids, [], np.zeros((0, 3)), [], empty, None, seconds, EMPTY_REPLY_NOTE)
        frames = self.decoder.generate(reply["hidden"], self._embeds(ids), emotion, speaker=self.voice)
        tokens = torch.stack([frames[k] for k in ("units", "pitch", "energy")], 1).cpu()
        durations = frames["durations"].cpu().tolist()
        if len(tokens) == 0:
            seconds = time.perf_counter() - started
            return self._done(reply["text"], ids, list(emotion), tokens.numpy(), durations, empty, None, seconds,
                              SILENT_REPLY_NOTE)
        n = mel_frames_for_units(len(tokens))
        if n > self.max_frames:
            raise PipelineError(f"the reply has {n} mel frames ({n * HOP / SAMPLE_RATE:.1f} s), more than max_frames = "
                                f"{self.max_frames}; raise max_reply_s")
        noise = reply_noise(seed, self.max_frames, self.token2mel.config.n_mels)[..., :n]
        mel = self.token2mel.sample(tokens[:, 0], tokens[:, 1], tokens[:, 2], self.voice, noise=noise)
        wav = self.vocoder(mel[0])
        seconds = time.perf_counter() - started
        return self._done(reply["text"], ids, list(emotion), tokens.numpy(), durations, wav, seconds, seconds, "")


def playback_stalls(pieces: Iterable[tuple[float, float, float]]) -> float:
    """Seconds of silence a listener hears after the first audio, waiting for the next pieces.

    ``pieces``: ``(t, start_s, seconds)`` per audio piece in order: when it was ready (compute
    clock), where it starts in the reply, how long it is. Playback starts when the first piece
    is ready and plays without gaps; a piece that is not ready when its turn comes pauses
    playback until it is (every pause shifts the later turns). 0 means the reply streams
    without a break, whatever its real-time factor.
    """
    stalled, started = 0.0, None
    for t, start_s, _ in pieces:
        if started is None:
            started = t - start_s
            continue
        due = started + start_s + stalled  # when playback reaches this piece
        if t > due:
            stalled += t - due
    return stalled


def collect(events: Iterable[dict]) -> dict:
    """Run ``respond`` to the end; its "done" event plus ``events``, the list of all events before it."""
    seen = list(events)
    if not seen or seen[-1]["kind"] != "done":
        raise PipelineError("the event stream ended without a 'done' event")
    return {**seen[-1], "events": seen[:-1]}
