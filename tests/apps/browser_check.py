#!/usr/bin/env python3
"""Drives eqat serve's page in headless Chromium the way a person would (run by tests/apps/serve_http_test.cpp).

usage: browser_check.py CHROMIUM URL QUESTION [--compare] [--demo N] [--screenshot OUT.png]

Opens URL, clicks the first (or the N-th, from 0) demo image, types QUESTION, clicks Ask, waits for the streamed answer(s), and prints
one line per answer panel: "answer[i]: MODEL | TEXT | STATS". With --screenshot, saves the page as PNG.
Talks to Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: fds 3 and 4, NUL-terminated
JSON), so it needs only the Python standard library.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time


class Browser:
    def __init__(self, chromium, width=1200, height=760):
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)  # chromium may still be writing
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()

        # TMPDIR: Chromium's own temp files land in the profile directory, removed with it.
        def fds():  # the child's fd 3 reads our commands, fd 4 writes its replies
            r, w = os.dup(to_child_r), os.dup(from_child_w)  # above 4, so the dup2s below cannot clobber them
            os.dup2(r, 3)  # dup2 makes them inheritable (os.pipe's fds are close-on-exec)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=fds, close_fds=False, env={**os.environ, "TMPDIR": self.profile.name},
            stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("EQAT_BROWSER_LOG") else open(os.path.join(self.profile.name, "stderr"), "w"))
        os.close(to_child_r)
        os.close(from_child_w)
        self.next_id = 0
        self.buf = b""
        self.session = None

    def call(self, method, params=None, session=True):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.to_child, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", {"url": url})

    def js(self, expr):
        r = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr, timeout, what):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                if self.js(expr):
                    return
            except RuntimeError:
                pass  # the page is still loading
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def main():
    chromium, url, question = sys.argv[1:4]
    compare = "--compare" in sys.argv
    shot = sys.argv[sys.argv.index("--screenshot") + 1] if "--screenshot" in sys.argv else None
    demo = int(sys.argv[sys.argv.index("--demo") + 1]) if "--demo" in sys.argv else 0
    b = Browser(chromium)
    try:
        b.open(url)
        b.wait("document.querySelectorAll('#demos img').length > 0 && document.querySelector('#model1').options.length > 0",
               30, "the demo images and the model list")
        b.js(f"document.querySelectorAll('#demos img')[{demo}].click()")
        b.wait("!!document.querySelector('#drop img')", 30, "the picked image")
        b.js(f"document.getElementById('q').value = {json.dumps(question)}")
        if compare:
            b.js("document.getElementById('compare').click()")
        b.js("document.getElementById('ask').click()")
        panels = 2 if compare else 1
        b.wait(f"Number(document.body.dataset.answered || 0) >= {panels}", 120, "the streamed answers")
        answers = b.js("[...document.querySelectorAll('.answer')].map(p => [p.querySelector('h2 span').textContent, "
                       "p.querySelector('.text').textContent, p.querySelector('small').textContent])")
        for i, (model, text, stats) in enumerate(answers):
            print(f"answer[{i}]: {model} | {text} | {stats}")
        if shot:
            data = b.call("Page.captureScreenshot", {"format": "png"})["data"]
            with open(shot, "wb") as f:
                f.write(base64.b64decode(data))
    finally:
        b.close()


if __name__ == "__main__":
    main()
