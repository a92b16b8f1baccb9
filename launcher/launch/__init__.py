"""Backends that create the rank processes; only this package knows how processes are made."""
