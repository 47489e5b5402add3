from handlers.stop_signals import hold_stop_signals

hold_stop_signals()  # before the imports: a stop requested while the run starts is kept (handlers/stop_signals.py)

import gc  # noqa: E402
import sys  # noqa: E402

from app.cli import main  # noqa: E402

code = main()
# The interpreter's teardown runs the cycle collector over every object that the imports made (torch's and
# sympy's: some 350,000), which took 1.5-2 s after a run on a CPU machine. Frozen, they are skipped and the
# OS takes their memory back; the command has closed every file it wrote, and atexit handlers still run.
gc.freeze()
sys.exit(code)
