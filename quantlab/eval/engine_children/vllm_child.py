"""Answer quantlab's evaluation requests with vLLM (run by the vLLM environment's Python, not quantlab's).

    python vllm_child.py --model DIR --requests REQ.jsonl --out ANS.jsonl [--options JSON]

The protocol every engine child follows (``quantlab/eval/engines.py``): each request line is
``{"id", "prompt", "image", "image_token", "max_new_tokens"}`` where ``prompt`` is the fully templated
text quantlab's transformers path feeds the processor (one image placeholder inside) and ``image`` a PNG
path or null; each answer line is ``{"id", "text", "logprob"}`` (greedy text with special tokens
stripped, and the log-probability of its first token). Exit 0 on success; when vLLM refuses the model,
one line ``ENGINE-REFUSED: <reason>`` on stderr and exit 3. Imports only the standard library, PIL,
torch and vLLM, so it runs in an environment without quantlab.

    python vllm_child.py --serve

answers several checkpoints in one process (an :class:`quantlab.eval.engines.EngineSession`): each stdin
line is a job ``{"model", "requests", "out", "options"}``, answered as above; when it is done the child
writes ``{"ok": true}`` (or ``{"ok": false, "refused": reason}``, then exits 3) as one line on its original
stdout, to which nothing else is written (vLLM's own output goes to stderr). Importing vLLM costs 10-20 s
on two cores: a session pays it once for a baseline and its quantized export, or a test module's cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

REFUSED = 3


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _inputs(requests: list[dict]) -> list[dict]:
    from PIL import Image

    out = []
    for r in requests:
        item: dict = {"prompt": r["prompt"]}
        if r.get("image"):
            with Image.open(r["image"]) as im:
                item["multi_modal_data"] = {"image": im.convert("RGB")}
        out.append(item)
    return out


class Refused(Exception):
    """vLLM could not build or run the model; the message is the one-line reason."""


def _engine_options(options: dict) -> dict:
    import torch

    options = {"dtype": "auto", "enforce_eager": True, "seed": 0, "limit_mm_per_prompt": {"image": 1}, **options}
    if not torch.cuda.is_available() and not {"gpu_memory_utilization", "kv_cache_memory_bytes"} & options.keys():
        # On CPU vLLM reserves gpu_memory_utilization (0.92) of the machine's RAM for its KV cache and
        # refuses to start when that much is not free; a fixed 1 GiB cache is plenty for evaluation prompts.
        options["kv_cache_memory_bytes"] = 1 << 30
    return options


def _answer(llm, requests: list[dict]) -> list[dict]:
    from vllm import SamplingParams

    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_len.setdefault(int(r["max_new_tokens"]), []).append(i)
    answers: dict[int, dict] = {}
    for n, idx in by_len.items():
        params = SamplingParams(temperature=0.0, max_tokens=n, logprobs=1, skip_special_tokens=True)
        outs = llm.generate(_inputs([requests[i] for i in idx]), params, use_tqdm=False)
        for i, o in zip(idx, outs):
            c = o.outputs[0]
            first = c.logprobs[0][c.token_ids[0]].logprob if c.token_ids and c.logprobs else None
            answers[i] = {"id": requests[i]["id"], "text": c.text.strip(), "logprob": first}
    return [answers[i] for i in range(len(requests))]


def run_job(model: str, requests_path: str, out: str, options: dict) -> None:
    """Answer one requests file with ``model``. Raises :class:`Refused` when vLLM fails."""
    requests = _read(requests_path)
    try:
        from vllm import LLM

        llm = LLM(model=model, **_engine_options(options))
        try:
            rows = _answer(llm, requests)
        finally:
            _release(llm)
    except Exception as e:  # noqa: BLE001 - any failure to build or run the engine is reported as a refusal
        traceback.print_exc()
        raise Refused(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _release(llm) -> None:
    """Free a model before the next one loads in the same process (its KV cache alone holds 1 GiB)."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None)
    if callable(shutdown):
        shutdown()
    del llm, engine
    gc.collect()


def serve() -> int:
    """The session loop: one job per stdin line, one reply per job on the original stdout."""
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # everything else (vLLM's logging, prints) goes to stderr
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            run_job(job["model"], job["requests"], job["out"], job.get("options", {}))
        except Refused as e:
            # a failed build can leave vLLM's process-wide state half set up: the session starts a new child
            replies.write(json.dumps({"ok": False, "refused": str(e)}) + "\n")
            replies.flush()
            return REFUSED
        replies.write(json.dumps({"ok": True}) + "\n")
        replies.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--requests")
    p.add_argument("--out")
    p.add_argument("--options", default="{}", help="JSON: keyword arguments for vllm.LLM (dtype, tensor_parallel_size, ...)")
    p.add_argument("--serve", action="store_true", help="answer jobs read from stdin, one per line")
    args = p.parse_args(argv)
    # One process, no engine subprocess: a test or a short evaluation starts in ~20 s instead of ~60 s.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.serve:
        return serve()
    if not (args.model and args.requests and args.out):
        p.error("--model, --requests and --out are required without --serve")
    try:
        run_job(args.model, args.requests, args.out, json.loads(args.options))
    except Refused as e:
        print(f"ENGINE-REFUSED: {e}", file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
