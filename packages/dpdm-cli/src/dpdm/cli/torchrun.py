"""torchrun as ``--nproc`` runs it (``python -m dpdm.cli.torchrun``, torchrun's own arguments): a SIGTERM or SIGINT
that the launcher passes on ends it with the signal's status (143, 130) once its workers stopped, where torchrun
itself would print the traceback of its ``SignalException``."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except SignalException as exc:
        sys.exit(128 + int(exc.sigval))
