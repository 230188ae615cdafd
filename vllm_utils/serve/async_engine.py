"""One engine for many connections: a thread drives `LLMEngine.step()` while the event loop serves HTTP. Requests
are added and aborted from the event loop through a thread-safe queue, applied by the engine thread between steps
(the scheduler is only ever touched by that thread), and each request's new tokens flow back to its own asyncio
queue after every step. An aborted request (a client gone) leaves the engine at the next step boundary, its KV
blocks freed."""
import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from vllm_utils.engine.sequence import Sequence
from vllm_utils.errors import one_line
from vllm_utils.llm import LLM
from vllm_utils.multimodal.inputs import MultiModalInputs
from vllm_utils.sampling_params import SamplingParams


@dataclass(frozen=True)
class Prepared:
    """A prompt processed by the handler: its text (for the record), token ids and multimodal tensors."""

    prompt: str | None
    token_ids: list[int]
    mm_inputs: MultiModalInputs | None


@dataclass(frozen=True)
class Delta:
    """New tokens of one output (`choice`: its index in the response), or its end, or an engine failure."""

    choice: int
    token_ids: list[int]
    finished: bool
    error: str | None = None


@dataclass
class Generation:
    """What a handler holds of one HTTP request: its sequences (choice i = seqs[i]) and the queue of their deltas.
    A finished sequence is no longer touched by the engine thread, so the handler may read it."""

    seqs: list[Sequence]
    deltas: asyncio.Queue
    arrival: float  # when the server received the request (perf_counter)
    num_prompts: int = 1
    done: bool = False
    token_times: list[list[float]] = field(default_factory=list)  # per output: when the handler got each token


@dataclass
class _Tracked:
    generation: Generation
    publish: Callable[[Delta], None]
    sent: list[int] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, llm: LLM, on_step: Callable[["AsyncEngine"], None] = lambda engine: None) -> None:
        """`on_step(self)`: called on the engine thread after every step and every batch of adds/aborts (gauges)."""
        self.llm, self.engine = llm, llm.engine
        self.on_step = on_step
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.tracked: list[_Tracked] = []
        self.error: str | None = None  # set when a step failed: the engine serves no more
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="vllm_utils-engine", daemon=True)

    # ---- the event loop's side ------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Aborts what is in flight and ends the engine thread."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=60)

    @property
    def alive(self) -> bool:
        return self.error is None and self.thread.is_alive()

    async def submit(self, prompts: list[Prepared], params: SamplingParams, arrival: float) -> Generation:
        """Adds every prompt (`params.n` outputs each), all or none; a UserError of the engine's checks is raised
        here."""
        loop = asyncio.get_running_loop()
        added: asyncio.Future = loop.create_future()
        generation = Generation([], asyncio.Queue(), arrival, len(prompts))

        def publish(delta: Delta) -> None:
            loop.call_soon_threadsafe(generation.deltas.put_nowait, delta)

        def answer(error: BaseException | None) -> None:
            def settle() -> None:
                if added.done():
                    return
                if error is not None:
                    added.set_exception(error)
                else:
                    added.set_result(None)
            loop.call_soon_threadsafe(settle)

        self._command(("add", prompts, params, _Tracked(generation, publish), answer))
        try:
            await added
        except asyncio.CancelledError:  # the client left meanwhile: the abort follows the add in the queue
            self.abort(generation)
            raise
        return generation

    def abort(self, generation: Generation) -> None:
        """The request's unfinished sequences leave the engine (their blocks freed) at the next step boundary."""
        if not generation.done:
            generation.done = True
            self._command(("abort", generation))

    def _command(self, command: tuple) -> None:
        if not self.alive:
            raise RuntimeError(f"the engine stopped: {self.error or 'shut down'}")
        self.commands.put(command)
        self.wake.set()

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        engine, idle = self.engine, True
        try:
            if engine.device.type == "cuda":  # the current device is per thread
                import torch

                torch.cuda.set_device(engine.device)
            while True:
                self._apply_commands()
                if self.stopping:
                    break
                if not engine.has_unfinished():
                    if not idle:
                        engine.platform.idle()  # e.g. the CPU's whole thread team back while nothing runs
                        idle = True
                    self.wake.wait()
                    self.wake.clear()
                    continue
                idle = False
                engine.step()
                self._publish()
                self.on_step(self)
        except BaseException as e:  # a bug or out of memory: every waiting client is told, /health turns 503
            self.error = one_line(e) or f"{type(e).__name__}: {e}"
            import traceback

            traceback.print_exc()
        finally:
            self._abort_all()

    def _apply_commands(self) -> None:
        changed = False
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            changed = True
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])
        if changed:
            self.on_step(self)

    def _add(self, prompts: list[Prepared], params: SamplingParams, tracked: _Tracked, answer) -> None:
        seqs: list[Sequence] = []
        try:
            for p in prompts:
                seqs += self.engine.add_request(p.prompt, [], params, p.token_ids, p.mm_inputs)
        except Exception as e:
            self.engine.abort(seqs)
            answer(e)
            return
        tracked.generation.seqs = seqs
        tracked.generation.token_times = [[] for _ in seqs]
        tracked.sent = [0] * len(seqs)
        self.tracked.append(tracked)
        answer(None)

    def _abort(self, generation: Generation) -> None:
        for tracked in self.tracked:
            if tracked.generation is generation:
                self.engine.abort([s for s in generation.seqs if s.finish_reason is None])
                self.tracked.remove(tracked)
                return

    def _publish(self) -> None:
        """Each sequence's tokens since the last step (a copy), and whether it finished."""
        still = []
        for tracked in self.tracked:
            for i, seq in enumerate(tracked.generation.seqs):
                sent = tracked.sent[i]
                if sent < 0:  # its end was told
                    continue
                count, finished = seq.num_output_tokens, seq.finish_reason is not None
                if count > sent or finished:
                    tracked.publish(Delta(i, seq.output_token_ids[sent:count], finished))
                    tracked.sent[i] = -1 if finished else count
            if any(n >= 0 for n in tracked.sent):
                still.append(tracked)
        self.tracked = still

    def _abort_all(self) -> None:
        for tracked in self.tracked:
            self.engine.abort([s for s in tracked.generation.seqs if s.finish_reason is None])
            for i in range(len(tracked.generation.seqs)):
                tracked.publish(Delta(i, [], True, self.error or "the server is shutting down"))
        self.tracked = []
        while True:  # requests that were never added
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                command[4](RuntimeError(self.error or "the server is shutting down"))
        self.on_step(self)
