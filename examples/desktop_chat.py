"""Embedding the runtime in a desktop app: generation in a background thread, text streamed into
the UI, a Cancel button that stops generation (and frees the model) at the next piece.

    python examples/desktop_chat.py                     # a small Tk window (needs a display)
    python examples/desktop_chat.py --headless "Hi!"    # the same worker, printing instead of a window

The `ChatWorker` is UI-agnostic: the UI polls `worker.pieces` (a queue) from its own thread, which
is how Tk, Qt and most toolkits want cross-thread updates delivered.
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading

import runtime

DONE = object()


class ChatWorker:
    """Runs one streamed reply in a background thread; pieces arrive on `self.pieces`."""

    def __init__(self, model: runtime.Model):
        self.model = model
        self.pieces: queue.Queue = queue.Queue()
        self.reply: runtime.Reply | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, messages, **kwargs) -> None:
        self._cancel.clear()
        self._thread = threading.Thread(target=self._run, args=(messages, kwargs), daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    def _run(self, messages, kwargs) -> None:
        gen = self.model.chat(messages, stream=True, **kwargs)
        it = iter(gen)
        try:
            for piece in it:
                if self._cancel.is_set():
                    break
                self.pieces.put(piece)
        except Exception as e:  # show errors in the UI instead of losing them in a thread
            self.pieces.put(f"\n[error: {e}]")
        finally:
            it.close()  # releases the model's lock even when cancelled mid-reply
            self.reply = gen.reply
            self.pieces.put(DONE)


def headless(question: str, model_path: str | None, max_tokens: int, cancel_after: int | None) -> runtime.Reply | None:
    model = runtime.load(model_path)
    worker = ChatWorker(model)
    worker.start([{"role": "user", "content": question}], max_tokens=max_tokens)
    n = 0
    while (piece := worker.pieces.get()) is not DONE:
        print(piece, end="", flush=True)
        n += 1
        if cancel_after is not None and n >= cancel_after:
            worker.cancel()
    worker.join()
    r = worker.reply
    print()
    if r is None:
        print("[cancelled]")
    elif r.refused:
        print(f"[refused: {r.safety.reason}]")
    return r


def window(model_path: str | None) -> None:  # pragma: no cover - needs a display
    import tkinter as tk

    model = runtime.load(model_path)
    history: list[dict] = []
    root = tk.Tk()
    root.title(f"safechat - {model.path.name}")
    text = tk.Text(root, wrap="word", height=24, width=80)
    entry = tk.Entry(root, width=70)
    worker = ChatWorker(model)
    answer: list[str] = []

    def poll():
        try:
            while True:
                piece = worker.pieces.get_nowait()
                if piece is DONE:
                    r = worker.reply
                    if r is not None:
                        history.append({"role": "assistant", "content": r.text})
                        if r.refused:
                            text.insert("end", f"\n[refused: {r.safety.reason}]")
                    text.insert("end", "\n\n")
                    send.config(state="normal")
                    return
                answer.append(piece)
                text.insert("end", piece)
                text.see("end")
        except queue.Empty:
            pass
        root.after(30, poll)

    def on_send(_=None):
        q = entry.get().strip()
        if not q:
            return
        entry.delete(0, "end")
        history.append({"role": "user", "content": q})
        text.insert("end", f"> {q}\n")
        send.config(state="disabled")
        worker.start(list(history), max_tokens=256)
        root.after(30, poll)

    send = tk.Button(root, text="Send", command=on_send)
    cancel = tk.Button(root, text="Cancel", command=worker.cancel)
    text.pack(fill="both", expand=True)
    entry.pack(side="left", fill="x", expand=True)
    send.pack(side="left")
    cancel.pack(side="left")
    entry.bind("<Return>", on_send)
    root.mainloop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("question", nargs="?")
    ap.add_argument("--headless", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--cancel-after", type=int, default=None, help="headless: press Cancel after N pieces")
    a = ap.parse_args(argv)
    if a.headless:
        headless(a.question or "Hello!", a.model, a.max_tokens, a.cancel_after)
    else:
        window(a.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
