"""Request bodies, serve options, API keys and model-dir checks: no Ray, no engine."""

from __future__ import annotations

import importlib
import json
import stat

import pytest
import torch
from pydantic import ValidationError

from bloomray.config import ConfigError
from bloomray.serving.auth import check_key, load_keys, write_key_file
from bloomray.serving.engines import inspect_model_dir
from bloomray.serving.options import ServeOptions
from bloomray.serving.schema import ChatRequest, CompletionRequest, validation_error


def _error(body: dict, schema=CompletionRequest):
    with pytest.raises(ValidationError) as info:
        schema.model_validate(body)
    return validation_error(info.value)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "seed": 2**63}, "seed"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": ["a", ""]}, "prompt"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
    ],
)
def test_out_of_range_fields_are_named(body, param):
    err = _error(body)
    assert err.status == 400 and err.param == param and param in err.message


def test_missing_and_chat_fields():
    assert _error({"max_tokens": 3}).message == "missing required argument: prompt"
    err = _error({"messages": [{"role": "tool", "content": "x"}]}, ChatRequest)
    assert err.param == "messages.0.role"
    chat = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7, "max_tokens": 3}
    )
    assert chat.sampling()["max_tokens"] == 7 and "max_completion_tokens" not in chat.sampling()


def test_sampling_leaves_unset_fields_to_the_engine():
    req = CompletionRequest.model_validate({"prompt": ["a", "b"], "seed": 3, "model": "m"})
    assert req.prompts() == ["a", "b"]
    fields = req.sampling()
    assert fields["seed"] == 3 and "model" not in fields and "logprobs" not in fields


def test_serve_options_name_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="did you mean 'max_queue'"):
        ServeOptions.from_args({"max_queu": 3})
    with pytest.raises(ConfigError, match="max_tokens_limit"):
        ServeOptions.from_args({"max_context": 128, "max_tokens_limit": 128})
    with pytest.raises(ConfigError, match="device"):
        ServeOptions.from_args({"device": "tpu"})
    with pytest.raises(ConfigError, match="stream_interval_ms must be >= 0"):
        ServeOptions.from_args({"stream_interval_ms": -1})
    assert ServeOptions.from_args({"max_n": 2}).max_n == 2


def test_auth_scheme_case_insensitive_and_constant_keys():
    assert (
        check_key("Bearer k1", ["k0", "k1"])
        and check_key("bearer k1", ["k1"])
        and check_key("BEARER  k1 ", ["k1"])
    )
    assert (
        not check_key("Basic k1", ["k1"]) and not check_key("Bearer", ["k1"]) and not check_key(None, ["k1"])
    )
    assert not check_key("Bearer k2", ["k1"])


def test_key_file_is_private_and_skips_comments(tmp_path, monkeypatch):
    path = write_key_file(tmp_path / "d" / "keys", ["# ops team", "", "  k1  ", "k2"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob(".keys.*")), "no temp file left behind"
    monkeypatch.delenv("BLOOMRAY_API_KEYS", raising=False)
    monkeypatch.setenv("BLOOMRAY_API_KEYS_FILE", str(path))
    assert load_keys() == ["k1", "k2"]


def test_inspect_model_dir_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        inspect_model_dir("m", str(tmp_path))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        inspect_model_dir("m", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "n_head": 4}))
    with pytest.raises(ConfigError, match="no tokenizer"):
        inspect_model_dir("m", str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weights"):
        inspect_model_dir("m", str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        inspect_model_dir("m", str(tmp_path))


def test_cpu_engine_refuses_a_head_size_vllm_cannot_run(tmp_path):
    from tiny_bloom import make_model

    from bloomray.serving.engines import inspect_model_dir, llm_deployment

    make_model().save_pretrained(tmp_path)  # hidden 64 / 4 heads: head size 16
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match="head size 16"):
        llm_deployment(
            "m", inspect_model_dir("m", str(tmp_path)), ServeOptions(device="cpu", quantize="w8a8")
        )
    assert not (tmp_path / "vllm-w8a8").exists(), "no int8 copy written before the check"


def test_cpu_engine_gets_its_cores_threads_and_one_process_engine_class(tmp_path):
    """The replica's env: OpenMP threads = the engine's CPUs (Ray would set 1 in a replica that
    asks for no CPUs, and the engine core inherits it), bound to those cores, and bloomray's
    engine class (the model in the engine core, no executor worker process)."""
    from safetensors.torch import save_file

    from bloomray.serving.engines import ENGINE_CLS_ENV, llm_deployment

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 96, "n_head": 3}))  # head size 32
    (tmp_path / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    app = llm_deployment(
        "m", inspect_model_dir("m", str(tmp_path)), ServeOptions(device="cpu", cpus_per_engine=3)
    )
    env = app._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env["OMP_NUM_THREADS"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-2"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # no spinning on cores shared with Serve's processes
    assert {k: env[k] for k in ENGINE_CLS_ENV} == ENGINE_CLS_ENV
    config = app._bound_deployment.init_kwargs["llm_config"]
    assert config.experimental_configs["stream_batching_interval_ms"] == 100.0  # the default option
    assert app._bound_deployment.func_or_class.__name__ == "EngineServer"  # first chunk at once
    module, cls = ENGINE_CLS_ENV["RAYLLM_VLLM_ENGINE_CLS"].split(":")
    assert getattr(importlib.import_module(module), cls).__name__ == cls  # the path imports


@pytest.mark.parametrize("local", [True, False])
def test_engine_callback_skips_node_init_only_for_a_local_dir(tmp_path, local):
    """The deployments' Ray Serve LLM callback: a local model dir runs no download task per
    node at replica start; a hub name (or a path that does not exist here) keeps it."""
    import asyncio

    from ray.serve.llm import LLMConfig

    from bloomray.serving.engines import ENGINE_CALLBACK

    source = str(tmp_path) if local else "bigscience/bloom-560m"
    config = LLMConfig(
        model_loading_config={"model_id": "m", "model_source": source},
        callback_config={"callback_class": ENGINE_CALLBACK},
    )
    callback = config.get_or_create_callback()
    assert type(callback).__name__ == ENGINE_CALLBACK.split(":")[1]
    asyncio.run(callback.run_callback("on_before_node_init"))
    assert callback.ctx.run_init_node is (not local)
