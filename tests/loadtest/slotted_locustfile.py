"""Tests only: the project's Locust user, starting each request at the beginning of an even time
slot of the wall clock (slot length SLOT_S seconds). A second process that starts its requests at
odd slots never overlaps it, yet both sample the server within seconds of each other."""

import os
import time

import gevent

from loadtests.locustfile import TritonLLMUser

SLOT_S = float(os.environ.get("SLOT_S", "1.0"))


def to_even_slot() -> float:
    return (-time.time()) % (2 * SLOT_S)


class SlottedUser(TritonLLMUser):
    def wait_time(self):
        return to_even_slot()

    def on_start(self):
        gevent.sleep(to_even_slot())
