"""Hub pushes of finished pre-training domains: each to ``<hub_model_id>-<k>-<domain>``, retried by the next run.

The outcome of every push is recorded in ``state.json`` (``pushed``, ``push_error``), so a failed push (offline,
no token, no space) never loses a finished domain and the same command retries it. A run tries each stage once:
one console line per stage that failed; at the end an offline run says so once, any other failure is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...utils.io import upload_folder_to_hub

if TYPE_CHECKING:
    from ..checkpointing import RunState
    from .config import ContinualPretrainingArguments

__all__ = ["HubPusher"]


class HubPusher:
    """Pushes a run's finished domains; ``say`` prints a console line (main process)."""

    def __init__(self, args: ContinualPretrainingArguments, say):
        self.args = args
        self.out = Path(args.output_dir)
        self.say = say
        self.tried: set[str] = set()  # stages whose push this run tried already

    def push(self, directory: Path, name: str) -> None:
        """Upload a finished stage directory to ``<hub_model_id>-<name>``."""
        a = self.args
        if not list(directory.glob("model*.safetensors")):
            raise FileNotFoundError(f"{directory} has no weights any more (keep_domain_weights=last deleted them)")
        repo = f"{a.hub_model_id}-{name}".replace("_", "-")
        upload_folder_to_hub(
            directory, repo, commit_message=f"hf_softmask: {name}", private=a.hub_private_repo, token=a.hub_token
        )

    def push_pending(self, state: RunState) -> list[str]:
        """Push every finished domain not pushed yet and not tried in this run (each is tried once per run: a failure
        that cannot change in-run, offline, is not repeated after every domain); record the outcome in state.json;
        return the domains not pushed."""
        for record in state.done:
            if record.get("pushed") or record["dir"] in self.tried:
                continue
            self.tried.add(record["dir"])
            try:
                self.push(self.out / record["dir"], record["dir"])
                record["pushed"], record["push_error"] = True, None
                self.say(f"pushed {record['dir']}")
            except Exception as e:  # offline, no token, no space: recorded and retried by the next run
                record["pushed"], record["push_error"] = False, _reason(e)
                self.say(f"push of {record['dir']} failed ({record['push_error']}); it stays saved")
            state.save()
        return [d["dir"] for d in state.done if not d.get("pushed")]

    def check(self, state: RunState) -> list[str]:
        """At the end of a run: push what is pending (with ``--push_to_hub``), else name the domains never pushed.

        Returns the domains whose push failed for a reason a rerun may not share (the runner raises on them);
        domains not pushed because the Hub was offline only get a console line."""
        if not self.args.push_to_hub:
            failed = [d["dir"] for d in state.done if d.get("pushed") is False]
            if failed:
                hint = "rerun with --push_to_hub to push them"
                self.say(f"never pushed: {', '.join(failed)} (an earlier push failed); {hint}")
            return []
        missing = set(self.push_pending(state))
        records = [d for d in state.done if d["dir"] in missing]
        offline = [d["dir"] for d in records if str(d.get("push_error", "")).startswith(OFFLINE)]
        if offline:
            self.say(
                f"not pushed: {', '.join(offline)} (offline); everything is saved in {self.out}: rerun the same "
                "command with HF_HUB_OFFLINE=0 and a network to push them"
            )
        return [d["dir"] for d in records if d["dir"] not in offline]


#: How a push refused by the Hub's offline mode is recorded (state.json ``push_error``).
OFFLINE = "offline"


def _reason(e: Exception) -> str:
    """A push failure in one line: offline mode by its name (a rerun online fixes it), else the exception."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return f"{OFFLINE}: HF_HUB_OFFLINE is set"
    return f"{type(e).__name__}: {e}"
