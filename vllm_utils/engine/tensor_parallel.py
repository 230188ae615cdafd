"""Tensor parallelism: N processes, one per rank, over torch.distributed (NCCL on CUDA, gloo on CPU).
Rank 0 is the engine's own process: it schedules and samples. Ranks 1..N-1 are spawned workers that
build their shard of the model and execute every step rank 0 sends them (over a gloo group)."""
import atexit
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_utils.config import ResolvedConfig
from vllm_utils.errors import UserError, one_line
from vllm_utils.platforms import platform_for


def init_group(rank: int, size: int, store_path: str, device: torch.device) -> dist.ProcessGroup:
    """Joins the default group (for the model's collectives) on this rank's device and returns a gloo group
    for control."""
    platform = platform_for(device)
    platform.configure_rank(device, size)
    dist.init_process_group(platform.dist_backend, init_method=f"file://{store_path}", rank=rank, world_size=size)
    return dist.new_group(backend="gloo")


def _error_note(store_dir: str, rank: int) -> str:
    """Where a worker leaves the one-line error it stopped with, for rank 0 to report."""
    return os.path.join(store_dir, f"rank{rank}.error")


class WorkerChannel:
    """Rank 0's end: sends each step's host inputs to the other ranks, and stops them at exit."""

    def __init__(self, group: dist.ProcessGroup, processes: list, store_dir: str) -> None:
        self.group, self.processes, self.store_dir = group, processes, store_dir
        # True only while the workers wait for our next message: not while they build their model or run a
        # step, where they wait in collectives that a message would deadlock
        self.listening = False
        atexit.register(self.close)  # before multiprocessing's own exit handler kills the daemons

    def send(self, message: object) -> None:
        self.listening = False
        dist.broadcast_object_list([message], src=0, group=self.group)

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Around work every rank does together (building the model, a step): when it is done the workers
        listen again; when rank 0 fails in it because a worker stopped, raises that worker's error."""
        try:
            yield
            self.listening = True
        except Exception as error:
            if one_line(error) is not None:  # rank 0's own, and one line already
                raise
            why = self._stopped_worker()
            if why is None:
                raise
            raise UserError(why) from None

    def _stopped_worker(self, wait_s: float = 2.0) -> str | None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for rank, process in enumerate(self.processes, start=1):
                if process.exitcode is not None:
                    note = _error_note(self.store_dir, rank)
                    if os.path.exists(note):
                        with open(note) as f:
                            return f.read()
                    return f"tensor-parallel rank {rank} stopped (exit status {process.exitcode}; its output is above)"
            time.sleep(0.05)
        return None

    def close(self) -> None:
        """Lets listening workers exit cleanly; otherwise (a failed start, an interrupted step) ends them."""
        if self.processes and self.listening and all(p.exitcode is None for p in self.processes):
            self.send(None)
            for p in self.processes:
                p.join(timeout=30)
        _end(self.processes)
        self.processes = []
        if dist.is_initialized():  # so that this process can start another group
            dist.destroy_process_group()
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _end(processes: list) -> None:
    for p in processes:
        if p.exitcode is None:
            p.terminate()
            p.join(timeout=5)


def start_workers(config: ResolvedConfig) -> WorkerChannel:
    """Spawns ranks 1..N-1 and joins rank 0 to the group."""
    size = config.engine.tensor_parallel_size
    store_dir = tempfile.mkdtemp(prefix="vllm_utils_tp_")
    store_path = os.path.join(store_dir, "store")
    context = mp.get_context("spawn")
    processes = []
    # Workers are born ignoring Ctrl-C (a spawned Python keeps an ignored SIGINT ignored): it is rank 0's to
    # handle, and a worker that died of it would leave rank 0 waiting for it in a collective.
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for rank in range(1, size):
            p = context.Process(target=_worker_main, daemon=True, args=(rank, size, store_path, config))
            p.start()
            processes.append(p)
    finally:
        signal.signal(signal.SIGINT, handler)
    try:
        group = _join_while_alive(processes, lambda: init_group(0, size, store_path, rank_device(config, 0)))
    except BaseException:
        _end(processes)
        shutil.rmtree(store_dir, ignore_errors=True)
        raise
    return WorkerChannel(group, processes, store_dir)


def _join_while_alive(processes: list, join) -> dist.ProcessGroup:
    """Rank 0 joins the group while its workers start; a worker that dies before joining (a crash at import, a
    kill) ends the wait at once, where the group's rendezvous would wait for it for half an hour."""
    outcome: dict = {}

    def joining() -> None:
        try:
            outcome["group"] = join()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=joining, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        dead = [p for p in processes if p.exitcode is not None]
        if dead and thread.is_alive():
            raise UserError(f"tensor-parallel worker {processes.index(dead[0]) + 1} exited (code "
                            f"{dead[0].exitcode}) before joining the group; its error is printed above")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["group"]


def rank_device(config: ResolvedConfig, rank: int) -> torch.device:
    return platform_for(config.device).rank_device(config.device, rank)


def _worker_main(rank: int, size: int, store_path: str, config: ResolvedConfig) -> None:
    from tqdm import tqdm

    from vllm_utils.engine.model_runner import ModelRunner

    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a semaphore that a killed worker would leak
    group = init_group(rank, size, store_path, rank_device(config, rank))
    try:
        runner = ModelRunner(config, rank_device(config, rank), control_group=group)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=group)
            if message[0] is None:
                break
            runner.execute(message[0])
    except Exception as error:
        why = one_line(error)
        if why is None:
            raise  # a bug: multiprocessing prints its traceback
        try:
            with open(_error_note(os.path.dirname(store_path), rank), "w") as f:
                f.write(why)  # for rank 0 to say, once
        except OSError:
            pass  # rank 0 has already stopped (it met the same error) and removed the folder
        sys.exit(1)
    dist.destroy_process_group()
