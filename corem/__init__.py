"""corem: the CORE-M device-link CoAP adapter."""

import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"

if _sys.argv[1:2] == ["serve"] and _os.path.basename(_sys.argv[0]) in ("corem", "-m", "__main__.py"):
    # `corem serve` (the installed script or `python -m corem`): a SIGHUP -- a reload -- that comes
    # while it is still starting is ignored, as `cli.run_until_signalled` promises once its receiver
    # is up (which takes it over); before that the default action would end the process without a
    # word, and the imports and set-up take a few hundred milliseconds.  Here, the first of corem
    # that either runs.
    _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)
