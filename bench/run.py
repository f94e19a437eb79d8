#!/usr/bin/env python3
"""node-agent against plain faster-whisper, side by side in one run: same clips, model, decode settings, machine.

    .venv/bin/python bench/run.py                       # everything, ~10 minutes on 2 cores
    .venv/bin/python bench/run.py --quick               # fewer repeats
    .venv/bin/python bench/run.py --only overhead,long  # some sections

Sections: overhead, iteration, long, throughput, memory, startup, threads, profile, scheduler, split (``split``
is ``bench/split.py``: long recordings cut into sections on a 2-slot node; ``scheduler`` is
``bench/scheduler.py``: the scheduler alone under 200 fake nodes, no model; ``throughput`` is
``bench/throughput.py``: jobs/s from 4 clients against plain processes x threads). Both sides are warm (one
untimed run each first); timed runs alternate between the sides and each figure is a median. The agent side is
a real ``node-agent run`` subprocess with its embedded scheduler on loopback, driven over HTTP the way a client
would (submit, long-poll); the plain side is ``WhisperModel.transcribe`` plus iterating its segments, timed inside
a plain Python process of its own per model (``--plain-server``), as the agent has one worker process per model.
Decode settings are the agent's defaults on both sides: beam 5, language detected (tiny.en: English), no VAD
filter, conditioning on previous text, int8, one CPU thread per core (at most 8).

Raw numbers go to .bench/results.json; the profile (section ``profile``, needs ``pip install pyinstrument``)
to .bench/profile-agent.txt. Nothing here needs a network: the models are the offline packages.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402

from helpers import DATA, cer, joined, multipart, references, wav_bytes, wer  # noqa: E402
from node_agent.devices import choose_cpu_threads  # noqa: E402
from node_agent.model_resolution import resolve_model  # noqa: E402

SECTIONS = ("overhead", "iteration", "long", "throughput", "memory", "startup", "threads", "profile", "scheduler",
            "split")
OUT = ROOT / ".bench"
SHORT_CLIP = "stereo_diarization_left.wav"  # 5.0 s
LONG_EN = "lucier_i_am_sitting_in_a_room_long.wav"
LONG_ZH = "funasr_vad_example_zh_long.wav"
# The 70 s lecture has no reference transcript; this one does: every Mandarin clip with a reference, three
# times over in different orders (62 s, five speakers, 0.8 s pauses), written to .bench/ at run time.
ZH_JOINED = "zh_joined_62s.wav"
ZH_JOINED_ORDER = ["aishell1_BAC009S0724W0121.wav", "funasr_asr_example_zh.wav", "paddlespeech_zh.wav",
                   "aishell1_BAC009S0764W0121.wav", "wenetspeech_TEST_NET_Y0000000000_-KTKHdZ2fb8_S00000.wav"]
ZH_JOINED_ORDER = ZH_JOINED_ORDER + ZH_JOINED_ORDER[::-1] + ZH_JOINED_ORDER[1:] + ZH_JOINED_ORDER[:1]
DECODE = {"beam_size": 5, "vad_filter": False, "condition_on_previous_text": True}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load1() -> float:
    return os.getloadavg()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_english_clips() -> list[str]:
    return [name for name, row in references().items()
            if row["language"] == "en" and float(row["duration_s"]) < 15]


# ----------------------------------------------------------------------------------------- the two sides


class Http:
    """A keep-alive HTTP/1.1 connection to one loopback server (what a real client would hold)."""

    def __init__(self, url: str, timeout: float = 300) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, json.loads(raw) if raw and raw[:1] in b"{[" else raw
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class Agent:
    """A ``node-agent run`` subprocess with the embedded scheduler, on free loopback ports."""

    def __init__(self, name: str, workdir: Path, model: str = "tiny.en", **env: str) -> None:
        self.name, self.model = name, model
        self.sched_port, self.http_port = free_port(), free_port()
        self.sched_url = f"http://127.0.0.1:{self.sched_port}"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "NODE_AGENT_SCHEDULER__URL": "embedded",
            "NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{self.sched_port}",
            "NODE_AGENT_HTTP__LISTEN": f"127.0.0.1:{self.http_port}",
            "NODE_AGENT_NODE__STATE_DIR": str(workdir / name),
            "NODE_AGENT_ASR__MODEL": model,
            "NODE_AGENT_ASR__DEVICE": "cpu",
            "NODE_AGENT_SCHEDULER__MAX_WAIT_S": "300",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.sched: Http | None = None
        self.http: Http | None = None

    def start(self, timeout: float = 180) -> float:
        """Spawn and wait for /readyz 200; returns the seconds it took."""
        t0 = time.perf_counter()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node_agent", "run"], env=self.env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.http = Http(self.url, timeout=5)
        self.sched = Http(self.sched_url)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.http.request("GET", "/readyz")[0] == 200:
                    return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.name} not ready within {timeout} s; see {self.log_path}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()

    def status(self) -> dict[str, Any]:
        assert self.http is not None
        return self.http.request("GET", "/status")[1]

    def worker(self) -> dict[str, Any]:
        return self.status()["workers"][0]

    def submit(self, data: bytes, filename: str, options: dict[str, Any] | None = None) -> str:
        assert self.sched is not None
        fields = {"options": json.dumps(options)} if options else {}
        body, ctype = multipart(fields, filename, data)
        status, reply = self.sched.request("POST", "/v1/jobs", body, {"Content-Type": ctype})
        if status != 202:
            raise RuntimeError(f"submit failed: {status} {reply}")
        return reply["job_id"]

    def wait(self, job_id: str, after_segment: int | None = None) -> dict[str, Any]:
        assert self.sched is not None
        query = "?wait_s=300" + (f"&after_segment={after_segment}" if after_segment is not None else "")
        while True:
            status, view = self.sched.request("GET", f"/v1/jobs/{job_id}{query}")
            if status != 200:
                raise RuntimeError(f"job {job_id}: {status} {view}")
            if view["state"] in ("succeeded", "failed") or (after_segment is not None and view["segments"]):
                return view

    def run(self, data: bytes, filename: str, options: dict[str, Any] | None = None,
            first: bool = False) -> dict[str, Any]:
        """Submit, (optionally) wait for the first segment, wait for the result; client-side seconds."""
        t0 = time.perf_counter()
        job_id = self.submit(data, filename, options)
        first_s = None
        if first:
            self.wait(job_id, after_segment=0)
            first_s = time.perf_counter() - t0
        view = self.wait(job_id)
        total = time.perf_counter() - t0
        if view["state"] != "succeeded":
            raise RuntimeError(f"job {job_id} failed: {view.get('error')}")
        node = view["timings"].get("node", {})
        return {"total_s": total, "first_s": first_s, "text": view["result"]["text"],
                "segments": view["result"]["segments"], "node": node, "server_total_s": view["timings"]["total_s"]}

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system


def decode(data: bytes) -> Any:
    """The worker's own decoder (PyAV, 16 kHz mono float32), so both sides transcribe the same samples.

    faster-whisper's ``decode_audio`` gives samples that differ in the last bit (s16 rather than float
    resampling) and runs ``gc.collect()`` on every call, which costs this process 10-50 ms per clip.
    """
    from plugins.asr.audio import decode as plugin_decode

    return plugin_decode(data, "auto", None, 3600.0)


class Plain:
    """Plain faster-whisper in this process: the model the agent's worker loads, with the same settings."""

    def __init__(self, model: str, cpu_threads: int) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(resolve_model(model), device="cpu", compute_type="int8", cpu_threads=cpu_threads)
        self._batched = None

    def run(self, data: bytes, batched: bool = False) -> dict[str, Any]:
        """Decode the file bytes, transcribe(), iterate: what the worker does for a job, minus the agent."""
        t0 = time.perf_counter()
        audio = decode(data)
        if batched:
            from faster_whisper import BatchedInferencePipeline

            self._batched = self._batched or BatchedInferencePipeline(self.model)
            segments, _ = self._batched.transcribe(audio, beam_size=5, batch_size=8)
        else:
            segments, _ = self.model.transcribe(audio, **DECODE)
        texts, first = [], None
        for segment in segments:
            first = first if first is not None else time.perf_counter() - t0
            texts.append(segment.text)
        return {"total_s": time.perf_counter() - t0, "first_s": first, "text": "".join(texts).strip()}

    def iteration(self, audio: Any) -> float:
        """Seconds spent iterating the segment generator only (the decode), as the worker's timing measures."""
        segments, _ = self.model.transcribe(audio, **DECODE)
        t0 = time.perf_counter()
        for _ in segments:
            pass
        return time.perf_counter() - t0


