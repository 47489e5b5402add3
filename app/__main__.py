from handlers.stop_signals import hold_stop_signals

hold_stop_signals()  # before the imports: a stop requested while the run starts is kept (handlers/stop_signals.py)

import sys  # noqa: E402

from app.cli import main  # noqa: E402

sys.exit(main())
