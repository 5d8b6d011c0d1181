"""The Ray Serve app over real HTTP on a test Ray: API, errors, auth, batching, 503, autoscaling, faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time

import httpx
import psutil
import pytest
import torch
from transformers import BloomConfig, BloomForSequenceClassification

from bloomray.data.corpus import embedded_documents
from bloomray.data.tokenizer import train_tokenizer
from bloomray.model.build import build_from_config, preset_config
from bloomray.serving.run import DEFAULT_CONFIG, start_server

pytestmark = pytest.mark.integration
KEY = "test-key-0123456789"
HDR = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(embedded_documents()[:30], 512)
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    lm = build_from_config("causal_lm", preset_config("tiny", len(tok), **ids), seed=0)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    torch.manual_seed(0)
    clf = BloomForSequenceClassification(
        BloomConfig(
            vocab_size=len(tok),
            hidden_size=64,
            n_layer=2,
            n_head=4,
            num_labels=2,
            id2label={0: "negative", 1: "positive"},
            label2id={"negative": 0, "positive": 1},
            **ids,
        )
    )
    clf.save_pretrained(root / "clf")
    tok.save_pretrained(root / "clf")
    return root / "lm", root / "clf"


@pytest.fixture(scope="module")
def server(model_dirs, ray_local):
    from ray import serve

    os.environ["BLOOMRAY_API_KEYS"] = KEY
    os.environ.pop("BLOOMRAY_API_KEYS_FILE", None)
    lm, clf = model_dirs
    port = _free_port()
    url = start_server(
        {"tiny": str(lm), "clf": str(clf)},
        DEFAULT_CONFIG,
        port=port,
        host="127.0.0.1",
        overrides={
            "quantize": "none",
            "max_queue": 6,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "request_timeout_s": 30,
            "max_context": 128,
            "max_tokens_limit": 64,
        },
        deployment_overrides={
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            "max_ongoing_requests": 32,
            "max_queued_requests": 64,
        },
    )
    yield url, lm
    serve.shutdown()


def _post(url: str, path: str, body, headers=HDR) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{url}{path}", content=data, headers={**headers, "content-type": "application/json"}, timeout=60
    )


def _greedy_reference(lm_dir, prompt: str, max_tokens: int, stop: list[str]) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def test_completion_models_health_and_classify(server):
    url, _ = server
    r = _post(
        url,
        "/v1/completions",
        {"model": "tiny", "prompt": "The for statement", "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] <= 5 and body["usage"]["prompt_tokens"] > 0
    models = httpx.get(f"{url}/v1/models", headers=HDR).json()
    assert {m["id"]: m["task"] for m in models["data"]} == {"tiny": "causal_lm", "clf": "classification"}
    assert httpx.get(f"{url}/healthz").status_code == 200  # open, no key
    c = _post(url, "/v1/classify", {"model": "clf", "input": ["a fine film", "a dull film"]})
    assert c.status_code == 200, c.text
    for item in c.json()["data"]:
        assert item["label"] in ("negative", "positive")
        assert abs(sum(item["scores"].values()) - 1) < 1e-4
    bad = _post(url, "/v1/classify", {"model": "tiny", "input": "hello"})
    assert bad.status_code == 400 and "not a classifier" in bad.json()["error"]["message"]


def test_streaming_ends_with_done_and_matches_non_streamed(server):
    url, _ = server
    body = {"model": "tiny", "prompt": "Classes provide", "max_tokens": 8, "temperature": 0}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=HDR, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln[len("data: ") :] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert streamed == _post(url, "/v1/completions", body).json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": "x " * 200, "max_tokens": 8}, "prompt"),  # longer than the context
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 1000}, "max_tokens"),  # above the server limit
        ({"model": "tiny", "prompt": 123}, "prompt"),  # wrong type
        ({"model": "tiny", "prompt": "  "}, "prompt"),  # empty
        ({"model": "tiny", "prompt": []}, "prompt"),
        ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "prompt": "hi", "frequency_penality": 1}, "frequency_penality"),  # unknown field
        ({"model": "tiny", "prompt": "hi", "echo": True}, "echo"),
    ],
)
def test_invalid_requests_get_400_json(server, body, param):
    url, _ = server
    r = _post(url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param or param in err["message"]
    assert "Traceback" not in r.text


def test_malformed_json_auth_and_unknown_model(server):
    url, _ = server
    r = _post(url, "/v1/completions", b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = _post(url, "/v1/completions", {"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    r = _post(url, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert r.status_code == 404 and "tiny" in r.json()["error"]["message"]


def test_concurrent_batched_requests_match_unbatched_greedy(server):
    url, lm = server
    cases = [
        ("The for statement", 10, []),
        ("Classes provide a means", 4, []),
        ("The while loop", 12, [" the"]),
        ("Exceptions", 7, ["e"]),
        ("A module is a file", 9, []),
    ]

    async def go():
        async with httpx.AsyncClient(timeout=60, headers=HDR) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": "tiny", "prompt": p, "max_tokens": n, "stop": s, "temperature": 0},
                    )
                    for p, n, s in cases
                )
            )

    responses = asyncio.run(go())
    for (prompt, n, stop), r in zip(cases, responses, strict=True):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == _greedy_reference(lm, prompt, n, stop), prompt
        assert r.json()["usage"]["completion_tokens"] <= n


def test_full_queue_answers_503_with_retry_after(server):
    url, _ = server

    async def flood():
        async with httpx.AsyncClient(timeout=60, headers=HDR) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/completions",
                        json={"model": "tiny", "prompt": f"Load {i}", "max_tokens": 64, "temperature": 0},
                    )
                    for i in range(16)
                )
            )

    codes = [r.status_code for r in asyncio.run(flood())]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    r503 = next(r for r in asyncio.run(flood()) if r.status_code == 503)
    assert r503.headers["retry-after"] == "1" and r503.json()["error"]["code"] == "queue_full"


def test_generation_past_the_timeout_answers_504(server, model_dirs):
    from ray import serve

    url, _ = server
    lm, _ = model_dirs
    base = start_server(
        {"tiny": str(lm)},
        DEFAULT_CONFIG,
        port=int(url.rsplit(":", 1)[1]),
        host="127.0.0.1",
        name="slow",
        route_prefix="/slow",
        overrides={"quantize": "none", "request_timeout_s": 0.05, "max_context": 128},
        deployment_overrides={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
    )
    try:
        r = _post(base, "/v1/completions", {"model": "tiny", "prompt": "Slow", "max_tokens": 64})
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "Traceback" not in r.text
    finally:
        serve.delete("slow")


# --------------------------------------------------------------------------- scaling and faults


def _replicas(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments["BloomServer"]
    return dict(status.replica_states)


def _replica_pids(app: str) -> list[int]:
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(f"ray::ServeReplica:{app}:BloomServer"):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


async def _request_with_retries(
    client: httpx.AsyncClient, url: str, body: dict, attempts: int = 6
) -> httpx.Response:
    """The documented client policy: retry connection errors and 5xx, backoff 0.25 s doubling."""
    delay = 0.25
    for i in range(attempts):
        try:
            r = await client.post(url, json=body)
            if r.status_code < 500 or i == attempts - 1:
                return r
        except httpx.TransportError:
            if i == attempts - 1:
                raise
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def auto_app(server, model_dirs):
    lm, _ = model_dirs
    url, _ = server
    base = start_server(
        {"tiny": str(lm)},
        DEFAULT_CONFIG,
        port=int(url.rsplit(":", 1)[1]),
        host="127.0.0.1",
        name="auto",
        route_prefix="/auto",
        overrides={"quantize": "none", "max_queue": 64, "max_batch_size": 4, "max_context": 128},
        deployment_overrides={
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0.5,
                "downscale_delay_s": 3,
                "metrics_interval_s": 0.5,
                "look_back_period_s": 1,
            },
            "max_ongoing_requests": 8,
            "max_queued_requests": 64,
        },
    )
    return base


def _load(url: str, seconds: float, until=None, clients: int = 6) -> list[httpx.Response]:
    """Bounded concurrent load on loopback: ``clients`` loops, at most ``seconds`` long."""

    async def one(client, stop_at, out):
        while time.time() < stop_at and not (until and until()):
            out.append(
                await _request_with_retries(
                    client, f"{url}/v1/completions", {"model": "tiny", "prompt": "Load", "max_tokens": 32}
                )
            )

    async def go():
        out: list[httpx.Response] = []
        async with httpx.AsyncClient(timeout=60, headers=HDR) as client:
            stop_at = time.time() + seconds
            await asyncio.gather(*(one(client, stop_at, out) for _ in range(clients)))
        return out

    return asyncio.run(go())


def test_autoscaling_up_under_load_and_back_down(auto_app):
    peak = {"n": 1}

    def scaled() -> bool:
        peak["n"] = max(peak["n"], _replicas("auto").get("RUNNING", 0))
        return peak["n"] >= 2

    responses = _load(auto_app, seconds=60, until=scaled)
    assert peak["n"] >= 2, "no upscale under sustained load"
    assert all(r.status_code == 200 for r in responses)
    deadline = time.time() + 60
    while time.time() < deadline and _replicas("auto").get("RUNNING", 0) > 1:
        time.sleep(1)
    assert _replicas("auto").get("RUNNING", 0) == 1, "replicas did not come back down after the load"


def test_sigkill_replica_under_load_loses_no_request(auto_app):
    pids = _replica_pids("auto")
    assert pids
    victim = pids[0]

    def kill_soon() -> bool:
        if psutil.pid_exists(victim) and time.time() > kill_soon.at:
            os.kill(victim, signal.SIGKILL)
        return False

    kill_soon.at = time.time() + 2
    responses = _load(auto_app, seconds=12, until=kill_soon, clients=4)
    assert not psutil.pid_exists(victim)
    assert responses and all(r.status_code == 200 for r in responses), [r.status_code for r in responses]
    deadline = time.time() + 60
    while time.time() < deadline and not (
        _replicas("auto").get("RUNNING", 0) >= 1
        and victim not in _replica_pids("auto")
        and _replica_pids("auto")
    ):
        time.sleep(1)
    assert _replica_pids("auto") and victim not in _replica_pids("auto"), (
        "the killed replica was not replaced"
    )