class ForeignCpu:
    """Samples the CPU time used by processes outside this benchmark (other users of a shared machine)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.used = 0.0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ours(self) -> set[int]:
        me = psutil.Process()
        return {me.pid, *(c.pid for c in me.children(recursive=True))}

    def _snapshot(self) -> dict[int, float]:
        out = {}
        for proc in psutil.process_iter(["pid", "cpu_times"]):
            t = proc.info["cpu_times"]
            if t is not None:
                out[proc.info["pid"]] = t.user + t.system
        return out

    def _run(self) -> None:
        before, t0 = self._snapshot(), time.monotonic()
        while not self._stop.wait(self.interval):
            now, t1 = self._snapshot(), time.monotonic()
            ours = self._ours()
            self.used += sum(v - before.get(pid, v) for pid, v in now.items() if pid not in ours)
            self.elapsed += t1 - t0
            before, t0 = now, t1

    def __enter__(self) -> "ForeignCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cores(self) -> float:
        """Average number of cores the rest of the machine kept busy."""
        return self.used / self.elapsed if self.elapsed else 0.0


def plain_server(model: str, threads: int) -> int:
    """``run.py --plain-server MODEL THREADS``: one plain faster-whisper process, timing requests from stdin.

    Each plain configuration gets a process of its own, as each agent worker is one: a process that had run
    batched decoding was measured decoding sequentially about 15 % faster afterwards, so sharing one process
    between the plain sides would hand that to some of them. (The cause is open: fixing glibc's mmap threshold
    from the start did not reproduce it; docs/benchmarks.md.)
    """
    plain = Plain(model, threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "run":
            out = plain.run(Path(req["file"]).read_bytes(), batched=req.get("batched", False))
        elif req["op"] == "iteration":
            out = {"s": plain.iteration(decode(Path(req["file"]).read_bytes()))}
        else:
            out = {"error": f"unknown op {req['op']!r}"}
        print(json.dumps(out), flush=True)
    return 0


class PlainProc:
    """Client of a ``--plain-server`` subprocess; times are measured inside it, IPC is not counted."""

    def __init__(self, model: str, threads: int, log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--plain-server", model, str(threads)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._call_raw()  # {"ready": true} once the model is loaded

    def _call_raw(self, req: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if req is not None:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"plain server exited ({self.proc.poll()}); see {self._log.name}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def run(self, name: str, batched: bool = False) -> dict[str, Any]:
        return self._call_raw({"op": "run", "file": str(DATA / name), "batched": batched})

    def iteration(self, name: str) -> float:
        return self._call_raw({"op": "iteration", "file": str(DATA / name)})["s"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
        self._log.close()


# ----------------------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="node-agent-bench-"))
        self.cores = len(os.sched_getaffinity(0))
        self.threads = choose_cpu_threads(0, self.cores)  # one process with every core (at most 8), as one worker per device had
        self.agents: dict[str, Agent] = {}
        self.plains: dict[tuple[str, str, int], PlainProc] = {}
        self.results: dict[str, Any] = {"machine": machine(), "loads": {}, "sections": {}}
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.thread_rows: list[tuple[str, ...]] = []

    def reps(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def agent(self, model: str = "tiny.en") -> Agent:
        if model not in self.agents:
            # The agent as a user gets it: its default slots and threads (issue 24: each slot has every core,
            # so a lone job on the idle node is compared with the one plain process with every core). Sections
            # 1-3 send one job at a time; what the slots carry under a full queue is section `throughput`'s.
            a = Agent(f"agent-{model}", self.tmp, model)
            log(f"starting node-agent run ({model})")
            a.start()
            self.agents[model] = a
        return self.agents[model]

    def plain(self, model: str = "tiny.en", role: str = "sequential", threads: int | None = None) -> PlainProc:
        """A plain faster-whisper process per (model, role, threads), like one agent worker per model."""
        key = (model, role, threads or self.threads)
        if key not in self.plains:
            self.plains[key] = PlainProc(model, key[2], self.tmp / f"plain-{model}-{role}-{key[2]}.log")
        return self.plains[key]

    def close(self) -> None:
        for a in self.agents.values():
            a.stop()
        for p in self.plains.values():
            p.close()

    def row(self, item: str, what: str, agent: str, plain: str, ratio: str, target: str) -> None:
        self.rows.append((item, what, agent, plain, ratio, target))


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import ctranslate2
    import faster_whisper

    return {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(), "faster_whisper": faster_whisper.__version__,
        "ctranslate2": ctranslate2.__version__, "load_at_start": os.getloadavg(),
    }


def alternate(reps: int, a: Callable[[], Any], b: Callable[[], Any]) -> tuple[list[Any], list[Any]]:
    """Run a and b ``reps`` times each, alternating which goes first (so slow drift hits both sides)."""
    ra, rb = [], []
    for i in range(reps):
        if i % 2:
            rb.append(b())
            ra.append(a())
        else:
            ra.append(a())
            rb.append(b())
    return ra, rb


def ratio(a: list[float], b: list[float]) -> str:
    """median(a)/median(b), and min(a)/min(b): the minimum is what interference from other processes spares."""
    return f"{median(a) / median(b):.3f} (min {min(a) / min(b):.3f})"


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def fmt(x: float | None, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} {unit}".strip()


# ----------------------------------------------------------------------------------------- sections


def overhead(b: Bench) -> None:
    """1. End-to-end job time through the agent over transcribe() + iteration, and time to the first segment."""
    agent, plain = b.agent(), b.plain()
    out = {}
    for name in ("jfk.flac", SHORT_CLIP):
        data = (DATA / name).read_bytes()
        plain.run(name), agent.run(data, name)  # warm
        n = b.reps(9, 3)
        cpu0 = agent.cpu_seconds()
        ra, rp = alternate(n, lambda: agent.run(data, name), lambda: plain.run(name))
        cpu_per_job = (agent.cpu_seconds() - cpu0) / n
        fa, fp = alternate(n, lambda: agent.run(data, name, first=True), lambda: plain.run(name))
        a_tot, p_tot = median([r["total_s"] for r in ra]), median([r["total_s"] for r in rp])
        a_first, p_first = median([r["first_s"] for r in fa]), median([r["first_s"] for r in fp])
        node = {k: median([r["node"][k] for r in ra]) for k in ("node_s", "total_s", "segments_iteration_s")}
        out[name] = {"agent_total_s": a_tot, "plain_total_s": p_tot, "ratio": a_tot / p_tot,
                     "agent_first_s": a_first, "plain_first_s": p_first, "first_ratio": a_first / p_first,
                     "scheduler_total_s": median([r["server_total_s"] for r in ra]), "node": node,
                     "agent_cpu_per_job_s": cpu_per_job, "runs": n}
        b.row("1", f"job time, {name}", fmt(a_tot), fmt(p_tot),
              ratio([r["total_s"] for r in ra], [r["total_s"] for r in rp]), "<= 1.05" if name == "jfk.flac" else "")
        b.row("1", f"first segment, {name}", fmt(a_first), fmt(p_first),
              ratio([r["first_s"] for r in fa], [r["first_s"] for r in fp]), "report")
    b.results["sections"]["overhead"] = out


def iteration(b: Bench) -> None:
    """2. The plugin's segments_iteration_s over iterating the same generator in a plain process."""
    agent, plain = b.agent(), b.plain()
    out = {}
    for name in ("jfk.flac", SHORT_CLIP, LONG_EN):
        data = (DATA / name).read_bytes()
        n = b.reps(9 if name != LONG_EN else 5, 3 if name != LONG_EN else 1)
        agent.run(data, name), plain.iteration(name)  # warm
        ra, rp = alternate(n, lambda: agent.run(data, name)["node"]["segments_iteration_s"],
                           lambda: plain.iteration(name))
        a, p = median(ra), median(rp)
        out[name] = {"agent_iteration_s": a, "plain_iteration_s": p, "ratio": a / p, "runs": n}
        b.row("2", f"segment iteration, {name}", fmt(a), fmt(p), ratio(ra, rp), "<= 1.02")
    b.results["sections"]["iteration"] = out


