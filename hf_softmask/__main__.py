"""``python -m hf_softmask <command>``; ``accelerate launch -m hf_softmask pretrain ...`` runs it on every process."""

import sys

from .command_line import main

if __name__ == "__main__":
    sys.exit(main())
