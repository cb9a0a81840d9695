import signal
import sys

if sys.argv[1:2] == ["serve"]:
    # A SIGHUP (a reload) that comes while corem is still starting is ignored, as `run_until_signalled`
    # promises once its receiver is up; before it, the default action would end the process without a
    # word, and importing and setting up take a few hundred milliseconds (its receiver takes over).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from .cli import main  # noqa: E402 - (after the signal: the imports are most of the window)

sys.exit(main())