#: Section 3's clips: English with tiny.en, Mandarin with base.
LONG_CLIPS = (LONG_EN, LONG_ZH, ZH_JOINED)


def long_audio(b: Bench) -> None:
    """3. Long audio, batched (faster-whisper's BatchedInferencePipeline, batch 8) against sequential: the agent's
    ``batched: true`` path against plain BatchedInferencePipeline, and each one's speed-up and accuracy against
    sequential decoding of the same clip."""
    out = {}
    joined_path = OUT / ZH_JOINED
    joined_path.parent.mkdir(exist_ok=True)
    joined_path.write_bytes(wav_bytes(joined(ZH_JOINED_ORDER)[0]))
    refs = {name: row["reference_text"] for name, row in references().items()}
    refs[str(joined_path)] = "".join(refs[n] for n in ZH_JOINED_ORDER)
    batched, sequential = {"batched": True, "batch_size": 8}, {"batched": False}
    for name in LONG_CLIPS:
        model, score, kind = ("tiny.en", wer, "WER") if name == LONG_EN else ("base", cer, "CER")
        name = str(joined_path) if name == ZH_JOINED else name
        agent, plain, pipeline = b.agent(model), b.plain(model), b.plain(model, role="pipeline8")
        data = (DATA / name).read_bytes()
        n = b.reps(3, 1)
        log(f"long audio: {name} ({model}), {n} run(s) per side")
        agent.run(data, name, batched), pipeline.run(name, batched=True)  # warm
        agent.run(data, name, sequential), plain.run(name)
        a_b, p_b = alternate(n, lambda: agent.run(data, name, batched, first=True),
                             lambda: pipeline.run(name, batched=True))
        a_s, p_s = alternate(n, lambda: agent.run(data, name, sequential, first=True), lambda: plain.run(name))
        ref = refs[name] or p_s[-1]["text"]
        t = {side: median([r["total_s"] for r in runs]) for side, runs in
             (("agent_batched", a_b), ("plain_batched", p_b), ("agent_sequential", a_s), ("plain_sequential", p_s))}
        res = {
            "model": model, "metric": kind, "reference": "reference" if refs[name] else "plain sequential output",
            **{f"{side}_s": v for side, v in t.items()},
            "agent_speedup": t["agent_sequential"] / t["agent_batched"],
            "plain_speedup": t["plain_sequential"] / t["plain_batched"],
            **{f"score_{side}": score(ref, runs[-1]["text"]) for side, runs in
               (("agent_batched", a_b), ("plain_batched", p_b), ("agent_sequential", a_s),
                ("plain_sequential", p_s))},
            # The agent runs faster-whisper's own pipeline: its words must be plain's, not merely as many.
            "batched_vs_plain_batched": score(p_b[-1]["text"], a_b[-1]["text"]) if p_b[-1]["text"] else None,
            "first_segment_agent_batched_s": median([r["first_s"] for r in a_b]),
            "first_segment_agent_sequential_s": median([r["first_s"] for r in a_s]),
            "first_segment_plain_batched_s": median([r["first_s"] for r in p_b]),
            "segments_agent_batched": len(a_b[-1]["segments"]), "runs": n,
            "texts": {"agent_batched": a_b[-1]["text"], "plain_batched": p_b[-1]["text"],
                      "agent_sequential": a_s[-1]["text"], "plain_sequential": p_s[-1]["text"]},
        }
        name = Path(name).name
        out[name] = res
        lang = "English" if model == "tiny.en" else "Mandarin"
        short = f"{name[:24]}{'...' if len(name) > 24 else ''}"
        b.row("3", f"long audio {lang} ({model}, {short}): batched, agent / plain BatchedInferencePipeline",
              fmt(t["agent_batched"]), fmt(t["plain_batched"]),
              ratio([r["total_s"] for r in a_b], [r["total_s"] for r in p_b]), "<= 1.05")
        b.row("3", "  speed-up of batched over sequential (agent / plain)", f"{res['agent_speedup']:.2f}x",
              f"{res['plain_speedup']:.2f}x", f"seq agent/plain {t['agent_sequential'] / t['plain_sequential']:.3f}",
              "report")
        same = res["batched_vs_plain_batched"]
        b.row("3", f"  {kind}, batched / sequential ({res['reference']})",
              f"{res['score_agent_batched']:.3f} / {res['score_agent_sequential']:.3f}",
              f"{res['score_plain_batched']:.3f} / {res['score_plain_sequential']:.3f}",
              "agent vs plain batched: " + ("n/a" if same is None else f"{same:.3f}"), "agent = plain (0.000)")
        b.row("3", "  first segment: batched / sequential (agent)", fmt(res["first_segment_agent_batched_s"]),
              fmt(res["first_segment_agent_sequential_s"]),
              f"plain batched: {fmt(res['first_segment_plain_batched_s'])}", "report")
    b.results["sections"]["long"] = out


