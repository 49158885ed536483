"""Pipeline jobs run in worker processes, so a job can crash without the node that receives images.

A native crash in a codec or a model runtime, or the kernel's OOM killer
choosing the process that holds a 600-slice volume, used to take the whole
node down: receiving, completion and dispatch with it. Each of the
`inference.workers` slots now owns one child process (started with `spawn`
when the node starts, kept between jobs so the models stay loaded) and talks
to it over a pipe. When the child dies mid-job the pipe breaks, the slot reports WorkerDied with
the child's exit status and starts a fresh child for the next job; the node
keeps running. A child acknowledges each job as it takes it, so one that died
while idle is replaced without the next job being blamed for it. A child
watches its parent and exits when the node is gone, so a node killed with -9
leaves no orphan writing results behind its restarted self.

The same slots run the inference API's requests (dicom_node.pipeline.infer): a
slot goes to whoever asked first, job or request, so a run of requests cannot
starve the jobs of received series (the API also caps how many requests wait,
dicom_node.ops.infer_api). A child's log lines also travel up its pipe into the
node's recent lines (`GET /logs`, dicom_node.logs.RecentLines).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait

from dicom_node import logs
from dicom_node.config import Config
from dicom_node.pipeline.infer import InferOutput, InferRequest
from dicom_node.pipeline.job import JobOutput, JobRequest
from dicom_node.pipeline.volume import SeriesGeometryError

log = logging.getLogger(__name__)

PARENT_CHECK_S = 0.2
START_TIMEOUT_S = 120  # a fresh worker imports numpy, pydicom, ONNX Runtime... before it takes its first job
_CONTEXT = multiprocessing.get_context("spawn")


class _Gone(Exception):
    """The worker process ended (or stopped answering)."""


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user's process
        return False
    return True


class WorkerDied(Exception):
    """The job's worker process ended before answering (native crash, killed, out of memory)."""


class JobError(Exception):
    """The job raised in its worker; `kind` is the exception's class name, the message its text, and
    `series_unusable` says the series itself cannot give a volume (a SeriesGeometryError: the series is
    quarantined, no retry of the job would help)."""

    def __init__(self, kind: str, message: str, details: str, series_unusable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.details = details
        self.series_unusable = series_unusable


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown (reaped elsewhere)"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(70)
        time.sleep(PARENT_CHECK_S)


class _PipeLines(logging.Handler):
    """Sends each formatted log line of the worker up its pipe as ("log", line); `send` shares its lock,
    since a multiprocessing Connection is not safe to write from two threads."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self.connection = connection
        self.guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(("log", self.format(record)))
        except (OSError, ValueError):
            pass  # the node is gone; the watcher thread ends this process

    def send(self, message: tuple) -> None:
        with self.guard:
            self.connection.send(message)


def _child_main(connection: Connection, parent_pid: int, log_format: str, config: Config) -> None:
    """A worker's life: answer JobRequests and InferRequests until the node closes the pipe."""
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-node", daemon=True).start()
    for stop in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and systemd signal the whole group; the node
        signal.signal(stop, signal.SIG_IGN)        # lets the running job finish, then closes the pipe
    logs.configure(log_format)
    pipe = _PipeLines(connection)
    pipe.setFormatter(logs.recent.formatter)
    pipe.addFilter(logs.ContextFilter())
    logging.getLogger().handlers[1:] = [pipe]  # stderr stays; the ring of this process would be unread
    from dicom_node.pipeline import infer, job
    job.preload(config)
    while True:
        try:
            request: JobRequest | InferRequest = connection.recv()
        except (EOFError, OSError):
            break
        pipe.send(("started",))  # so the node can tell a death during this job from one before it
        if isinstance(request, JobRequest):
            context = logs.series_context(request.study_instance_uid, request.job.series_instance_uid, request.job.id)
            produce = job.produce
        else:
            context, produce = logs.series_context(), infer.produce
        with context:
            try:
                answer = ("done", produce(request))
            except Exception as error:
                answer = ("error", type(error).__name__, str(error), traceback.format_exc(),
                          isinstance(error, SeriesGeometryError))
        pipe.send(answer)
    job.close_inference()


class _Slot:
    """One worker process and its pipe, started with the node (or on first use) and after a death."""

    def __init__(self, number: int, config: Config):
        self.number = number
        self.config = config
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None

    def start(self) -> None:
        ours, theirs = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_child_main, name=f"job-worker-{self.number}", daemon=True,
                                        args=(theirs, os.getpid(), logs.current_format(), self.config))
        self.process.start()
        theirs.close()
        self.connection = ours
        log.info("job worker %d started (pid %d)", self.number, self.process.pid)

    def _receive(self, timeout: float | None):
        """The worker's next message. Raises _Gone when the worker process ended (or did not answer
        within `timeout`): told by the pipe's EOF, the process sentinel or the pid being gone, since
        an event loop in this process (libev's, under gevent) may reap children before
        multiprocessing can, and a descendant may still hold the pipe open."""
        assert self.connection is not None and self.process is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = wait([self.connection, self.process.sentinel], timeout=1.0)
            if self.connection in ready:
                try:
                    message = self.connection.recv()
                except (EOFError, OSError):
                    raise _Gone from None
                if message[0] != "log":
                    return message
                logs.recent.add(message[1])
            elif ready or not _exists(self.process.pid):
                raise _Gone
            if deadline is not None and time.monotonic() > deadline:
                log.error("job worker %d (pid %d) did not answer within %.0f s; killing it", self.number,
                          self.process.pid, timeout)
                self.process.kill()
                raise _Gone

    def _hand_over(self, request: JobRequest) -> bool:
        """Give the job to the worker; False when the worker was already gone (it died between jobs)."""
        if self.process is None or not self.process.is_alive():
            self.close()
            self.start()
        assert self.connection is not None
        try:
            self.connection.send(request)
            return self._receive(timeout=START_TIMEOUT_S) == ("started",)
        except (_Gone, OSError):
            self.close()
            return False

    def run(self, request: JobRequest | InferRequest, timeout: float | None = None) -> JobOutput | InferOutput:
        if not self._hand_over(request) and not self._hand_over(request):  # a fresh worker gets a second go
            raise WorkerDied("two fresh job worker processes died before starting the job")
        assert self.process is not None
        try:
            answer = self._receive(timeout=timeout)
        except _Gone:
            self.process.join(10)
            code = self.process.exitcode
            self.close()
            raise WorkerDied(f"the job's worker process died: {describe_exit(code)}") from None
        if answer[0] == "error":
            _, kind, message, details, series_unusable = answer
            raise JobError(kind, message, details, series_unusable)
        return answer[1]

    def close(self, timeout: float = 10) -> None:
        if self.connection is not None:
            self.connection.close()  # the child's recv sees EOF and it exits
            self.connection = None
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)
            self.process = None


