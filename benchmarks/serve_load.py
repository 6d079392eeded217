"""Several clients at once against a real ``msn serve`` process, through the OpenAI client (issue 37 item 4).

For each ``--max-batch`` value one server process is started (same model, dtype, threads); for each number of
concurrent clients the servers take turns (so machine noise falls on both alike), each client replaying its
share of Spec-Bench questions one after another with streaming chat completions. Reported per server and
client count: aggregate tokens/s (all completion tokens / the level's wall time), each request's own tokens/s
(its tokens / its time from sending to the last token), time to first token p50/p95, and whether each answer
is the text the first server (``--max-batch 1``: one at a time, as msn.generate alone) gave that question with
the fewest clients ("alone"; in bf16 a near-tie of the logits may flip a token, in fp32 every text must match).

    python benchmarks/serve_load.py --model smollm2-135m --dtype bf16 --threads 2 --max-batch 1,8 \\
        --clients 1,2,4,8 --questions ../shared/data/spec_bench/question.jsonl --out runs/serve-load

Writes ``load.json`` (every request), ``load.md`` (the table) and ``load.png`` (aggregate tokens/s and time to
first token against clients) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--method", default="tr-jacobi")
    p.add_argument("--max-batch", type=ints, default=[1, 8], help="servers to compare (default: 1,8)")
    p.add_argument("--clients", type=ints, default=[1, 2, 4, 8], help="concurrent clients (default: 1,2,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per level, shared by its clients (default: 16)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--questions", type=Path, help="Spec-Bench question.jsonl")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--report-only", action="store_true", help="write load.md and load.png again from --out/load.json")
    args = p.parse_args(argv)
    if args.report_only:
        return args
    if args.questions is None:
        p.error("--questions is required")
    if not args.questions.is_file():
        p.error(f"--questions {args.questions}: no such file")
    if args.requests < max(args.clients):
        p.error(f"--requests {args.requests} is fewer than the most clients ({max(args.clients)}): every client "
                "needs at least one request")
    return args


def questions(path: Path, count: int) -> list[str]:
    """``count`` first turns spread over the file's categories (every n-th question)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(len(rows) // count, 1)
    return [rows[i]["turns"][0] for i in range(0, len(rows), step)][:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, max_batch: int, log_dir: Path):
        self.max_batch, self.port = max_batch, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-batch{max_batch}.log"
        cmd = [sys.executable, "-m", "msn.cli", "serve", "--model", args.model, "--dtype", args.dtype,
               "--threads", str(args.threads), "--method", args.method, "--max-batch", str(max_batch),
               "--queue-size", str(max(args.clients) + 1), "--port", str(self.port)]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"msn serve (max batch {self.max_batch}) exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"msn serve did not come up in {timeout:.0f} s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first, text, usage = None, [], None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else 0
    return {"ttft": (first or end) - start, "seconds": end - start, "tokens": tokens, "text": "".join(text)}


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process, all its threads: this one, or ``pid`` (Linux's /proc; NaN
    elsewhere). How much of the machine the clients take from the server they measure (same cores)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_level(server: Server, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=900)
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []

    def work(c: int) -> None:
        for i in range(c, len(prompts), clients):  # client c asks questions c, c + clients, ...
            try:
                results[i] = {"question": i, "client": c, **one_request(client, model, prompts[i], max_tokens)}
            except Exception as e:  # noqa: BLE001 - reported with the level
                errors.append(f"question {i}: {type(e).__name__}: {e}")

    start, cpu = time.perf_counter(), (cpu_seconds(), cpu_seconds(server.proc.pid))
    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    client_cpu, server_cpu = cpu_seconds() - cpu[0], cpu_seconds(server.proc.pid) - cpu[1]
    done = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in done)
    ttfts = sorted(r["ttft"] for r in done)
    return {
        "max_batch": server.max_batch, "clients": clients, "wall": wall, "tokens": tokens,
        "aggregate_tps": tokens / wall, "errors": errors, "requests": done,
        "client_cores": client_cpu / wall, "server_cores": server_cpu / wall,  # CPU seconds per second
        "request_tps_median": statistics.median(r["tokens"] / r["seconds"] for r in done),
        "ttft_p50": ttfts[len(ttfts) // 2], "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


def table(levels: list[dict], baseline: int) -> str:
    by = {(lv["max_batch"], lv["clients"]): lv for lv in levels}
    first = min(lv["clients"] for lv in levels)  # the baseline server's answers with the fewest clients: "alone"
    texts = {r["question"]: r["text"] for r in by[baseline, first]["requests"]}
    alone = {b: by[b, 1]["request_tps_median"] for b, c in by if c == 1}
    lines = ["| max batch | clients | aggregate tok/s | x max-batch " + str(baseline) + " | request tok/s (median) "
             "| x alone | TTFT p50 s | TTFT p95 s | same text as alone | errors | cores: server / clients |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (b, c), lv in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = by.get((baseline, c))
        ratio = f"{lv['aggregate_tps'] / base['aggregate_tps']:.2f}x" if base else "-"
        own = f"{lv['request_tps_median'] / alone[b]:.2f}x" if b in alone else "-"
        same = sum(texts.get(r["question"]) == r["text"] for r in lv["requests"])
        lines.append(f"| {b} | {c} | {lv['aggregate_tps']:.1f} | {ratio} | {lv['request_tps_median']:.1f} | {own} | "
                     f"{lv['ttft_p50']:.2f} | {lv['ttft_p95']:.2f} | {same}/{len(lv['requests'])} | "
                     f"{len(lv['errors'])} | {_cores(lv)} |")
    return "\n".join(lines)


def _cores(level: dict) -> str:
    """CPU seconds per wall second of the server process and of the clients (this process); "-" for a
    load.json written before they were measured."""
    if "server_cores" not in level:
        return "-"
    return f"{level['server_cores']:.2f} / {level['client_cores']:.2f}"


def plot(levels: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    clients = sorted({lv["clients"] for lv in levels})
    for i, mb in enumerate(sorted({lv["max_batch"] for lv in levels})):
        rows = sorted((lv for lv in levels if lv["max_batch"] == mb), key=lambda lv: lv["clients"])
        xs, color = [lv["clients"] for lv in rows], f"C{i}"
        a.plot(xs, [lv["aggregate_tps"] for lv in rows], marker="o", color=color, label=f"--max-batch {mb}")
        b.plot(xs, [lv["ttft_p50"] for lv in rows], marker="o", color=color, label=f"--max-batch {mb} p50")
        b.plot(xs, [lv["ttft_p95"] for lv in rows], marker="x", color=color, linestyle="--",
               label=f"--max-batch {mb} p95")
    a.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title=title)
    b.set(xlabel="concurrent clients", ylabel="time to first token (s)", yscale="log")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(levels: list[dict], args, out: Path) -> str:
    title = f"{args.model} {args.dtype}, {args.threads} threads, {args.method}"
    text = f"{title}, {args.requests} requests per level, {args.max_tokens} tokens\n\n" + table(levels, args.max_batch[0])
    (out / "load.md").write_text(text + "\n")
    plot(levels, out / "load.png", title)
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        data = json.loads((args.out / "load.json").read_text())
        print(report(data["levels"], argparse.Namespace(**data["args"]), args.out))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    prompts = questions(args.questions, args.requests)
    servers: list[Server] = []
    levels: list[dict] = []
    try:
        for mb in args.max_batch:  # one after another: two warm-ups measuring t(n) at once would skew both curves
            servers.append(Server(args, mb, args.out))
            servers[-1].wait()
        for clients in args.clients:
            for s in servers:  # the servers take turns at each level
                lv = run_level(s, args.model, prompts, clients, args.max_tokens)
                levels.append(lv)
                print(f"max batch {s.max_batch:>2}, {clients} clients: {lv['aggregate_tps']:.1f} tok/s aggregate, "
                      f"{lv['request_tps_median']:.1f} per request, TTFT p50 {lv['ttft_p50']:.2f} s"
                      + (f", {len(lv['errors'])} errors" if lv["errors"] else ""), flush=True)
    finally:
        for s in servers:
            s.stop()
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levels": levels}
    tmp = args.out / "load.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out / "load.json")
    print(report(levels, args, args.out))
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