def throughput(b: Bench) -> None:
    """4. 40 short clips from 4 clients at once: jobs/s of the agent's default configuration, of plain
    faster-whisper as a service runs it, and of the best plain processes x threads split; a single job on each
    idle side; transcripts compared (bench/throughput.py, in processes of its own)."""
    raw, md = OUT / "throughput.json", OUT / "throughput.md"
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--json", str(raw), "--markdown", str(md),
           "--workdir", str(b.tmp / "throughput")] + (["--quick"] if b.quick else [])
    log("throughput: " + " ".join(cmd[1:]))
    raw.unlink(missing_ok=True)  # a run that dies before writing must not be read as this one
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0 or not raw.exists():
        raise RuntimeError(f"bench/throughput.py exited with {proc.returncode}; logs in {b.tmp / 'throughput'}")
    res = json.loads(raw.read_text())
    b.results["sections"]["throughput"] = {k: v for k, v in res.items() if k != "rows"}
    for row in res["rows"]:
        b.row(*row)


PLAIN_RSS = """
import sys, json, psutil
from faster_whisper import WhisperModel
from node_agent.model_resolution import resolve_model
m = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=int(sys.argv[1]))
clips = [open(p, "rb").read() for p in sys.argv[3:]]
rss = []
from plugins.asr.audio import decode
for i in range(int(sys.argv[2])):
    segs, _ = m.transcribe(decode(clips[i % len(clips)], "auto", None, 3600.0), beam_size=5)
    for _ in segs:
        pass
    if i == 0:
        rss.append(psutil.Process().memory_info().rss)
rss.append(psutil.Process().memory_info().rss)
print(json.dumps(rss))
"""