class _FirstComeSlots:
    """Free slots handed to waiting threads strictly in the order they asked (a queue.Queue lets a thread
    that asks just as a slot comes back take it before one that has waited longer)."""

    def __init__(self, slots: list[_Slot]) -> None:
        self._free = deque(slots)
        self._waiting: deque[tuple[threading.Event, list[_Slot]]] = deque()
        self._guard = threading.Lock()

    def take(self) -> _Slot:
        with self._guard:
            if self._free and not self._waiting:
                return self._free.popleft()
            turn: tuple[threading.Event, list[_Slot]] = (threading.Event(), [])
            self._waiting.append(turn)
        turn[0].wait()
        return turn[1][0]

    def give_back(self, slot: _Slot) -> None:
        with self._guard:
            if self._waiting:
                event, handed = self._waiting.popleft()
                handed.append(slot)
                event.set()
            else:
                self._free.append(slot)


class JobWorkers:
    """`inference.workers` worker slots; `run` blocks the calling thread until its job (or inference request)
    is done in a slot, taken first come, first served."""

    def __init__(self, config: Config):
        self._slots = [_Slot(number, config) for number in range(1, max(1, config.inference.workers) + 1)]
        self._free = _FirstComeSlots(self._slots)

    def start(self) -> None:
        """Start every slot's process now, while the node is idle: a worker imports numpy, pydicom,
        ONNX Runtime and the codecs and loads its models (2-3 s of CPU, dicom_node.pipeline.job.preload) before
        it can take a job, and the first study after a restart should not wait for that."""
        for slot in self._slots:
            slot.start()

    def run(self, request: JobRequest | InferRequest, timeout: float | None = None) -> JobOutput | InferOutput:
        """Run `request` in the next free slot; with `timeout`, a worker that has not answered by then is
        killed (WorkerDied) and replaced for the next request."""
        slot = self._free.take()
        try:
            return slot.run(request, timeout)
        finally:
            self._free.give_back(slot)

    def close(self) -> None:
        for slot in self._slots:
            slot.close()
