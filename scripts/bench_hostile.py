"""What a hostile client costs everyone else: the real server (SmolLM2, CPU) on 127.0.0.1, before and after.

    .venv/bin/python scripts/bench_hostile.py [--repeats 5] [--out docs/results/hostile.md]

1. A 3-token request's latency alone, then while another client sends a 20 MB prompt (refused with 413
   before it is read, where it once blocked the event loop for 11 s).
2. A 400-token greedy completion with the most stop strings a request may have (16 of 512 characters,
   built never to match but to keep every matcher busy), against the same completion without stops.
3. The stop matching of (2) and of the request that once took 58 s (500 stop strings of 3,000 characters,
   400 tokens), in-process: jaxkv's TextStream against the literal method it replaced (decode all ids,
   find every stop, test every suffix of the text against every stop), on the same token ids.
Medians of --repeats runs after a warm-up run; ratios against the peer in the same run.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


class LiteralStops:
    """The method TextStream replaced: every token decodes all ids and scans the whole text (peer of (3))."""

    def __init__(self, decode, stop):
        self.decode, self.stop, self.ids, self.sent = decode, stop, [], 0

    def add(self, ids) -> str:
        self.ids += ids
        text = self.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[self.sent:min(hits)]
        held = max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if s.startswith(text[-n:])), default=0)
        delta = text[self.sent:len(text) - held]
        self.sent += len(delta)
        return delta


def adversarial_stops(text: str, count: int, length: int) -> list[str]:
    """Stops that share a long prefix with the text's own repeated ending but never match."""
    tail = (text * (length // max(1, len(text)) + 1))[:length - 1]
    return [tail[:length - 1 - i] + "\x00" for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--out", default=str(ROOT / "docs/results/hostile.md"))
    args = parser.parse_args()

    import httpx

    import jaxkv
    from bench_decode import time_runs as timed  # median of repeats, after one warm-up run
    from bench_serve import start_server
    from jaxkv.generate.detokenize import TextStream
    from jaxkv.serve.server import create_app

    llm = jaxkv.load("smollm2-135m", dtype="float32")
    port, server, _ = start_server(create_app(llm, model_name="smollm2-135m", max_batch=4, max_context=1024))
    base = f"http://127.0.0.1:{port}"
    small = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}

    def post(body, **kw):
        with httpx.Client(base_url=base, timeout=600) as c:
            return c.post("/v1/completions", json=body, **kw) if "content" not in kw else \
                c.post("/v1/completions", headers={"content-type": "application/json"}, **kw)

    rows = []
    alone = timed(lambda: post(small), args.repeats)
    huge = b'{"prompt": "' + b"x" * (20 * 2**20) + b'"}'
    refused, beside = [], []
    for _ in range(args.repeats):
        with ThreadPoolExecutor(2) as pool:
            start = time.perf_counter()
            big = pool.submit(lambda: (post(None, content=huge), time.perf_counter() - start))
            time.sleep(0.01)
            t0 = time.perf_counter()
            assert post(small).status_code == 200
            beside.append(time.perf_counter() - t0)
            response, seconds = big.result()
            assert response.status_code == 413, response.text
            refused.append(seconds)
    rows.append(("3-token request alone", f"{alone * 1e3:.0f} ms", ""))
    rows.append(("the same beside a 20 MB prompt", f"{statistics.median(beside) * 1e3:.0f} ms",
                 f"{statistics.median(beside) / alone:.2f}x alone"))
    rows.append(("the 20 MB prompt refused (413)", f"{statistics.median(refused) * 1e3:.0f} ms", "was 11 s"))

    long = {"prompt": "Once upon a time", "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    text = post(long).json()["choices"][0]["text"]
    stops = adversarial_stops(text[-40:], 16, 512)
    plain = timed(lambda: post(long), args.repeats)
    stopped = post({**long, "stop": stops})
    assert stopped.json()["choices"][0]["text"] == text, "an adversarial stop string matched"
    with_stops = timed(lambda: post({**long, "stop": stops}), args.repeats)
    rows.append((f"{args.tokens}-token completion", f"{plain:.2f} s", ""))
    rows.append(("the same with 16 stop strings of 512 characters", f"{with_stops:.2f} s",
                 f"{with_stops / plain:.2f}x without"))
    old = post({**long, "stop": adversarial_stops(text[-40:], 500, 3000)})
    rows.append(("500 stop strings of 3,000 characters", f"{old.status_code}", old.json()["error"]["message"]))
    server.should_exit = True

    ids = llm.tokenizer.encode(text, add_special_tokens=False)[:args.tokens]
    for count, length in ((16, 512), (500, 3000)):
        stop = adversarial_stops(text[-40:], count, length)

        def run(kind):
            stream = kind(llm.tokenizer.decode, stop)
            for i in ids:
                stream.add([i])

        ours = timed(lambda: run(TextStream), args.repeats)
        peer = timed(lambda: run(LiteralStops), 1 if count > 100 else args.repeats)
        rows.append((f"stop matching, {len(ids)} tokens x {count} stops of {length} chars: TextStream / literal",
                     f"{ours * 1e3:.1f} ms / {peer:.2f} s", f"{peer / ours:.0f}x faster"))

    command = "python scripts/bench_hostile.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = "\n".join([
        "# A hostile client against `jaxkv serve` (SmolLM2-135M, float32, CPU)", "",
        f"Command: `{command.strip()}` (medians of {args.repeats} runs; max_batch 4, context 1024).", "",
        "| what | measured | compared |", "|---|---:|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""])
    Path(args.out).write_text(report)
    print(report)


if __name__ == "__main__":
    main()
