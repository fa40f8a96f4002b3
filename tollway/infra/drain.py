"""A replica leaving a load balancer: on SIGTERM it first answers ``/readyz`` with 503 and goes on serving
for ``drain_pause_s``, so a balancer that checks readiness takes it out of rotation while it still accepts;
only then does the server's own graceful stop begin (the listening socket closed, requests and streams in
flight run to their end). Without the pause the socket closes at once, and a request the balancer sent in
the moment before its next check meets a closed port or a reset connection: a 502 to the client.

Kubernetes takes a pod out of its Service's endpoints before SIGTERM (with the manifest's ``preStop``
pause), so the pause is for balancers that learn from health checks only (HAProxy, a cloud load
balancer's target group): longer than the check's interval times its fall count."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("tollway.drain")


class Drain:
    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s
        self.draining = False

    def install(self) -> Callable[[], None]:
        """Put the pause in front of the SIGTERM handler the server installed (uvicorn's, which starts the
        graceful stop); returns the undo. Nothing where there is no pause, or off the main thread (an app
        served in process by a test or another server, whose signals are not this app's)."""
        if self.pause_s <= 0 or threading.current_thread() is not threading.main_thread():
            return lambda: None
        server_handler = signal.getsignal(signal.SIGTERM)
        if not callable(server_handler):
            return lambda: None

        def handler(sig: int, frame: FrameType | None) -> None:
            if self.draining:  # a second SIGTERM: stop now
                server_handler(sig, frame)
                return
            self.draining = True
            log.info("SIGTERM: /readyz answers 503; serving on for %.1f s before the graceful stop",
                     self.pause_s)
            # (a thread, not the event loop: a signal handler may run in the middle of the loop's own work)
            later = threading.Timer(self.pause_s, server_handler, (sig, None))
            later.daemon = True
            later.start()

        signal.signal(signal.SIGTERM, handler)

        def undo() -> None:
            if signal.getsignal(signal.SIGTERM) is handler:
                signal.signal(signal.SIGTERM, server_handler)

        return undo
