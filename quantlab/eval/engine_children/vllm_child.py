"""Answer quantlab's evaluation requests with vLLM (run by the vLLM environment's Python, not quantlab's).

    python vllm_child.py --model DIR --requests REQ.jsonl --out ANS.jsonl [--options JSON]

The protocol every engine child follows (``quantlab/eval/engines.py``): each request line is
``{"id", "prompt", "image", "image_token", "max_new_tokens"}`` where ``prompt`` is the fully templated
text quantlab's transformers path feeds the processor (one image placeholder inside) and ``image`` a PNG
path or null; each answer line is ``{"id", "text", "logprob"}`` (greedy text with special tokens
stripped, and the log-probability of its first token). Exit 0 on success; when vLLM refuses the model,
one line ``ENGINE-REFUSED: <reason>`` on stderr and exit 3. Imports only the standard library, PIL,
torch and vLLM, so it runs in an environment without quantlab.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--options", default="{}", help="JSON: keyword arguments for vllm.LLM (dtype, tensor_parallel_size, ...)")
    args = p.parse_args(argv)
    # One process, no engine subprocess: a test or a short evaluation starts in ~20 s instead of ~60 s.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    requests = _read(args.requests)
    options = {"dtype": "auto", "enforce_eager": True, "seed": 0, "limit_mm_per_prompt": {"image": 1},
               **json.loads(args.options)}
    try:
        import torch
        from vllm import LLM, SamplingParams

        if not torch.cuda.is_available() and not {"gpu_memory_utilization", "kv_cache_memory_bytes"} & options.keys():
            # On CPU vLLM reserves gpu_memory_utilization (0.92) of the machine's RAM for its KV cache and
            # refuses to start when that much is not free; a fixed 1 GiB cache is plenty for evaluation prompts.
            options["kv_cache_memory_bytes"] = 1 << 30

        llm = LLM(model=args.model, **options)
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
    except Exception as e:  # noqa: BLE001 - any failure to build or run the engine is reported as a refusal
        traceback.print_exc()
        print(f"ENGINE-REFUSED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return REFUSED
    with open(args.out, "w", encoding="utf-8") as f:
        for i in range(len(requests)):
            f.write(json.dumps(answers[i]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
