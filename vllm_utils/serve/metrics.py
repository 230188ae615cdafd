"""The server's Prometheus metrics, under vLLM's names where vLLM has them (so its dashboards read ours): requests
running and waiting, KV-cache use, and per request TTFT, TPOT, inter-token latency and end-to-end latency as
histograms, with token, request and prefix-cache counters. One registry per server (not the process-wide default)."""
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from vllm_utils.engine.sequence import Sequence

disable_created_metrics()  # no *_created series (vLLM leaves them out too)

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str, num_blocks: int) -> None:
        self.registry = registry = CollectorRegistry()
        label = {"labelnames": ["model_name"], "registry": registry}
        self.running = Gauge("vllm:num_requests_running", "Sequences in the running batch", **label)
        self.waiting = Gauge("vllm:num_requests_waiting", "Sequences waiting to be scheduled (or preempted)", **label)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of the KV-cache blocks in use (1 = all)", **label)
        self.blocks_used = Gauge("vllm_utils:kv_blocks_used", "KV-cache blocks in use", **label)
        self.blocks_total = Gauge("vllm_utils:kv_blocks_total", "KV-cache blocks in all", **label)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=TTFT_BUCKETS, **label)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (output tokens - 1)", buckets=TPOT_BUCKETS,
                              **label)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Between successive output tokens of a request",
                             buckets=TPOT_BUCKETS, **label)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "From the request's arrival to its last token",
                             buckets=E2E_BUCKETS, **label)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", **label)
        self.generation_tokens = Counter("vllm:generation_tokens", "Output tokens of finished requests", **label)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason",
                               labelnames=["model_name", "finished_reason"], registry=registry)
        self.aborted = Counter("vllm_utils:request_aborted", "Requests whose client left before the end", **label)
        self.preemptions = Gauge("vllm:num_preemptions", "Preemptions since the server started", **label)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      **label)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", **label)
        self._prefix_seen = (0, 0)  # the scheduler's counts at the last update
        self.name = model_name
        for metric in (self.running, self.waiting, self.kv_usage, self.blocks_used, self.blocks_total, self.ttft,
                       self.tpot, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens, self.aborted,
                       self.preemptions, self.prefix_queries, self.prefix_hits):
            metric.labels(model_name)  # present (at 0) from the start
        self.blocks_total.labels(model_name).set(num_blocks)

    def engine_state(self, scheduler, block_manager) -> None:
        """After every step (on the engine thread)."""
        name = self.name
        self.running.labels(name).set(len(scheduler.running))
        self.waiting.labels(name).set(len(scheduler.waiting))
        self.blocks_used.labels(name).set(block_manager.num_used)
        self.kv_usage.labels(name).set(block_manager.num_used / max(block_manager.num_blocks, 1))
        self.preemptions.labels(name).set(scheduler.num_preemptions)
        queries, hits = scheduler.prefix_queries, scheduler.prefix_hits
        self.prefix_queries.labels(name).inc(max(0, queries - self._prefix_seen[0]))
        self.prefix_hits.labels(name).inc(max(0, hits - self._prefix_seen[1]))
        self._prefix_seen = (queries, hits)

    def finished(self, seq: Sequence, arrival: float, times: list[float]) -> None:
        """A finished output (the first of its request's n): `times`, when its request's handler got each token,
        counted from the request's arrival at the server (as vLLM's frontend times them: what a client sees, less
        the network)."""
        name = self.name
        self.prompt_tokens.labels(name).inc(seq.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(seq.num_output_tokens)
        self.success.labels(name, seq.finish_reason).inc()
        if not times:
            return
        self.ttft.labels(name).observe(times[0] - arrival)
        self.e2e.labels(name).observe(times[-1] - arrival)
        if len(times) > 1:
            self.tpot.labels(name).observe((times[-1] - times[0]) / (len(times) - 1))
            for gap in np.diff(times):
                self.itl.labels(name).observe(float(gap))

    def abort(self) -> None:
        self.aborted.labels(self.name).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
