"""The plugin's main loop: load the model once, then decode one job at a time in the main thread.

Segments are iterated straight from faster-whisper's generator here, in this thread, and each one is sent
the moment it exists. There is deliberately no thread pool and no timeout in this process: the agent's
supervisor enforces time limits. Between two segments this loop looks, without blocking, for a ``cancel``
from the agent and stops there, staying loaded for the next job; a decode stuck inside one segment (or one
batch of batched mode) cannot look, and the supervisor kills the process instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from node_agent.contracts import PLUGIN_ONLY_OPTIONS
from node_agent.config import ZhScript
from node_agent.errors import InvalidRequest, JobError, JobErrorCode, WireError
from node_agent.languages import english_only_message
from node_agent.plugin_messages import (
    CancelMessage,
    ErrorMessage,
    FatalMessage,
    JobMessage,
    SPLIT_ANSWER_WAIT_S,
    LongAudioMessage,
    PluginMessage,
    ReadyMessage,
    ResultMessage,
    SectionMessage,
    SectionsMessage,
    SegmentMessage,
    SplitMessage,
    StartedMessage,
    StopMessage,
    StoppedMessage,
    WordInfo,
    WorkerSpec,
    parse_from_agent,
    to_header,
)
from node_agent import section_plan
from node_agent.wire import BlockingChannel

from . import audio as audio_mod

log = logging.getLogger("plugins.asr")

class DecodeStopped(Exception):
    """The agent cancelled the running job; raised by ``JobControl.check`` at a segment boundary."""


class JobControl:
    """What the agent sent while a job runs, read between segments without blocking.

    A ``cancel`` for this job stops it; ``stop`` stops it and then the process. A cancel naming another job
    crossed that job's result on the way and is dropped.
    """

    def __init__(self, channel: BlockingChannel, job_id: str) -> None:
        self.channel = channel
        self.job_id = job_id
        self.exit_after = False

    def check(self) -> None:
        while self.channel.poll():
            self._take()

    def _take(self) -> SplitMessage | None:
        """Read one frame: raise for a stop or this job's cancel, return this job's ``split``, drop the rest."""
        frame = self.channel.recv()
        if frame is None:
            raise ConnectionResetError("the agent closed the channel during a job")
        message = parse_from_agent(frame[0])
        if isinstance(message, StopMessage):
            self.exit_after = True
            raise DecodeStopped()
        if isinstance(message, CancelMessage) and message.job_id == self.job_id:
            raise DecodeStopped()
        if isinstance(message, SplitMessage) and message.job_id == self.job_id:
            return message
        # (A ``split`` that came after its wait ran out lands here too: the job went on whole.)
        log.debug("job %s: ignoring %s for job %s", self.job_id, message.type, getattr(message, "job_id", None))
        return None

    def split_answer(self, wait_s: float = SPLIT_ANSWER_WAIT_S) -> int:
        """How many sections the agent wants after ``long_audio``; 1 when it has not said within ``wait_s``."""
        until = time.monotonic() + wait_s
        while (left := until - time.monotonic()) > 0:
            if self.channel.poll(left):
                answer = self._take()
                if answer is not None:
                    return answer.sections
        log.warning("job %s: no split answer within %.1f s; decoding it whole", self.job_id, wait_s)
        return 1


def _no_check() -> None:
    return None


class AsrEngine:
    """faster-whisper loaded once; ``run`` decodes one job and reports through ``emit``. Every setting and decode
    default comes from the spec's ``asr`` (the node's settings); the engine has none of its own."""

    #: The job message jobs arrive as (its options model included).
    job_message: type[JobMessage] = JobMessage
    #: ``run`` takes ``ask_sections`` (the serve loop passes it only to an engine that says so).
    splits = True

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.asr = spec.asr
        self._zh_converter = None

    def load(self) -> dict[str, Any]:
        import ctranslate2
        import faster_whisper
        from faster_whisper import WhisperModel

        from node_agent.devices import choose_compute_type, choose_cpu_threads, choose_device
        from node_agent.model_resolution import resolve_model

        device = choose_device(self.spec.device, ctranslate2.get_cuda_device_count())
        compute_type = choose_compute_type(
            device, ctranslate2.get_supported_compute_types(device), self.asr.compute_type
        )
        cpu_threads = choose_cpu_threads(self.spec.cpu_threads, len(os.sched_getaffinity(0)))
        model_path = resolve_model(self.asr.model)
        t0 = time.perf_counter()
        self.model = WhisperModel(
            model_path,
            device=device,
            device_index=self.spec.device_index,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=1,
        )
        load_s = time.perf_counter() - t0
        # Warm-up: the first decode pays one-off allocation costs; pay them before reporting ready.
        t0 = time.perf_counter()
        segments, _ = self.model.transcribe(
            np.zeros(audio_mod.SAMPLE_RATE, dtype=np.float32), language="en" if not self.multilingual else None,
            beam_size=1, vad_filter=False,
        )
        for _ in segments:
            pass
        warmup_s = time.perf_counter() - t0
        self.device = device
        return {
            "model": self.asr.model,
            "model_path": model_path,
            "device": device,
            "device_index": self.spec.device_index,
            "compute_type": compute_type,
            "cpu_threads": cpu_threads,
            "load_s": round(load_s, 4),
            "warmup_s": round(warmup_s, 4),
            "multilingual": self.multilingual,
            "languages": None if self.multilingual else ["en"],
            "versions": {"faster_whisper": faster_whisper.__version__, "ctranslate2": ctranslate2.__version__},
        }

    @property
    def multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def _options(self, job: JobMessage, duration_s: float) -> tuple[dict[str, Any], bool]:
        """faster-whisper's keyword arguments for ``job`` (the node's ``asr`` settings under its options), and
        whether it runs in batched mode."""
        asr, options = self.asr, job.options
        language = job.language or asr.language
        if language == "auto":
            language = None
        if language and not self.multilingual and language != "en":
            raise InvalidRequest(english_only_message(asr.model, language))
        batched = options.batched if options.batched is not None else (
            asr.batched_min_audio_s is not None and duration_s >= asr.batched_min_audio_s)
        batch_size = options.batch_size or asr.batch_size
        kwargs: dict[str, Any] = {
            "language": language,
            "beam_size": asr.beam_size,
            "vad_filter": asr.vad_filter,
            "condition_on_previous_text": asr.condition_on_previous_text,
        }
        # The plugin's own options (audio decode, batched mode) are not WhisperModel.transcribe's.
        kwargs.update(options.model_dump(exclude_none=True, exclude=set(PLUGIN_ONLY_OPTIONS)))
        if batched:
            # faster-whisper's BatchedInferencePipeline requires VAD: Silero VAD cuts the audio into speech chunks
            # of up to 30 s, and without it audio over 30 s is refused. So batched mode always uses VAD, whatever
            # vad_filter says. Each chunk is decoded once, without the previous chunk's text or timestamps inside
            # it, at the first temperature only (condition_on_previous_text and the fallback thresholds are
            # accepted and unused): faster, but words at chunk edges can be lost (docs/benchmarks.md); a result
            # says ``batched`` so a caller can tell which decode it got.
            kwargs["vad_filter"] = True
            kwargs["batch_size"] = batch_size
        return kwargs, batched

    def _convert_zh(self, text: str, language: str | None) -> str:
        script = self.asr.zh_script
        if language != "zh" or script is ZhScript.as_is or not text:
            return text
        if self._zh_converter is None:
            import opencc

            self._zh_converter = opencc.OpenCC("t2s" if script is ZhScript.simplified else "s2t")
        return self._zh_converter.convert(text)

    def _cut(self, job_id: str, audio: np.ndarray, n: int,
             emit: Callable[..., None]) -> tuple[np.ndarray, list[tuple[float, float, np.ndarray]]]:
        """Cut ``audio`` into ``n`` sections at silences (``section_plan``: the silence at a cut is mostly dropped)
        and send the cut; return section 0's samples and sections 1..n-1 as (offset_s, duration_s, samples), for
        ``_send_sections`` (none when the cut left one section). VAD runs on a window around each equal-duration
        boundary only."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        t0 = time.perf_counter()
        rate = audio_mod.SAMPLE_RATE
        duration_s = audio.shape[0] / rate
        # Short silences count here (faster-whisper's default wants 2 s of it before it ends a speech span).
        vad = VadOptions(min_silence_duration_ms=int(section_plan.MIN_GAP_S * 1000), speech_pad_ms=60)
        cuts = []
        for target in section_plan.targets(duration_s, n):
            lo, hi = section_plan.window(target, duration_s, n)
            chunk = audio[int(lo * rate):int(hi * rate)]
            speech = [(lo + s["start"] / rate, lo + s["end"] / rate) for s in get_speech_timestamps(chunk, vad)]
            cuts.append(section_plan.cut_at(target, (lo, hi), speech))
        # On sample boundaries, so the sections' offsets add up to exactly the file.
        bounds = [(round(a * rate) / rate, round(d * rate) / rate) for a, d in section_plan.bounds(duration_s, cuts)]
        if len(bounds) < 2:
            return audio, []
        pieces = [audio[round(a * rate):round((a + d) * rate)] for a, d in bounds]
        emit(SectionsMessage(job_id=job_id, bounds=bounds, cut_s=round(time.perf_counter() - t0, 6)))
        log.info("job %s: cut %.1f s into %d sections (%s) in %.2f s", job_id, duration_s, len(bounds),
                 ", ".join(f"{a:.2f}-{a + d:.2f}" for a, d in bounds), time.perf_counter() - t0)
        return pieces[0], [(a, d, piece) for (a, d), piece in zip(bounds[1:], pieces[1:])]

    @staticmethod
    def _send_sections(job_id: str, rest: list[tuple[float, float, np.ndarray]], language: str | None,
                       emit: Callable[..., None]) -> None:
        """Send sections 1..n-1 (pcm_s16le), each to be decoded in ``language`` (None: the job's own)."""
        rate = audio_mod.SAMPLE_RATE
        for index, (offset_s, section_s, samples) in enumerate(rest, start=1):
            # x 32768, the inverse of the decoder's s16 -> float: 16-bit audio (most uploads) reaches the section's
            # node as the very samples section 0 is decoded from here (x 32767 changed them by up to one step, and
            # the section's words with them).
            pcm = np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes()
            emit(SectionMessage(job_id=job_id, index=index, offset_s=offset_s, duration_s=section_s,
                                sample_rate=rate, language=language), pcm)

    def run(self, job: JobMessage, payload: bytes, emit: Callable[..., None],
            check: Callable[[], None] = _no_check, ask_sections: Callable[[], int] | None = None) -> None:
        """Decode one job, sending its messages through ``emit`` (a message, and a payload for ``section``);
        ``check`` raises to stop between segments; ``ask_sections`` waits for the agent's ``split`` answer."""
        job_id = job.job_id
        t_start = time.perf_counter()
        audio = audio_mod.decode(
            payload, job.format, job.sample_rate, self.asr.max_audio_s,
            allow_truncated=job.options.allow_truncated is True,
        )
        duration_s = audio.shape[0] / audio_mod.SAMPLE_RATE
        decode_audio_s = time.perf_counter() - t_start
        kwargs, batched = self._options(job, duration_s)
        emit(StartedMessage(job_id=job_id, duration_s=duration_s, decode_audio_s=decode_audio_s))
        check()
        rest: list[tuple[float, float, np.ndarray]] = []  # sections 1..n-1, until they are sent
        if (job.split_min_s is not None and ask_sections is not None and not batched
                and duration_s >= job.split_min_s):
            emit(LongAudioMessage(job_id=job_id, duration_s=duration_s))
            sections = ask_sections()
            if sections > 1:
                # Section 0 is decoded as any job, as its own audio (not clip_timestamps over the whole file:
                # the decode's 30 s windows then start where the section does, as they do in the children).
                audio, rest = self._cut(job_id, audio, sections, emit)
                check()
        # The sections decode in section 0's language, as one decode of the file decodes all of it in the language
        # found on its first 30 s: a job with a language gives it to its sections itself (the scheduler's children
        # take the parent's), one without gets the language section 0 is decoded in. Known already (the node's
        # default): sent now; detected: sent once transcribe() has found it, before section 0's first window is
        # decoded, so their uploads still overlap that decode.
        own_language = job.language not in (None, "auto")
        if rest and (own_language or kwargs["language"] is not None):
            self._send_sections(job_id, rest, None if own_language else kwargs["language"], emit)
            rest = []

        t0 = time.perf_counter()
        try:
            if batched:
                from faster_whisper import BatchedInferencePipeline

                # A new pipeline per job: it only wraps the loaded model, and it keeps word-timestamp state that
                # it resets only when its generator runs to the end, which a cancelled job's does not. Its VAD and
                # features for the whole audio are computed in this call; segments then come one batch of up to
                # batch_size chunks at a time, so batch_size also bounds the silence between segments
                # (asr.timeout.stall_s).
                segments, info = BatchedInferencePipeline(self.model).transcribe(audio, **kwargs)
            else:
                segments, info = self.model.transcribe(audio, **kwargs)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"decode options rejected by faster-whisper: {exc}") from None
        if rest:
            self._send_sections(job_id, rest, info.language, emit)
        t1 = time.perf_counter()
        transcribe_call_s = t1 - t0

        texts: list[str] = []
        count = 0
        fallbacks = 0
        last = t1
        first_segment_s = None
        # The decode happens in this loop: each next() runs the beam search for the next window.
        try:
            for segment in segments:
                now = time.perf_counter()
                text = self._convert_zh(segment.text, info.language)
                texts.append(text)
                count += 1
                fallbacks += segment.temperature > 0
                if first_segment_s is None:
                    first_segment_s = now - t_start
                event = SegmentMessage(
                    job_id=job_id,
                    id=segment.id,
                    start=round(segment.start, 3),
                    end=round(segment.end, 3),
                    text=text,
                    temperature=segment.temperature,
                    avg_logprob=segment.avg_logprob,
                    compression_ratio=segment.compression_ratio,
                    no_speech_prob=segment.no_speech_prob,
                    decode_s=round(now - last, 6),
                )
                if segment.words:
                    event.words = [
                        WordInfo(start=w.start, end=w.end, word=self._convert_zh(w.word, info.language),
                                 probability=w.probability)
                        for w in segment.words
                    ]
                emit(event)
                last = time.perf_counter()
                check()
        finally:
            # Stopped part-way: close the generator now, so the decode's state is released before the next job.
            close = getattr(segments, "close", None)
            if close is not None:
                close()
        segments_iteration_s = time.perf_counter() - t1

        emit(ResultMessage(
            job_id=job_id,
            text="".join(texts).strip(),
            language=info.language,
            language_probability=info.language_probability,
            # Section 0's length when the job was cut (the agent's merged result says the whole file's).
            duration_s=audio.shape[0] / audio_mod.SAMPLE_RATE,
            segments_count=count,
            fallback_segments=fallbacks,
            batched=batched,
            timings={
                "decode_audio_s": round(decode_audio_s, 6),
                "transcribe_call_s": round(transcribe_call_s, 6),
                "segments_iteration_s": round(segments_iteration_s, 6),
                "first_segment_s": round(first_segment_s, 6) if first_segment_s is not None else None,
                "total_s": round(time.perf_counter() - t_start, 6),
            },
        ))


