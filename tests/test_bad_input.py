"""Bad input through every door (POST /v1/jobs, the OpenAI endpoint, `node-agent transcribe`):
each gets a clear 4xx or bad_audio naming the problem, no worker stops, and the next good job succeeds."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import urllib.request

import numpy as np
import pytest
import pytest_asyncio

from helpers import DATA, clip, multipart, plain_transcript, plain_wer
from node_agent.config import load_settings
from procs import free_port, http_json, job, metric, submit, wait_for, wait_finished
from test_cluster import start_agent, status_of
from test_supervisor import _float_wav_with_nan, _wav_with_lying_header

pytestmark = pytest.mark.asyncio(loop_scope="module")


def video_only_file() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        stream = c.add_stream("mpeg4", rate=5)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return buf.getvalue()


def over_limit_audio() -> bytes:
    """31 s of pcm16: above the asr.max_audio_s = 30 set for these tests."""
    return (np.zeros(31 * 16000, dtype="<i2") + 100).tobytes()


BAD_JOBS = {
    "zero bytes": (b"", {}, "invalid_request"),  # refused at submission: audio must not be empty
    "one sample": (b"\x01\x00", {"format": "pcm_s16le", "sample_rate": 16000}, "too short"),
    "random bytes": (np.random.default_rng(3).bytes(30000), {}, "cannot decode"),
    "truncated wav": (clip("jfk.flac")[:400], {}, "decode"),
    "no audio stream": (video_only_file(), {}, "no audio stream"),
    "nan and inf float pcm": (_float_wav_with_nan(), {}, "NaN"),
    "over max_audio_s": (over_limit_audio(), {"format": "pcm_s16le", "sample_rate": 16000}, "max_audio_s"),
}


def post_raw(url: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# One agent for the module's tests: none of them counts what another sends (4xx requests are no jobs, and the
# only jobs the 4xx test runs succeed).
@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def agent(tmp_path_factory):
    port = free_port()
    proc, url = await start_agent(tmp_path_factory.mktemp("bad-input"), "agent", "embedded",
                                  NODE_AGENT_SCHEDULER__LISTEN=f"127.0.0.1:{port}",
                                  NODE_AGENT_ASR__MAX_AUDIO_S="30",
                                  NODE_AGENT_SCHEDULER__MAX_BODY_BYTES=str(4 * 1024 * 1024))
    yield url, f"http://127.0.0.1:{port}"
    await proc.stop()


async def test_bad_audio_through_the_job_api_and_openai_endpoint(agent):
    url, scheduler = agent
    pid = status_of(url)["workers"][0]["pid"]
    for name, (data, fields, needle) in BAD_JOBS.items():
        if not data:
            code, reply = http_json("POST", f"{scheduler}/v1/jobs", {"audio_b64": "", **fields})
            assert code == 400 and "audio" in reply["error"]["message"], (name, reply)
            continue
        job_id = submit(scheduler, data, **fields)
        view = await wait_finished(scheduler, job_id, 60, name)
        assert view["state"] == "failed" and view["error"]["code"] == "bad_audio", (name, view)
        assert needle in view["error"]["message"], (name, view["error"])
        if fields.get("format") == "pcm_s16le":
            continue  # the OpenAI endpoint takes files only; raw PCM has no way in there
        # The same through the OpenAI endpoint: a 400 that names the problem.
        body, ctype = multipart({"model": "whisper-1"}, "clip.bin", data)
        code, raw = await asyncio.to_thread(post_raw, f"{scheduler}/v1/audio/transcriptions", body, ctype)
        err = json.loads(raw)["error"]
        assert code == 400 and needle in err["message"], (name, code, err)
    # A header lying about its length decodes what is there when the client allows truncated audio.
    job_id = submit(scheduler, _wav_with_lying_header(), options={"allow_truncated": True})
    view = await wait_finished(scheduler, job_id, 60, "lying header")
    assert view["state"] == "succeeded", view
    st = status_of(url)
    assert st["workers"][0]["pid"] == pid and sum(st["workers"][0]["restarts"].values()) == 0
    openai_cases = sum(1 for data, fields, _ in BAD_JOBS.values() if data and fields.get("format") != "pcm_s16le")
    assert metric(url, "node_agent_jobs_total", {"outcome": "bad_audio"}) == len(BAD_JOBS) - 1 + openai_cases
    good = submit(scheduler, clip("jfk.flac"))
    view = await wait_for(lambda: (v := job(scheduler, good, 5))["state"] == "succeeded" and v, 60, "good job")
    assert plain_wer(view["result"]["text"], "jfk.flac") == 0.0, view["result"]["text"]


async def test_bad_requests_are_clear_4xx(agent):
    url, scheduler = agent
    cases = [
        ("invalid JSON", b"{not json", "application/json", 400, "JSON"),
        ("unknown language", json.dumps({"audio_b64": base64.b64encode(clip("jfk.flac")).decode(),
                                         "language": "klingon"}).encode(), "application/json", 400, "language"),
        ("unknown option", json.dumps({"audio_b64": "AAAA", "options": {"beam": 3}}).encode(), "application/json",
         400, "beam"),
        ("bad base64", json.dumps({"audio_b64": "***"}).encode(), "application/json", 400, "base64"),
        ("over the body limit", json.dumps({"audio_b64": "A" * (5 * 1024 * 1024)}).encode(), "application/json",
         413, "over the limit"),
    ]
    for name, body, ctype, status, needle in cases:
        code, raw = await asyncio.to_thread(post_raw, f"{scheduler}/v1/jobs", body, ctype)
        err = json.loads(raw)["error"]
        assert code == status and needle.lower() in err["message"].lower(), (name, code, err)
    body, ctype = multipart({"response_format": "docx"}, "a.flac", clip("jfk.flac"))
    code, raw = await asyncio.to_thread(post_raw, f"{scheduler}/v1/audio/transcriptions", body, ctype)
    assert code == 400 and "response_format" in json.loads(raw)["error"]["message"]
    # A file name that breaks the multipart grammar is a clear 400, not a server error.
    body, ctype = multipart({}, "a\r\nX-Evil: 1\x00.wav", clip("jfk.flac"))
    code, raw = await asyncio.to_thread(post_raw, f"{scheduler}/v1/jobs", body, ctype)
    assert code == 400 and "malformed multipart" in json.loads(raw)["error"]["message"], raw
    # A hostile file name is only ever a label: never a path.
    hostile = "../../../etc/passwd/..\\..\\boot.ini <script>.wav"
    body, ctype = multipart({}, hostile, clip("jfk.flac"))
    code, raw = await asyncio.to_thread(post_raw, f"{scheduler}/v1/jobs", body, ctype)
    assert code == 202, raw
    job_id = json.loads(raw)["job_id"]
    view = await wait_for(lambda: (v := job(scheduler, job_id, 5))["state"] == "succeeded" and v, 60, "hostile name")
    shown = view.get("filename") or ""
    assert shown.endswith(".wav") and "/" not in shown and "\\" not in shown, shown  # a label, not a path
    assert sum(status_of(url)["workers"][0]["restarts"].values()) == 0


async def test_bad_files_through_transcribe(tmp_path):
    files = {"empty.wav": b"", "random.bin": np.random.default_rng(5).bytes(5000),
             "video.mkv": video_only_file(), "nan.wav": _float_wav_with_nan()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    args = [str(tmp_path / n) for n in files] + [str(DATA / "jfk.flac")]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "node_agent", "transcribe", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 1
    errors = err.decode().strip().splitlines()
    assert len(errors) == len(files) and all(": bad_audio: " in e for e in errors), errors
    # jfk.flac was still transcribed: its segments as plain faster-whisper with the CLI's settings has them.
    plain = plain_transcript("jfk.flac", asr=load_settings(None).asr)
    assert all(seg["text"].strip() in out.decode() for seg in plain.segments), out.decode()
