"""Domain errors of fleetctl and the exit codes they map to.

Every error carries one line that says what went wrong and what to do about it; `cli.main`
prints that line (no traceback) and exits with the error's code, so scripts can branch on it:

    0  success
    1  the operation failed (FleetError)
    2  bad usage: an unknown option or an invalid value (click's own code; ConfigError too)
    3  replicas did not become ready in time (NotReadyError)
    4  a needed program or engine is missing or does not answer: nginx, Docker (UnavailableError)
    5  NGINX rejected a rendered config; the running NGINX keeps the old one (NginxConfigError)
    6  there is no fleet in the state directory (NoFleetError)
    7  `status`: the fleet runs but is degraded (fewer ready replicas than asked for, or NGINX down)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_READY = 3
EXIT_UNAVAILABLE = 4
EXIT_CONFIG_REJECTED = 5
EXIT_NO_FLEET = 6
EXIT_DEGRADED = 7


class FleetError(Exception):
    """An operation failed; `str(error)` is the one line shown to the operator."""

    exit_code = EXIT_FAILED


class ConfigError(FleetError, ValueError):
    """A setting is invalid; the message names the option and the accepted values."""

    exit_code = EXIT_USAGE


class NotReadyError(FleetError):
    exit_code = EXIT_NOT_READY


class UnavailableError(FleetError):
    exit_code = EXIT_UNAVAILABLE


class NginxConfigError(FleetError):
    exit_code = EXIT_CONFIG_REJECTED


class NoFleetError(FleetError):
    exit_code = EXIT_NO_FLEET
