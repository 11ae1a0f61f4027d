"""`asyncopd serve rollout|teacher` as a real process: any SGLang client can use it, SIGTERM ends it with 0, bad
arguments exit 2 before anything loads."""

import signal

import numpy as np
import pytest

from asyncopd.core.types import Rollout
from asyncopd.net.client import HttpClient, ServerError
from asyncopd.rollout.client import SGLangClient
from asyncopd.teacher.client import TeacherClient
from tests._serve_processes import run_serve, serving

pytestmark = pytest.mark.e2e
KEY = "serve-test-key"


def test_serve_rollout_answers_sglang_clients_and_exits_0_on_sigterm(tiny_artifacts, tmp_path):
    with serving("rollout", tiny_artifacts / "student", tmp_path, "--api-key", KEY) as (server,):
        assert HttpClient(server.url).get_json("/health") == {"status": "ok"}  # probes need no key, as SGLang's
        with pytest.raises(ServerError) as refused:
            SGLangClient(server.url).generate([[3, 4, 5]], max_new_tokens=2)
        assert refused.value.status == 401
        client = SGLangClient(server.url, api_key=KEY)
        out = client.generate([[3, 4, 5], [6, 7]], max_new_tokens=4, temperature=1.0, seed=[11, 12])
        assert all(1 <= len(r.response_ids) <= 4 and np.isfinite(r.logprobs).all() for r in out)
        raw = client.post_json("/generate", {"text": "1+1=", "sampling_params": {"max_new_tokens": 3,
                                                                                   "temperature": 0}})
        assert isinstance(raw["text"], str) and raw["meta_info"]["completion_tokens"] == len(raw["output_ids"])
        port = server.url.rsplit(":", 1)[1]
        taken = run_serve("rollout", tiny_artifacts / "student", "--port", port)
        assert taken.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr, taken.stderr
        assert server.stop() == 0
        assert "SIGTERM, shutting down" in server.output()


def test_serve_teacher_scores_through_the_teacher_client_and_exits_0_on_sigterm(tiny_artifacts, tmp_path):
    with serving("teacher", tiny_artifacts / "teacher", tmp_path) as (server,):
        prompt, response = np.array([3, 4, 5], np.int32), np.array([6, 7], np.int32)
        rollout = Rollout(prompt_ids=prompt, response_ids=response, logprobs=np.zeros(2, np.float32),
                          version_start=0, version_end=0, finish_reason="stop")
        (scores,) = TeacherClient(server.url, check_scores=False).score([rollout], top_k=3)
        assert scores.topk_ids.shape == (2, 3) and np.isfinite(scores.token_logprob).all()
        assert (scores.token_logprob <= 0).all()
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C stops it as cleanly
        assert server.stop() == 0
        assert "SIGINT, shutting down" in server.output()


@pytest.mark.parametrize("args,message", [
    (("--host", "0.0.0.0"), "refusing to listen on '0.0.0.0' without an API key"),
    (("--port", "70000"), "--port: must be in [0, 65535]"),
    (("--threads", "0"), "--threads: must be >= 1"),
])
def test_serve_bad_arguments_exit_2_naming_them(tiny_artifacts, args, message):
    done = run_serve("rollout", tiny_artifacts / "student", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_serve_missing_checkpoint_exits_2(tmp_path):
    done = run_serve("teacher", tmp_path / "nothing")
    assert done.returncode == 2, done.stderr
    assert "--model-path=" in done.stderr and "directory does not exist" in done.stderr


def test_a_slime_style_client_runs_against_asyncopd_serve_rollout(tiny_artifacts, tmp_path):
    """What slime's rollout does, over raw HTTP as it does it: wait on /health_generate, send text with stop strings
    and read the decoded text back, abort a request in flight by its rid (/abort_request) and keep its partial
    output with logprobs, as slime's partial rollouts and AReaL index it."""
    import threading
    import time

    with serving("rollout", tiny_artifacts / "student", tmp_path) as (server,):
        http = HttpClient(server.url, timeout_s=120)
        http.request("GET", "/health_generate")  # slime's start-up wait: a one-token generation answered 200
        stop = ";"  # the task's step separator: generation ends at the first one and SGLang trims it from text
        out = http.post_json("/generate", {"text": "Q:12+5=", "sampling_params": {
            "max_new_tokens": 24, "temperature": 0, "stop": [stop]}, "return_logprob": True})
        assert stop not in out["text"] and out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
        assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])
        # a long request, aborted by rid while it runs: finish_reason abort, partial output and its logprobs kept.
        # Held mid-generation by an in-place pause (as slime pauses around weight updates) so the abort lands on a
        # running request whatever the machine's speed.
        answer: dict = {}
        body = {"text": "Q:12+5=", "rid": "slime-abort-1", "return_logprob": True,
                "sampling_params": {"max_new_tokens": 120, "temperature": 1.0, "ignore_eos": True}}
        worker = threading.Thread(target=lambda: answer.update(http.post_json("/generate", body)))
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the request is running on the engine
            loads = http.get_json("/v1/loads")
            if "slime-abort-1" in str(loads) or _running(loads):
                break
            time.sleep(0.05)
        http.post_json("/pause_generation", {"mode": "in_place"})
        http.post_json("/abort_request", {"rid": "slime-abort-1"})
        http.post_json("/continue_generation", {})
        worker.join(120)
        meta = answer["meta_info"]
        assert meta["finish_reason"]["type"] == "abort"
        assert 0 < len(answer["output_ids"]) < 120
        assert len(meta["output_token_logprobs"]) == len(answer["output_ids"]) and isinstance(answer["text"], str)


def _running(loads) -> bool:
    """Whether /v1/loads reports a request running (its shape: SGLang's, a dict or a list of per-rank dicts)."""
    rows = loads if isinstance(loads, list) else loads.get("loads", [loads]) if isinstance(loads, dict) else []
    return any(isinstance(r, dict) and (r.get("num_running_reqs") or 0) > 0 for r in rows)
