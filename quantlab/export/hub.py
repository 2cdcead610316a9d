"""Push an exported checkpoint to the Hugging Face Hub (huggingface_hub's upload_folder)."""

from __future__ import annotations

from pathlib import Path


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "Upload quantized model (quantlab)") -> str:
    """Create ``repo_id`` if needed and upload ``model_dir``; returns the repo URL.

    Raises:
        FileNotFoundError: ``model_dir`` is not an exported checkpoint (no config.json).
        ConnectionError: the Hub is unreachable (offline machine) — nothing is uploaded.
    """
    from huggingface_hub import HfApi

    from quantlab.models.load import _hub_reachable

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; export the model first")
    if "/" not in repo_id:
        raise ValueError(f"repo id must look like ORG/NAME, got {repo_id!r}")
    if not _hub_reachable():
        raise ConnectionError(f"cannot push to {repo_id!r}: the Hugging Face Hub is not reachable from this machine; "
                              f"the checkpoint stays in {model_dir}")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return f"https://huggingface.co/{repo_id}"
