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
