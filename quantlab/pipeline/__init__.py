"""The run: the six stages over a run directory, resumable, with checks before any work.

| module        | what                                                                          |
|---------------|-------------------------------------------------------------------------------|
| ``run``       | :func:`run_all`: calibrate -> plan -> quantize -> export -> eval -> report      |
| ``stages``    | one function per stage: fingerprint, skip when fresh, write the artifact        |
| ``context``   | what the stages share (:class:`StageContext`), fingerprints, the run log        |
| ``rundir``    | the run directory: paths, ``state.json``, the lock, what may be replaced        |
| ``preflight`` | every check the recipe, the model's config and the flags allow, before any work |
"""

from quantlab.pipeline.run import run_all

__all__ = ["run_all"]