def memory(b: Bench) -> None:
    """5. Agent process RSS (no model in it) and worker RSS after 100 jobs; a plain process for reference."""
    agent = Agent("memory", b.tmp)  # a fresh one: RSS after these 100 short jobs only
    agent.start()
    try:
        _memory(b, agent)
    finally:
        agent.stop()


def _memory(b: Bench, agent: Agent) -> None:
    clips = [(n, (DATA / n).read_bytes()) for n in short_english_clips()]
    jobs = 100
    agent.run(clips[0][1], clips[0][0])
    w0 = agent.worker()
    a0 = psutil.Process(agent.proc.pid).memory_info().rss
    while agent.worker()["jobs_served_total"] < jobs:
        left = jobs - agent.worker()["jobs_served_total"]
        ids = [agent.submit(data, name) for name, data in clips[:left]]
        for job_id in ids:
            agent.wait(job_id)
    w1 = agent.worker()
    a1 = psutil.Process(agent.proc.pid).memory_info().rss
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    native = sorted({lib for lib in ("ctranslate2", "onnxruntime", "libav") if lib in maps})
    log("plain process: 100 transcriptions for the RSS reference")
    plain_rss = json.loads(subprocess.run(
        [sys.executable, "-c", PLAIN_RSS, str(b.threads), str(jobs), *[str(DATA / n) for n, _ in clips]],
        capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    mib = 1024 ** 2
    res = {"jobs": w1["jobs_served_total"], "agent_rss_first_mib": a0 / mib, "agent_rss_mib": a1 / mib,
           "worker_rss_first_mib": w0["rss_bytes"] / mib, "worker_rss_mib": w1["rss_bytes"] / mib,
           "worker_pid_unchanged": w0["pid"] == w1["pid"], "native_libraries_in_agent": native,
           "plain_rss_first_mib": plain_rss[0] / mib, "plain_rss_mib": plain_rss[1] / mib}
    b.results["sections"]["memory"] = res
    b.row("5", f"agent process RSS after {res['jobs']} jobs (first job)",
          f"{res['agent_rss_mib']:.0f} MiB ({res['agent_rss_first_mib']:.0f})", "-",
          "no model: " + ("yes" if not native else f"NO ({', '.join(native)})"), "report")
    b.row("5", f"worker RSS after {res['jobs']} jobs (first job) / plain process after 100",
          f"{res['worker_rss_mib']:.0f} MiB ({res['worker_rss_first_mib']:.0f})",
          f"{res['plain_rss_mib']:.0f} MiB ({res['plain_rss_first_mib']:.0f})",
          f"{w1['rss_bytes'] / plain_rss[1]:.2f}", "report")


PLAIN_START = """
import time, numpy as np
t0 = time.perf_counter()
from faster_whisper import WhisperModel
from node_agent.model_resolution import resolve_model
m = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=%d)
segs, _ = m.transcribe(np.zeros(16000, dtype=np.float32), language="en", beam_size=1)
list(segs)
print(time.perf_counter() - t0)
"""


def startup(b: Bench) -> None:
    """6. `node-agent run` to /readyz 200; worker SIGKILL to ready again. Plain: process start to a warm model."""
    n = b.reps(3, 1)
    ready, recover, plain = [], [], []
    for i in range(n):
        a = Agent(f"startup-{i}", b.tmp)
        try:
            ready.append(a.start())
            time.sleep(0.5)
            pid = a.worker()["pid"]
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                w = a.worker()
                if w["state"] == "ready" and w["pid"] not in (None, pid) and a.http.request("GET", "/readyz")[0] == 200:
                    recover.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 120:
                    raise RuntimeError("worker did not come back within 120 s")
                time.sleep(0.02)
        finally:
            a.stop()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", PLAIN_START % b.threads], cwd=ROOT, check=True, capture_output=True)
        plain.append(time.perf_counter() - t0)
    res = {"ready_s": median(ready), "crash_to_ready_s": median(recover), "plain_process_to_warm_model_s":
           median(plain), "runs": n}
    b.results["sections"]["startup"] = res
    b.row("6", "start-up: `node-agent run` to /readyz 200 / plain process to a warm model",
          fmt(res["ready_s"]), fmt(res["plain_process_to_warm_model_s"]),
          f"{res['ready_s'] / res['plain_process_to_warm_model_s']:.2f}", "report")
    b.row("6", "worker SIGKILL to ready again (/readyz 200, new pid)", fmt(res["crash_to_ready_s"]), "-", "-",
          "report")


def threads(b: Bench) -> None:
    """cpu_threads 1 and 2 (and what 0 picks here) with plain faster-whisper: seconds per clip."""
    out = {}
    seconds = {name: float(row["duration_s"]) for name, row in references().items()}
    for t in sorted({1, 2, b.threads}):
        p = b.plain("tiny.en", role="threads", threads=t)
        p.run("jfk.flac")
        short = median([p.run("jfk.flac")["total_s"] for _ in range(b.reps(5, 2))])
        long = median([p.run(LONG_EN)["total_s"] for _ in range(b.reps(2, 1))])
        out[t] = {"jfk_s": short, "long_en_s": long}
        b.thread_rows.append((f"{t}{' (what 0 picks here)' if t == b.threads else ''}", fmt(short),
                              f"{short / seconds['jfk.flac']:.3f}", fmt(long), f"{long / seconds[LONG_EN]:.3f}"))
    b.results["sections"]["threads"] = out


def profile(b: Bench) -> None:
    """Agent side only: the embedded scheduler and the agent in this process under pyinstrument, 20 jfk jobs."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        log("profile: pyinstrument is not installed (pip install pyinstrument); skipped")
        return
    import asyncio

    from node_agent.agent import Agent as NodeAgent
    from node_agent.agent import probe_node
    from node_agent.config import load_settings
    from node_agent.scheduler.server import start_scheduler

    port = free_port()
    env = {"NODE_AGENT_SCHEDULER__LISTEN": f"127.0.0.1:{port}", "NODE_AGENT_ASR__DEVICE": "cpu",
           "NODE_AGENT_HTTP__LISTEN": f"127.0.0.1:{free_port()}", "NODE_AGENT_NODE__STATE_DIR": str(b.tmp / "prof"),
           "NODE_AGENT_LOG__LEVEL": "WARNING", "NODE_AGENT_ASR__WORKERS_PER_DEVICE": "1"}
    settings = load_settings(None, env)
    data = (DATA / "jfk.flac").read_bytes()
    jobs = b.reps(20, 10)
    timings: dict[str, float] = {}

    async def main() -> Any:
        sched = await start_scheduler(settings.scheduler, state_dir=settings.node.state_dir)
        agent = NodeAgent(settings, sched.url, facts=await probe_node())
        await agent.start()
        await agent.workers["cpu/0"].wait_ready(120)
        await agent.identity.registered_event.wait()
        client = Agent("profile-client", b.tmp)
        client.sched = Http(sched.url)
        await asyncio.to_thread(client.run, data, "jfk.flac")  # warm
        profiler = Profiler(async_mode="disabled", interval=0.0005)
        cpu0, t0 = time.process_time(), time.perf_counter()
        profiler.start()
        for _ in range(jobs):
            await asyncio.to_thread(client.run, data, "jfk.flac")
        profiler.stop()
        timings.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0)
        await agent.drain(5)
        await agent.stop()
        await sched.stop()
        return profiler

    profiler = asyncio.run(main())
    OUT.mkdir(exist_ok=True)
    # The loop mostly waits in epoll while the worker decodes; the flat self-time list shows where the rest goes.
    flat = profiler.output_text(unicode=True, flat=True, processor_options={"filter_threshold": 0.002})
    tree = profiler.output_text(unicode=True, show_all=True, processor_options={"filter_threshold": 0.002})
    (OUT / "profile-agent.txt").write_text(flat + "\n" + tree)
    b.results["sections"]["profile"] = {"jobs": jobs, "process_cpu_s_per_job": timings["cpu_s"] / jobs,
                                        "wall_s_per_job": timings["wall_s"] / jobs,
                                        "report": str(OUT / "profile-agent.txt")}
    b.row("profile", f"agent + embedded scheduler + client, in one process: CPU per jfk job ({jobs} jobs)",
          fmt(timings["cpu_s"] / jobs), "-", "-", f"see {OUT.name}/profile-agent.txt")


def scheduler(b: Bench) -> None:
    """S. The standalone scheduler under 200 fake nodes (bench/scheduler.py, in processes of its own), per store
    (memory, sqlite, postgresql with one and two replicas): jobs/s as fast as possible and queued_s at assignment at
    200 jobs/s offered."""
    raw, md = OUT / "scheduler.json", OUT / "scheduler.md"
    cmd = [sys.executable, str(ROOT / "bench" / "scheduler.py"), "--json", str(raw), "--markdown", str(md)]
    if b.quick:
        cmd += ["--jobs", "500"]
    log("scheduler: " + " ".join(cmd[1:]))
    raw.unlink(missing_ok=True)  # a run that dies before writing must not be read as this one
    proc = subprocess.run(cmd, cwd=ROOT)
    if not raw.exists():
        raise RuntimeError(f"bench/scheduler.py exited with {proc.returncode} and wrote no results")
    res = json.loads(raw.read_text())
    b.results["sections"]["scheduler"] = {"config": res["config"], "postgresql": res.get("postgresql"), "stores": [
        {k: v for k, v in s.items() if k != "checks"} for s in res["stores"]]}
    for s in res["stores"]:
        name = f"{s['store']} ({s['replicas']} replica{'s' if s['replicas'] > 1 else ''})"
        if "error" in s:
            b.row("S", f"scheduler, {name}: failed", s["error"].splitlines()[0][:60], "-", "-", "see log")
            continue
        for p in s["phases"]:
            if p["offered_jobs_per_s"] is None:
                b.row("S", f"scheduler, {name}, {p['jobs']} jobs as fast as possible, {res['config']['nodes']} fake "
                      f"nodes: jobs/s", f"{p['jobs_per_s']:.0f} jobs/s", "-", "-", ">= 300 jobs/s")
            else:
                b.row("S", f"scheduler, {name}, {p['offered_jobs_per_s']:g} jobs/s offered: queued_s p50 / p99",
                      f"{p['queued_p50_s'] * 1000:.1f} / {p['queued_p99_s'] * 1000:.1f} ms", "-", "-", "p99 <= 50 ms")
    # Issue 23's priority load, on a cluster of its own: a batch backlog builds only while every node is busy, so
    # its decodes are long (2 s, spread +/- 50 % so that nodes do not all free up at once).
    praw = OUT / "scheduler-priority.json"
    pcmd = [sys.executable, str(ROOT / "bench" / "scheduler.py"), "--stores", "sqlite,postgresql", "--loads",
            "priority", "--warmup", "0", "--decode-s", "2", "--decode-jitter", "0.5", "--json", str(praw),
            "--markdown", str(OUT / "scheduler-priority.md")]
    log("scheduler: " + " ".join(pcmd[1:]))
    praw.unlink(missing_ok=True)
    pproc = subprocess.run(pcmd, cwd=ROOT)
    if praw.exists():
        pres = json.loads(praw.read_text())
        b.results["sections"]["scheduler"]["priority"] = [
            {"store": s["store"], **s["priority"]} for s in pres["stores"] if "priority" in s]
        for s in pres["stores"]:
            if "priority" not in s:
                b.row("S", f"scheduler, {s['store']}, priority: failed", s.get("error", "")[:60], "-", "-", "see log")
                continue
            p = s["priority"]
            b.row("S", f"scheduler, {s['store']}, interactive queued_s p99, empty queue / {p['backlog']}+ batch "
                  "queued", f"{p['empty_p99_s'] * 1000:.1f} / {p['loaded_p99_s'] * 1000:.1f} ms "
                  f"({p['ratio_p99']:.1f}x)", "-", "-", "<= 1.5x")
    if proc.returncode != 0:  # the rows are written first: a failed check must not hide the other stores' numbers
        raise RuntimeError(f"bench/scheduler.py exited with {proc.returncode}: see its output above")
    if pproc.returncode != 0:
        raise RuntimeError(f"bench/scheduler.py (priority) exited with {pproc.returncode}: see its output above")


def split(b: Bench) -> None:
    """5. Long recordings cut into sections on an idle 2-slot node (issue 24): bench/split.py."""
    import split as split_bench  # bench/ is this script's directory, first on sys.path

    split_bench.run(b, sys.modules[__name__])


RUNNERS = {"overhead": overhead, "iteration": iteration, "long": long_audio, "throughput": throughput,
           "memory": memory, "startup": startup, "threads": threads, "profile": profile, "scheduler": scheduler,
           "split": split}


def print_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain-server"]:
        return plain_server(argv[1], int(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not for the docs)")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, default=OUT / "results.json", help="where raw results go")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    b = Bench(args)
    m = b.results["machine"]
    log(f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; load {fmt_load(m['load_at_start'])}")
    try:
        for name in SECTIONS:
            if name in chosen:
                start_load = load1()
                log(f"section {name} (load {start_load:.2f})")
                with ForeignCpu() as foreign:
                    RUNNERS[name](b)
                b.results["loads"][name] = {"load1_at_start": start_load, "foreign_cores": round(foreign.cores, 3)}
                log(f"section {name} done; other processes kept {foreign.cores:.2f} cores busy meanwhile")
    finally:
        b.close()
    b.results["machine"]["load_at_end"] = os.getloadavg()
    b.results["rows"] = b.rows
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(b.results, indent=2, default=str))
    end = fmt_load(b.results["machine"]["load_at_end"])
    print(f"\n{m['date']}; {m['cpu']}; {m['usable_cores']} cores; {m['memory_gib']} GiB; "
          f"load (1/5/15 min) at start {fmt_load(m['load_at_start'])}, at end {end}\n")
    print("other processes on the machine during each section (average cores busy): " + ", ".join(
        f"{k} {v['foreign_cores']:.2f}" for k, v in b.results["loads"].items()) + "\n")
    print_table(("#", "measure", "node-agent", "plain faster-whisper", "ratio", "target"), b.rows)
    print_table(("cpu_threads (plain faster-whisper, tiny.en)", "jfk.flac", "RTF", f"{LONG_EN}", "RTF"),
                b.thread_rows)
    print(f"\nraw results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
