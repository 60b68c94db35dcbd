"""`python -m runtime chat`: one-shot, --json, and the multi-turn REPL over stdin."""
import json
import os
import subprocess
import sys


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(args, stdin=None):
    return subprocess.run([sys.executable, "-m", "runtime", "chat", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_one_shot_json(tiny_safe):
    r = _run(["hello", "--model", str(tiny_safe), "--json", "--max-tokens", "8", "--every", "2"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"text", "refused", "safety", "usage", "finish_reason"}
    assert d["safety"]["enabled"] and d["safety"]["checks"] >= 2
    assert d["usage"]["prompt_tokens"] > 0 and d["usage"]["completion_tokens"] <= 8
    assert d["safety"]["trace"][0][0] == 0  # the prompt itself is checked first


def test_repl_keeps_history(tiny_safe):
    r = _run(["--model", str(tiny_safe), "--json", "--max-tokens", "4"], stdin="first\nsecond\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(turns) == 2
    assert turns[1]["usage"]["prompt_tokens"] > turns[0]["usage"]["prompt_tokens"] + 4  # history included


def test_bad_model_path_is_a_clear_error(tmp_path):
    r = _run(["hello", "--model", str(tmp_path / "missing.gguf")])
    assert r.returncode == 2
    assert "error: model file not found" in r.stderr and "Traceback" not in r.stderr


def test_unsafe_model_needs_explicit_no_safety(tiny_base):
    r = _run(["hello", "--model", str(tiny_base)])
    assert r.returncode == 2 and "no safety metadata" in r.stderr
    r = _run(["hello", "--model", str(tiny_base), "--no-safety", "--max-tokens", "3", "--json"])
    assert r.returncode == 0 and not json.loads(r.stdout)["safety"]["enabled"]


def test_thresholds_from_the_command_line(tiny_safe):
    # "never": only the prompt is checked; a bad threshold is a clear error, not a traceback
    r = _run(["hello", "--model", str(tiny_safe), "--json", "--max-tokens", "8", "--every", "2",
              "--threshold", "0.999999", "--answer-threshold", "never"])
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["safety"]
    assert s["checks"] == 1 and s["trace"][0][0] == 0 and s["threshold"] == 0.999999
    assert s["answer_threshold"] == "inf" and "Infinity" not in r.stdout
    r = _run(["hello", "--model", str(tiny_safe), "--threshold", "1.5"])
    assert r.returncode == 2 and "threshold" in r.stderr and "Traceback" not in r.stderr


def test_version_and_built_models(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime", "--version"], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("safechat ") and "llama-cpp-python" in r.stdout
    models = tmp_path / "models"
    models.mkdir()
    (models / "SmolLM2-135M-Instruct-safe-000000000000-F16.gguf").write_bytes(b"old")
    (models / "mine.gguf").write_bytes(b"x")
    env = {**ENV, "SAFECHAT_CACHE": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "runtime", "models", *a], capture_output=True,
                                    text=True, env=env, timeout=60)
    r = run()
    assert r.returncode == 0 and "2 built model file(s)" in r.stdout and "is built on the first chat" in r.stdout
    r = run("prune")  # an older default goes, a file of the user's stays
    assert "removed SmolLM2-135M-Instruct-safe-000000000000-F16.gguf" in r.stdout and (models / "mine.gguf").exists()
    r = run("rm", "mine.gguf")
    assert r.returncode == 0 and not (models / "mine.gguf").exists()
    r = run("rm", "nope.gguf")
    assert r.returncode == 2 and "no built model named 'nope.gguf'" in r.stderr


def test_output_goes_to_the_stream_current_at_the_call(tmp_path, monkeypatch, capsys):
    """`cmd_models`/`cmd_chat` write to sys.stdout as it is when called, not as it was when runtime.cli was first
    imported (a default argument bound at import sent a later caller's output past its capture)."""
    import io

    import runtime.cli as cli

    monkeypatch.setenv("SAFECHAT_CACHE", str(tmp_path))
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", swapped)
    assert cli.main(["models"]) == 0
    assert swapped.getvalue().strip()
