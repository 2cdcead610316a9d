"""Answer quantlab's evaluation requests with llama.cpp (llama-cpp-python's bindings, mtmd for images).

    python llama_cpp_child.py --model DIR | --model MODEL.gguf --mmproj MMPROJ.gguf
                              --requests REQ.jsonl --out ANS.jsonl [--options JSON]

The engine-child protocol (``quantlab/eval/engines.py``, ``vllm_child.py``): request lines
``{"id", "prompt", "image", "image_token", "max_new_tokens"}``, answer lines ``{"id", "text", "logprob"}``
(greedy text, special tokens stripped, ``.strip()``; the log-probability of its first token). Exit 0 on
success; when llama.cpp refuses the model, one line ``ENGINE-REFUSED: <reason>`` on stderr and exit 3.

The prompt's ``image_token`` is replaced by mtmd's media marker; mtmd adds the family's own image
delimiters (Qwen's ``<|vision_start|>``/``<|vision_end|>``, dropped from the prompt) and llama.cpp adds BOS only where the GGUF's
``tokenizer.ggml.add_bos_token`` says so (quantlab's exporter writes what the HF tokenizer does). Options
(JSON): ``n_threads``, ``n_ctx``, ``prompt_ids`` (add ``"prompt"``: ``[["text", ids], ["image", n], ...]``
to each answer, to compare tokenization). Extra buffer types (CPU repacking, AMX) are off: quantized
GGUFs crash in llama.cpp's AMX path (ggml-org/llama.cpp issue 20824).

Imports only the standard library, numpy, PIL and llama_cpp, so it runs in llama.cpp's own environment.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import traceback

REFUSED = 3
# Image delimiters mtmd adds itself around an image (tools/mtmd/mtmd.cpp: Qwen-VL projectors); a prompt that
# already holds them around its placeholder would get them twice.
MTMD_DELIMITERS = (("<|vision_start|>", "<|vision_end|>"),)


class Refused(Exception):
    """llama.cpp would not load the model or the projector."""


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Engine:
    """One language model + projector, answering requests one at a time from an empty KV cache."""

    def __init__(self, model: str, mmproj: str, options: dict):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self.ll, self.mtmd, self.errors = llama_cpp, mtmd, []

        @llama_cpp.llama_log_callback
        def log(level, text, user_data):  # keep errors for the refusal line, drop the chatter
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                self.errors.append(text.decode("utf-8", "replace").strip())

        self._log = log  # referenced, or ctypes frees the callback while C still holds it
        llama_cpp.llama_log_set(log, None)
        mtmd.mtmd_helper_log_set(log, None)
        llama_cpp.llama_backend_init()
        threads = int(options.get("n_threads") or os.cpu_count() or 1)
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = int(options.get("n_gpu_layers", 0))
        mp.use_extra_bufts = False  # ggml-org/llama.cpp#20824: quantized tensors crash in the AMX buffer
        self.model = llama_cpp.llama_model_load_from_file(model.encode(), mp)
        if not self.model:
            raise Refused(f"llama.cpp cannot load {model}: {self._why()}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = int(options.get("n_ctx", 1024))
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise Refused(f"llama.cpp cannot make a context for {model}: {self._why()}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_batch = cp.n_batch
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = bool(mp.n_gpu_layers)
        mparams.print_timings = False
        mparams.n_threads = threads
        mparams.warmup = False
        self.mctx = mtmd.mtmd_init_from_file(mmproj.encode(), self.model, mparams)
        if not self.mctx:
            raise Refused(f"mtmd cannot load {mmproj}: {self._why()}")
        self.marker = mtmd.mtmd_default_marker().decode()

    def _why(self) -> str:
        return " | ".join(self.errors[-3:]) or "no error message"

    def _bitmap(self, path: str):
        from PIL import Image

        with Image.open(path) as im:
            rgb = im.convert("RGB")
        data = rgb.tobytes()
        return self.mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))

    def _chunks(self, request: dict):
        """Tokenize text + image into mtmd chunks; also return them as ``[["text", ids] | ["image", n]]``."""
        mtmd = self.mtmd
        text = request["prompt"]
        bitmaps = []
        if request.get("image"):
            if request["image_token"] not in text:
                raise ValueError(f"request {request['id']}: image_token {request['image_token']!r} not in prompt")
            text = text.replace(request["image_token"], self.marker, 1)
            for beg, end in MTMD_DELIMITERS:
                text = text.replace(beg + self.marker + end, self.marker)
            bitmaps.append(self._bitmap(request["image"]))
        inp = mtmd.mtmd_input_text()
        raw = text.encode("utf-8")
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
        chunks = mtmd.mtmd_input_chunks_init()
        arr = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
        rc = mtmd.mtmd_tokenize(self.mctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
        for b in bitmaps:
            mtmd.mtmd_bitmap_free(b)
        if rc != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({rc}) for request {request['id']}: {self._why()}")
        parts = []
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                parts.append(["text", [int(ptr[j]) for j in range(n.value)]])
            else:
                parts.append(["image", int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))])
        return chunks, parts

    def _logits(self):
        import numpy as np

        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)  # special tokens -> b""
        return buf.raw[:max(n, 0)]

    def answer(self, request: dict) -> dict:
        import numpy as np

        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        chunks, parts = self._chunks(request)
        n_past = ll.llama_pos(0)
        try:
            rc = self.mtmd.mtmd_helper_eval_chunks(self.mctx, self.ctx, chunks, 0, 0, self.n_batch, True,
                                                   ctypes.byref(n_past))
        finally:
            self.mtmd.mtmd_input_chunks_free(chunks)
        if rc != 0:
            raise RuntimeError(f"evaluating request {request['id']} failed ({rc}): {self._why()}")
        pos, pieces, first = n_past.value, [], None
        batch = ll.llama_batch_init(1, 0, 1)
        try:
            for _ in range(int(request["max_new_tokens"])):
                logits = self._logits()
                token = int(np.argmax(logits))  # greedy; ties to the lowest id, as torch.argmax
                if first is None:
                    m = logits.max()
                    first = float(logits[token] - m - np.log(np.exp(logits - m).sum()))
                if ll.llama_vocab_is_eog(self.vocab, token):
                    break
                pieces.append(self._piece(token))
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, pos, 1, 1
                batch.seq_id[0][0] = 0
                if ll.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError(f"llama_decode failed for request {request['id']}: {self._why()}")
                pos += 1
        finally:
            ll.llama_batch_free(batch)
        out = {"id": request["id"], "text": b"".join(pieces).decode("utf-8", "replace").strip(), "logprob": first}
        return out | {"prompt": parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="MODEL.gguf, or a directory holding model.gguf + mmproj.gguf")
    p.add_argument("--mmproj", help="the projector (default: DIR/mmproj.gguf when --model is a directory)")
    p.add_argument("--requests", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--options", default="{}", help="JSON: n_threads, n_ctx, n_gpu_layers, prompt_ids")
    args = p.parse_args(argv)
    options = json.loads(args.options)
    if os.path.isdir(args.model):  # a quantlab gguf export directory (quantlab/export/gguf.py)
        args.mmproj = args.mmproj or os.path.join(args.model, "mmproj.gguf")
        args.model = os.path.join(args.model, "model.gguf")
    if args.mmproj is None:
        p.error("--mmproj is required when --model is a file")
    requests = _read(args.requests)
    try:
        engine = Engine(args.model, args.mmproj, options)
    except Exception as e:  # noqa: BLE001 - any failure to load is reported as a refusal
        traceback.print_exc()
        print(f"ENGINE-REFUSED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return REFUSED
    with open(args.out, "w", encoding="utf-8") as f:
        for r in requests:
            a = engine.answer(r)
            if not options.get("prompt_ids"):
                a.pop("prompt")
            f.write(json.dumps(a) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
