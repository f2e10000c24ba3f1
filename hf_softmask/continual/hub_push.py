"""Hub pushes of finished pre-training domains: each to ``<hub_model_id>-<k>-<domain>``, retried by the next run.

The outcome of every push is recorded in ``state.json`` (``pushed``, ``push_error``), so a failed push (offline,
no token, no space) never loses a finished domain and the same command retries it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpointing import RunState
    from .config import ContinualPretrainingArguments

__all__ = ["HubPusher"]


class HubPusher:
    """Pushes a run's finished domains; ``say`` prints a console line (main process)."""

    def __init__(self, args: ContinualPretrainingArguments, say):
        self.args = args
        self.out = Path(args.output_dir)
        self.say = say

    def push(self, directory: Path, name: str) -> None:
        """Upload a finished stage directory to ``<hub_model_id>-<name>``."""
        from huggingface_hub import HfApi

        a = self.args
        if not list(directory.glob("model*.safetensors")):
            raise FileNotFoundError(f"{directory} has no weights any more (keep_domain_weights=last deleted them)")
        repo = f"{a.hub_model_id}-{name}".replace("_", "-")
        api = HfApi(token=a.hub_token)
        api.create_repo(repo, private=a.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(directory), commit_message=f"hf_softmask: {name}")

    def push_pending(self, state: RunState) -> list[str]:
        """Push every finished domain not pushed yet; record the outcome in state.json; return what is missing."""
        missing = []
        for record in state.done:
            if record.get("pushed"):
                continue
            try:
                self.push(self.out / record["dir"], record["dir"])
                record["pushed"], record["push_error"] = True, None
                self.say(f"pushed {record['dir']}")
            except Exception as e:  # offline, no token, no space: recorded and retried by the next run
                record["pushed"], record["push_error"] = False, f"{type(e).__name__}: {e}"
                missing.append(record["dir"])
                self.say(
                    f"push of {record['dir']} failed ({record['push_error']}); it stays saved and the next run "
                    "of the same command retries it"
                )
            state.save()
        return missing

    def check(self, state: RunState) -> list[str]:
        """At the end of a run: push what is pending (with ``--push_to_hub``), else name the domains never pushed."""
        if self.args.push_to_hub:
            return self.push_pending(state)
        failed = [d["dir"] for d in state.done if d.get("pushed") is False]
        if failed:
            self.say(
                f"never pushed: {', '.join(failed)} (an earlier push failed); rerun with --push_to_hub to push them"
            )
        return []
