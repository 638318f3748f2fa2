"""The engine's metrics and the server's refusals as Prometheus text (`GET /metrics`)."""

from __future__ import annotations

_PROMETHEUS = [
    # (metric, engine key, type, help)
    ("jaxkv_requests_running", "running", "gauge", "Requests holding a row of the engine's steps."),
    ("jaxkv_requests_waiting", "waiting", "gauge", "Requests queued for a row or for KV pages."),
    ("jaxkv_kv_pages_used", "kv_pages_used", "gauge", "KV cache pages referenced by requests."),
    ("jaxkv_kv_pages_free", "kv_pages_free", "gauge", "KV cache pages free (including idle prefix-cache pages)."),
    ("jaxkv_kv_pages_total", "kv_pages_total", "gauge", "KV cache pages in the pool."),
    ("jaxkv_prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge",
     "Fraction of prompt tokens served from the prefix cache."),
    ("jaxkv_tokens_per_second", "tokens_per_s", "gauge", "Generated tokens per second over the last seconds."),
    ("jaxkv_prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens of admitted requests."),
    ("jaxkv_generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("jaxkv_compilations_total", "compilations", "counter", "XLA compilations by the engine."),
    ("jaxkv_engine_steps_total", "steps_total", "counter", "Engine steps (one device call each)."),
    ("jaxkv_engine_rows_per_step", "mean_rows_per_step", "gauge", "Mean requests in a step (decode rows and chunks)."),
    ("jaxkv_engine_tokens_per_step", "mean_tokens_per_step", "gauge", "Mean new tokens in a step."),
    ("jaxkv_prefix_cache_tokens_total", "cached_tokens_total", "counter",
     "Prompt tokens taken from the prefix cache instead of computed."),
    ("jaxkv_preemptions_total", "preemptions_total", "counter",
     "Requests sent back to the queue to free KV pages (recomputed later)."),
    ("jaxkv_engine_step_failures_total", "step_failures_total", "counter",
     "Device calls that failed; their requests were retried alone."),
    ("jaxkv_requests_failed_total", "requests_failed_total", "counter",
     "Requests ended by a device call that failed with them alone."),
    ("jaxkv_requests_timed_out_total", "requests_timed_out_total", "counter",
     "Requests ended at the server's deadline."),
    ("jaxkv_speculative_proposed_total", "speculative_proposed_total", "counter",
     "Tokens proposed by speculative decoding and verified in a step."),
    ("jaxkv_speculative_accepted_total", "speculative_accepted_total", "counter",
     "Proposed tokens the target kept (each saves a step)."),
    ("jaxkv_speculative_acceptance_rate", "speculative_acceptance_rate", "gauge",
     "Fraction of proposed tokens kept."),
    ("jaxkv_engine_step_errors_total", "step_errors", "counter",
     "Engine steps that raised outside a device call (every request in flight failed)."),
]


def prometheus_text(metrics: dict, rejected: dict[str, int] | None = None) -> str:
    """The engine's metrics, and requests refused with a 4xx by reason (the error code), as Prometheus text."""
    lines = []
    for name, key, kind, help_text in _PROMETHEUS:
        if key not in metrics:
            continue
        value = float(metrics[key])
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                  f"{name} {int(value) if value.is_integer() else repr(value)}"]
    if rejected is not None:
        lines += ["# HELP jaxkv_requests_rejected_total Requests refused with a 4xx, by reason (the error code).",
                  "# TYPE jaxkv_requests_rejected_total counter"]
        lines += [f'jaxkv_requests_rejected_total{{reason="{reason}"}} {n}' for reason, n in sorted(rejected.items())]
    return "\n".join(lines) + "\n"