def serve(channel: BlockingChannel, spec: WorkerSpec, engine: Any = None) -> int:
    """Load, report ready, serve jobs until told to stop or the agent goes away. Returns the exit status.

    ``engine`` (``load()``, ``run()`` and ``job_message`` as ``AsrEngine`` has them) is for the tests'
    model-free stand-in."""
    engine = engine or AsrEngine(spec)

    def send(message: PluginMessage, payload: bytes = b"") -> None:
        channel.send(to_header(message), payload)

    try:
        ready = ReadyMessage(**engine.load(), pid=os.getpid())
    except Exception as exc:  # any load failure is fatal for this process; report it, then exit
        log.error("model load failed: %s", exc)
        # Named here: ctranslate2's errors (a damaged model.bin, say) do not say which model they are about.
        send(FatalMessage(message=f"model {spec.asr.model!r}: {type(exc).__name__}: {exc}"))
        return 3
    send(ready)
    log.info("ready: model=%s device=%s compute_type=%s load_s=%.2f",
             ready.model, ready.device, ready.compute_type, ready.load_s)

    job_message: type[JobMessage] = getattr(engine, "job_message", JobMessage)
    while True:
        frame = channel.recv()
        if frame is None:
            return 0  # the agent closed the channel
        header, payload = frame
        try:
            # Checked on arrival as one typed message, its options included: a job that does not parse (options
            # a newer agent knows and this plugin does not, say) is answered invalid_request, naming the field.
            message = parse_from_agent(header, job_message)
        except WireError as exc:
            job_id = header.get("job_id")
            send(ErrorMessage(job_id=job_id if isinstance(job_id, str) else None,
                              code=JobErrorCode.invalid_request, message=str(exc)))
            continue
        if isinstance(message, StopMessage):
            return 0
        if isinstance(message, CancelMessage):
            continue  # its job ended before the cancel arrived: stale
        job_id = message.job_id
        control = JobControl(channel, job_id)
        try:
            if getattr(engine, "splits", False):
                engine.run(message, payload, send, control.check, control.split_answer)
            else:
                engine.run(message, payload, send, control.check)
        except DecodeStopped:
            send(StoppedMessage(job_id=job_id))
            log.info("job %s stopped at the agent's request", job_id)
            if control.exit_after:
                return 0
        except JobError as exc:
            send(ErrorMessage(job_id=job_id, code=exc.code, message=exc.message))
        except WireError as exc:
            # The agent sent something this plugin cannot read while the job ran: a bug on one side, this job only.
            send(ErrorMessage(job_id=job_id, code=JobErrorCode.failed, message=f"protocol error: {exc}"))
        except (RuntimeError, MemoryError) as exc:
            # Python-level failures inside ctranslate2 (e.g. CUDA out of memory) cost this job only.
            send(ErrorMessage(job_id=job_id, code=JobErrorCode.failed, message=f"{type(exc).__name__}: {exc}"))
